"""Image paths stay inside their folder: training, packing, TFDS building (eval: tests/inference/
test_scoring.py). A path that leaves the image folder (`..` after normalising, or an absolute
path elsewhere) is skipped as `unsafe_path` and its file never opened or copied."""

import builtins
import collections
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lladav_jax.data import pipeline
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import Example, Skip
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.sources import path_inside
from lladav_jax.data.sources.array_record import ArrayRecordSource
from lladav_jax.data.sources.llava_json import LlavaJsonSource
from lladav_jax.models import variants

TOKENIZER = load_demo_tokenizer()
CFG = variants.model_config("tiny")


def turns(q: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def data(tmp_path):
    """An image folder with one image, and a valid PNG outside it, named by a `..` escape
    and by its absolute path (were it opened, those samples would train)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).save(images / "in.png")
    outside = tmp_path / "outside.png"
    Image.fromarray(rng.integers(0, 255, (14, 10, 3), np.uint8)).save(outside)
    rows = [
        {"id": "good", "image": "in.png", "conversations": turns("What?")},
        {"id": "escape", "image": "../outside.png", "conversations": turns("Up?")},
        {"id": "absolute", "image": str(outside), "conversations": turns("Abs?")},
        # Inside once normalised, and an absolute path inside: both fine.
        {"id": "round", "image": "x/../in.png", "conversations": turns("Round?")},
        {"id": "abs-in", "image": str(images / "in.png"), "conversations": turns("In?")},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, images, outside


def featurizer() -> Featurizer:
    return Featurizer(CFG, TOKENIZER, seq_len=256)


def outcomes(source) -> dict[str, str]:
    """id -> 'ok' or the skip reason, featurizing each sample of `source` alone."""
    out = {}
    for i in range(len(source)):
        result = featurizer()(source[i])
        out[result.sample_id] = result.reason if isinstance(result, Skip) else "ok"
    return out


WANT = {"good": "ok", "escape": "unsafe_path", "absolute": "unsafe_path", "round": "ok",
        "abs-in": "ok"}


def test_path_inside_is_lexical(tmp_path):
    folder = tmp_path / "img"
    (folder / "sub").mkdir(parents=True)
    assert path_inside(folder, "a.png") == str(folder / "a.png")
    assert path_inside(folder, "sub/../a.png") == str(folder / "a.png")
    assert path_inside(folder, str(folder / "sub" / "a.png")) == str(folder / "sub" / "a.png")
    for bad in ("../a.png", "sub/../../a.png", "/etc/passwd", "../../../../etc/passwd",
                str(tmp_path / "img2" / "a.png"), ".", ""):
        assert path_inside(folder, bad) is None, bad
    # A symlink inside the folder is followed (the data set may link to another disk); the
    # check never resolves links, it refuses what the data file's text names outside.
    other = tmp_path / "other_disk"
    other.mkdir()
    os.symlink(other, folder / "linked")
    assert path_inside(folder, "linked/a.png") == str(folder / "linked" / "a.png")
    # `..` after a link is applied lexically: the path returned is the one to open.
    assert path_inside(folder, "linked/../a.png") == str(folder / "a.png")


def test_training_skips_paths_outside_the_folder_without_opening_them(data, monkeypatch):
    path, images, outside = data
    source = LlavaJsonSource(path, images)
    escape, absolute = source[1], source[2]
    assert escape["images"] == ["../outside.png"] and escape["_unsafe_images"] == [0]
    assert absolute["images"] == [str(outside)] and absolute["_unsafe_images"] == [0]
    assert "_unsafe_images" not in source[0] and "_unsafe_images" not in source[4]

    opened = []
    real_open = builtins.open

    def spy(file, *args, **kw):
        opened.append(os.path.abspath(os.fspath(file)) if isinstance(file, str | os.PathLike)
                      else file)
        return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    assert outcomes(source) == WANT
    skip = featurizer().measure(escape)
    assert skip.reason == "unsafe_path" and "../outside.png" in skip.detail
    # add_pixels refuses a marked image too (a measure taken from another copy of the sample).
    measured = featurizer().measure(source[0])
    marked = {**source[0], "_unsafe_images": [0]}
    assert featurizer().add_pixels(measured, marked).reason == "unsafe_path"
    assert isinstance(featurizer().add_pixels(measured, source[0]), Example)

    # Through the pipeline: counted by reason and named when the run aborts.
    settings = ml_collections.ConfigDict(dict(
        seq_len=256, batch_size=2, seed=3, num_epochs=1, window=8, pack=True,
        group_by_length=False, num_workers=0, max_skip_fraction=0.5, min_seen_for_abort=1))
    batches = list(pipeline.make_dataset(source, featurizer(), CFG, settings,
                                         pad_id=TOKENIZER.pad_id))
    skips = collections.Counter()
    for b in batches:
        skips.update(b["skips"])
    assert skips["unsafe_path"] == 2 and sum(skips.values()) == 2
    assert sum(int(b["num_samples"]) for b in batches) == 3
    settings.max_skip_fraction = 0.1
    with pytest.raises(pipeline.DataQualityError, match=r"unsafe_path 2.*outside\.png"):
        list(pipeline.make_dataset(source, featurizer(), CFG, settings, pad_id=TOKENIZER.pad_id))
    assert str(outside) not in opened
    assert str(images / "in.png") in opened  # the spy does see image files opened


def test_packing_never_reads_or_copies_a_file_outside(data, capsys):
    from lladav_jax.cli.data import main

    path, images, outside = data
    out = path.parent / "shards"
    assert main(["pack-arrayrecord", "--data_path", str(path), "--image_folder", str(images),
                 "--out", str(out), "--num_shards", "2"]) == 0
    assert "2 paths outside the image or video folder" in capsys.readouterr().out
    secret = outside.read_bytes()
    source = ArrayRecordSource(out)
    for i in range(len(source)):
        assert secret not in source._records[i]  # the raw record, as stored
    assert source[1]["images"] == ["../outside.png"] and source[1]["_unsafe_images"] == [0]
    assert source[0]["images"] == [(images / "in.png").read_bytes()]
    assert outcomes(source) == WANT
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["unsafe_paths"] == 2


def test_tfds_building_never_reads_or_copies_a_file_outside(data, capsys):
    from lladav_jax.cli.data import main
    from lladav_jax.data.sources.tfds import TfdsSource

    path, images, outside = data
    out = path.parent / "tfds"
    assert main(["build-tfds", "--data_path", str(path), "--image_folder", str(images),
                 "--out", str(out)]) == 0
    assert "2 paths outside the image or video folder" in capsys.readouterr().out
    secret = outside.read_bytes()
    source = TfdsSource(out)
    for i in range(len(source)):
        example = source._open()[i]  # the stored features
        assert all(secret not in bytes(im) for im in example["images"])
    assert source[2]["images"] == [str(outside)] and source[2]["_unsafe_images"] == [0]
    assert outcomes(source) == WANT
