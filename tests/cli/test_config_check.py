"""`check_config`: every training setting out of range is named, with its range, up front."""

import pytest

from lladav_jax.train.config_check import ConfigError, check_config, guess_source
from lladav_jax.train.defaults import base_config, sft_8b


def _with(key: str, value) -> dict:
    # A plain mapping (check_config takes one, as the Python API may): a ConfigDict would
    # refuse some bad values (2.5 for an int) before the check sees them.
    c = base_config("tiny").to_dict()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return c


def test_the_defaults_and_presets_pass():
    check_config(base_config("tiny"))
    check_config(sft_8b())
    check_config(_with("train.steps", 0))  # 0: num_epochs passes over the data


@pytest.mark.parametrize(("key", "value", "words"), [
    ("train.steps", -1, ">= 0"),
    ("train.checkpoint_every", 0, ">= 1"),
    ("train.keep_checkpoints", 0, ">= 1"),
    ("train.log_every", 0, ">= 1"),
    ("train.grad_accum", 0, ">= 1"),
    ("train.preemption_check_every", -1, ">= 0"),
    ("train.on_bad_checkpoint", "retry", "fallback or fail"),
    ("data.batch_size", 0, ">= 1"),
    ("data.seq_len", 0, ">= 1"),
    ("data.num_epochs", 0, ">= 1"),
    ("data.window", 8, ">= data.batch_size=16"),
    ("data.num_workers", -1, ">= 0"),
    ("data.max_skip_fraction", 1.5, "in [0, 1]"),
    ("data.min_seen_for_abort", -1, ">= 0"),
    ("optim.lr.llm", -1e-5, ">= 0"),
    ("optim.warmup_ratio", 1.0, "in [0, 1)"),
    ("optim.clip_norm", -1.0, ">= 0"),
    ("optim.b1", 1.0, "in [0, 1)"),
    ("optim.b2", -0.1, "in [0, 1)"),
    ("optim.eps", 0.0, "> 0"),
    ("eval.every", -1, ">= 0"),
    ("eval.t_grid", (0.0, 0.5), "in (0, 1]"),
    ("eval.t_grid", (0.5, 1.5), "in (0, 1]"),
    ("data.batch_size", 2.5, "integer"),
])
def test_each_rule_names_the_key_and_its_range(key, value, words):
    with pytest.raises(ConfigError) as e:
        check_config(_with(key, value))
    assert str(e.value).startswith(f"{key}=") and words in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)  # the commands print it as one line


@pytest.mark.parametrize(("path", "source"), [
    ("data/llava.json", "llava_json"), ("data/llava.jsonl", "llava_json"),
    ("/mnt/gcs/shards/*", "array_record"), ("gs://b/x.array_record-00000-of-00004", "array_record"),
])
def test_a_path_with_the_synthetic_source_names_the_source_to_set(path, source):
    assert guess_source(path) == source
    with pytest.raises(ConfigError, match=rf"data.source='synthetic'.*data.source={source}"):
        check_config(_with("data.path", path))


def test_folders_are_guessed_by_what_they_hold(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train.array_record-00000-of-00001").write_bytes(b"")
    version = tmp_path / "tfds" / "llava" / "1.0.0"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert guess_source(str(tmp_path / "shards")) == "array_record"
    assert guess_source(str(tmp_path / "tfds")) == "tfds"
    assert guess_source(str(tmp_path / "empty")) is None
    with pytest.raises(ConfigError, match="llava_json, array_record or tfds"):
        check_config(_with("data.path", str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"data.image_folder='img/'.*data.source=llava_json"):
        check_config(_with("data.image_folder", "img/"))
