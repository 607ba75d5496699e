"""Eval rows (`scoring.read_rows`): an image path that leaves the data file's folder is an
up-front error naming the file and line, and its file is never opened."""

import json

import pytest

from lladav_jax.inference import scoring


def write_rows(path, *images) -> None:
    path.write_text("".join(json.dumps({"question": "q", "answer": "a", "image": image}) + "\n"
                            for image in images))


def test_image_paths_stay_in_the_data_folder(tmp_path):
    folder = tmp_path / "eval"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "in.png").write_bytes(b"inside")
    outside = tmp_path / "outside.png"  # a real file: refused for where it is, not as missing
    outside.write_bytes(b"outside")
    data = folder / "q.jsonl"
    write_rows(data, "img/in.png", str(folder / "img" / "in.png"), ["img/x/../in.png"])
    rows = scoring.read_rows(data)
    assert [r["_images"] for r in rows] == [[folder / "img" / "in.png"]] * 3
    for n, bad in enumerate(["../outside.png", str(outside), "img/../../outside.png"], 2):
        write_rows(data, "img/in.png", *(["img/in.png"] * (n - 2)), bad)
        with pytest.raises(ValueError, match=rf"q\.jsonl:{n}: image '.*outside\.png' leaves "
                                             "the data file's folder"):
            scoring.read_rows(data)
    write_rows(data, ["img/in.png", 3])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: 'image' must be a path"):
        scoring.read_rows(data)
