"""Raw-sample sources: LLaVA JSON/JSONL, ArrayRecord shards, TFDS (without TensorFlow), mixtures."""

import collections
import importlib
import json
import os
import pathlib
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from lladav_jax.data.sources.array_record import ArrayRecordSource, pack, write_array_records
from lladav_jax.data.sources.llava_json import LlavaJsonSource, _line_index
from lladav_jax.data.sources.mixture import Mixture, permute_index


def turns(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


ROWS = [
    {"id": "one", "image": "a.png", "conversations": turns("<image>\nWhat?", "A square.")},
    {
        "id": 2,
        "image": ["sub/b.jpg", "a.png"],
        "conversations": turns("<image><image>\nDiff?", "No."),
    },
    {"id": "text", "conversations": turns("Hi", "Hello.")},
    {"id": "gone", "image": "missing.png", "conversations": turns("<image>\nQ", "A")},
    {"image": "a.png", "conversations": turns("<image>\nno id", "ok"), "extra": {"k": [1, 2]}},
]


@pytest.fixture
def data(tmp_path):
    """A tiny LLaVA data set: images, a .json, and a .jsonl with a bad line and blank lines."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 9, 3), np.uint8)).save(images / "sub" / "b.jpg")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    lines = [json.dumps(r) for r in ROWS[:3]] + ["", "{not json", json.dumps(ROWS[3]), "[1, 2]"]
    lines += ['{"id": "noconv"}', json.dumps(ROWS[4]), ""]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def good_jsonl_indices():
    return [0, 1, 2, 4, 7]  # the jsonl's samples that are ROWS (3 malformed lines between)


def test_json_source(data):
    src = LlavaJsonSource(data / "d.json", data / "images")
    assert len(src) == len(ROWS)
    s = src[1]
    assert s["id"] == "2" and s["conversations"] == ROWS[1]["conversations"]
    assert s["images"] == [str(data / "images/sub/b.jpg"), str(data / "images/a.png")]
    assert src[2]["images"] == [] and "_error" not in src[2]
    assert src[3]["images"] == [str(data / "images/missing.png")]  # reported later, not here
    assert src[4]["id"] == "d.json:[4]" and src[4]["extra"] == {"k": [1, 2]}
    assert src[-1] == src[4]
    with pytest.raises(IndexError):
        src[5]
    # Picklable (Grain workers) and usable as a Grain source.
    assert pickle.loads(pickle.dumps(src))[1] == s
    assert list(grain.MapDataset.source(src))[1] == s


def test_jsonl_source_and_malformed(data):
    src = LlavaJsonSource(data / "d.jsonl", data / "images")
    assert len(src) == 8  # the blank lines are not samples
    json_src = LlavaJsonSource(data / "d.json", data / "images")
    for i, j in enumerate(good_jsonl_indices()):
        want = json_src[i]
        if i == 4:  # no id: named by file and line instead
            want["id"] = "d.jsonl:9"
        assert src[j] == want
    # Bad lines become marked samples with the file and (1-based, blank lines counted) line.
    bad = {3: "invalid JSON", 5: "not a JSON object", 6: "`conversations` missing"}
    for i, what in bad.items():
        s = src[i]
        assert s["_error"].startswith(f"malformed: {what}"), s
        assert s["images"] == [] and s["conversations"] == []
    assert [src[i]["id"] for i in bad] == ["d.jsonl:5", "d.jsonl:7", "d.jsonl:8"]
    assert pickle.loads(pickle.dumps(src))[7] == src[7]


def test_line_index_across_chunks(data):
    path = str(data / "d.jsonl")
    whole = _line_index(path)
    for a, b in zip(_line_index(path, chunk=7), whole):
        np.testing.assert_array_equal(a, b)
    raw = (data / "d.jsonl").read_bytes()
    starts, lengths, _ = whole
    assert [raw[s : s + n] for s, n in zip(starts, lengths)] == [x for x in raw.split(b"\n") if x]


def test_bad_image_field_and_bad_file(data):
    (data / "e.jsonl").write_text(json.dumps({"id": "x", "image": 3, "conversations": []}) + "\n")
    s = LlavaJsonSource(data / "e.jsonl", data)[0]
    assert s["_error"].startswith("malformed: `image` must be") and s["id"] == "e.jsonl:1"
    (data / "f.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"f\.json"):
        LlavaJsonSource(data / "f.json")


def with_file_bytes(sample):
    """What a packed sample must hold: the files' bytes; a missing file's path, marked."""
    out, missing = dict(sample), []
    out["images"] = []
    for k, path in enumerate(sample["images"]):
        if os.path.exists(path):
            out["images"].append(pathlib.Path(path).read_bytes())
        else:
            out["images"].append(path)
            missing.append(k)
    if missing:
        out["_missing_images"] = missing
    return out


def test_arrayrecord_round_trip(data, capsys):
    src = LlavaJsonSource(data / "d.jsonl", data / "images")
    stats = pack(data / "d.jsonl", data / "images", data / "ar", num_shards=3)
    assert "1 images missing in 1 samples" in capsys.readouterr().out
    assert (stats.samples, stats.images, stats.missing_images, stats.malformed) == (8, 5, 1, 3)
    shards = sorted(os.listdir(data / "ar"))
    assert shards == [
        "data-00000-of-00003.array_record",
        "data-00001-of-00003.array_record",
        "data-00002-of-00003.array_record",
        "manifest.json",
    ]
    ar = ArrayRecordSource(data / "ar")
    assert len(ar) == len(src)
    for i in range(len(src)):
        assert ar[i] == with_file_bytes(src[i]), i  # same order: contiguous shards
    assert isinstance(ar[1]["images"][0], bytes) and ar[3]["_error"] == src[3]["_error"]
    assert ar[4]["images"] == [str(data / "images/missing.png")] and ar[4]["_missing_images"] == [0]
    # A glob reads the same; the source pickles (Grain workers).
    assert ArrayRecordSource(str(data / "ar" / "*.array_record"))[1] == ar[1]
    assert pickle.loads(pickle.dumps(ar))[4] == ar[4]
    with pytest.raises(FileExistsError):  # never overwrites shards
        pack(data / "d.jsonl", data / "images", data / "ar", num_shards=3)


def test_write_array_records_from_iterator(tmp_path):
    samples = ({"id": str(i), "conversations": [], "images": [bytes([i]) * i]} for i in range(10))
    stats = write_array_records(samples, tmp_path, num_shards=4, num_threads=1)
    ar = ArrayRecordSource(tmp_path)
    assert stats.samples == 10 and len(ar) == 10
    got = {ar[i]["id"]: ar[i]["images"] for i in range(10)}  # round-robin: order differs
    assert got == {str(i): [bytes([i]) * i] for i in range(10)}


def test_tfds_round_trip_without_tensorflow(data, capsys):
    with pytest.raises(ImportError):
        importlib.import_module("tensorflow")
    from lladav_jax.data.sources.tfds import TfdsSource, build_tfds

    src = LlavaJsonSource(data / "d.jsonl", data / "images")
    path = build_tfds(data / "tfds", data / "d.jsonl", data / "images")
    assert path == str(data / "tfds" / "llava" / "d" / "1.0.0")
    assert "1 images missing in 1 samples" in capsys.readouterr().out
    for where in (path, data / "tfds"):  # the version dir, or the --out dir above it
        ds = TfdsSource(where)
        assert len(ds) == len(src)
        for i in range(len(src)):
            assert ds[i] == with_file_bytes(src[i]), i
    by_name = TfdsSource("llava/d", split="train", data_dir=data / "tfds")  # tfds.data_source
    assert by_name[1] == ds[1]
    assert pickle.loads(pickle.dumps(ds))[1] == ds[1]
    # From any iterable of samples (here: with image bytes already in them).
    samples = [{"id": "m", "conversations": turns("<image>\nQ", "A"), "images": [b"\x89PNG.."]}]
    other = TfdsSource(build_tfds(data / "tfds2", samples=lambda: samples, name="mem"))
    assert other[0] == samples[0]
    assert "tensorflow" not in sys.modules


class ListSource:
    def __init__(self, name, n):
        self.name, self.items = name, [{"id": f"{name}{i}", "conversations": []} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_permute_index_is_a_bijection():
    for n in (1, 2, 3, 10, 1000, 1025):
        assert sorted(permute_index(i, n, 7) for i in range(n)) == list(range(n))
    assert [permute_index(i, 1000, 1) for i in range(20)] != [
        permute_index(i, 1000, 2) for i in range(20)
    ]


@pytest.mark.slow
def test_mixture_deterministic_and_weighted():
    sources = [ListSource("a", 1000), ListSource("b", 50), ListSource("c", 7000)]
    weights = [0.5, 0.3, 0.2]
    mix = Mixture(sources, weights, seed=3, length=20_000)
    ids = [mix[i]["id"] for i in range(len(mix))]
    assert ids == [Mixture(sources, weights, seed=3, length=20_000)[i]["id"] for i in range(20_000)]
    assert ids != [Mixture(sources, weights, seed=4, length=20_000)[i]["id"] for i in range(20_000)]
    shuffled = list(range(20_000))
    np.random.default_rng(0).shuffle(shuffled)  # random access order does not matter
    assert [pickle.loads(pickle.dumps(mix))[i]["id"] for i in shuffled[:500]] == [
        ids[i] for i in shuffled[:500]
    ]
    origin = collections.Counter(mix[i]["_source"] for i in range(len(mix)))
    for name, w in zip("abc", weights):
        assert abs(origin[name] / len(mix) - w) < 1e-3
    # Upsampled "b" (50 items, ~6000 draws): every item ~120 times, none once more than another.
    counts = collections.Counter(i for i in ids if i.startswith("b"))
    assert len(counts) == 50 and max(counts.values()) - min(counts.values()) <= 1
    # Undersampled "c" (7000 items, ~4000 draws): no repeats, spread over the whole source.
    c = [int(i[1:]) for i in ids if i.startswith("c")]
    assert len(c) == len(set(c)) and abs(len(c) - 4000) <= 3 and max(c) > 6500
    # Default length: one pass worth of the summed sizes; works as a Grain source.
    assert len(Mixture(sources, weights)) == 8050
    assert grain.MapDataset.source(mix)[5] == mix[5]


def test_mixture_bad_weights():
    with pytest.raises(ValueError):
        Mixture([ListSource("a", 3)], [0.0])
    with pytest.raises(ValueError):
        Mixture([ListSource("a", 3), ListSource("b", 0)], [1.0, 1.0])


def test_cli(data, capsys):
    from lladav_jax.cli.data import main

    assert (
        main(
            [
                "pack-arrayrecord",
                "--data_path",
                str(data / "d.json"),
                "--image_folder",
                str(data / "images"),
                "--out",
                str(data / "cli_ar"),
                "--num_shards",
                "2",
            ]
        )
        == 0
    )
    assert len(ArrayRecordSource(data / "cli_ar")) == len(ROWS)
    assert (
        main(
            [
                "build-tfds",
                "--data_path",
                str(data / "d.json"),
                "--image_folder",
                str(data / "images"),
                "--out",
                str(data / "cli_tfds"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "5 samples" in out and "TfdsSource(" in out
    from lladav_jax.data.sources.tfds import TfdsSource

    assert TfdsSource(data / "cli_tfds")[0]["images"][0] == (data / "images/a.png").read_bytes()
    help_text = subprocess.run(
        [sys.executable, "-m", "lladav_jax.cli.data", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pack-arrayrecord" in help_text and "build-tfds" in help_text


def test_videos_travel_inside_shards_and_tfds(tmp_path):
    """A video sample's file is read from the video folder into the records (ArrayRecord and
    TFDS); a missing one is marked, one outside the folder kept as its path, never read."""
    from lladav_jax.data.sources.tfds import TfdsSource, build_tfds
    from lladav_jax.data.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", [np.full((32, 32, 3), 40 * k, np.uint8) for k in range(4)],
                fps=2)
    rows = [{"id": v, "video": f"{v}.mp4" if v != "out" else "../clip.mp4",
             "conversations": turns("<image>\nWhat?", "Red.")} for v in ("clip", "gone", "out")]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    stats = pack(tmp_path / "d.json", None, tmp_path / "shards", 1, 1, videos)
    assert (stats.videos, stats.missing_videos, stats.unsafe_paths) == (3, 1, 1)
    tfds_dir = build_tfds(tmp_path / "tfds", tmp_path / "d.json", video_folder=videos)
    want = (videos / "clip.mp4").read_bytes()
    for source in (ArrayRecordSource(tmp_path / "shards"), TfdsSource(tfds_dir)):
        clip, gone, out = (source[i] for i in range(3))
        assert clip["videos"] == [want] and "_missing_videos" not in clip
        assert gone["_missing_videos"] == [0] and gone["videos"][0].endswith("gone.mp4")
        assert out["_unsafe_videos"] == [0] and out["videos"] == ["../clip.mp4"]
