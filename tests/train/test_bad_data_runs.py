"""Data the run cannot use is an error, not a quiet end: a run that trains no step, or whose
data ran out with more skipped than data.max_skip_fraction, fails naming the skips; what it
did train is kept, and nothing is left that breaks the next run."""

import json

import pytest

from lladav_jax.data.pipeline import DataQualityError
from lladav_jax.data.synthetic import write_llava_json
from lladav_jax.train.config_check import ConfigError
from lladav_jax.train.loop import train
from tests.train.test_train import rows_of, small_config

TURNS = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


def llava_set(tmp_path, good: int, missing: int) -> dict:
    """`good` usable samples and `missing` whose image is not there; the data settings."""
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data.jsonl"
    if good:
        write_llava_json(path, images, good)
    with open(path, "a") as f:
        for k in range(missing):
            f.write(json.dumps({"id": f"lost-{k}", "image": f"lost{k}.png",
                                "conversations": TURNS}) + "\n")
    return {"data.source": "llava_json", "data.path": str(path),
            "data.image_folder": str(images), "data.min_seen_for_abort": 500}


def test_a_set_where_every_sample_is_bad_fails_and_leaves_nothing_behind(tmp_path):
    workdir = tmp_path / "run"
    config = small_config({**llava_set(tmp_path, 0, 10), "train.steps": 0})
    for _ in range(2):  # the rerun meets the same clear error, not a broken workdir
        with pytest.raises(DataQualityError) as e:
            train(config, str(workdir))
        assert "10 of 10 samples skipped" in str(e.value), str(e.value)
        assert "missing_image 10" in str(e.value) and "lost0.png" in str(e.value)
        assert not [d for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()]
        assert rows_of(workdir) == []


def test_data_that_ran_out_mostly_skipped_keeps_its_steps_and_fails(tmp_path):
    """8 good samples of 24: one batch trains and is saved, then the run fails (16 of 24
    skipped is over 10%), although min_seen_for_abort (500) was never reached."""
    workdir = tmp_path / "run"
    config = small_config({**llava_set(tmp_path, 8, 16), "train.steps": 0})
    with pytest.raises(DataQualityError, match=r"16 of 24 samples skipped .*missing_image 16"):
        train(config, str(workdir))
    assert [r["step"] for r in rows_of(workdir)] == [1]
    assert (workdir / "checkpoints" / "1").is_dir()
    with pytest.raises(DataQualityError, match="16 of 24 samples skipped"):
        train(config, str(workdir))  # resumes at its end: the same verdict, nothing lost
    assert [r["step"] for r in rows_of(workdir)] == [1]


def test_a_data_path_the_source_ignores_is_an_error(tmp_path):
    config = small_config({"data.path": str(tmp_path / "train.json")})
    with pytest.raises(ConfigError, match=r"data\.source=llava_json"):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
