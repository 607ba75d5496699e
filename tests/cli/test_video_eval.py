"""Videos from the command line, on a tiny random model (answers are gibberish; plumbing is what
is checked): `lladav-generate --video`, `lladav-eval --preset videomme` on video rows mixed with
an image row, and a video that does not decode as one error line naming it."""

import json

import numpy as np
import pytest
from PIL import Image

from lladav_jax.cli import errors, generate
from lladav_jax.cli import eval as eval_cli
from lladav_jax.data.video import write_video
from lladav_jax.inference import api, scoring
from tests.tiny_model import random_model_dir

SHORT = ["--gen_length", "2", "--block_length", "2", "--steps", "2"]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("video_eval"))


def _clip(path, colour, frames=4, fps=2) -> None:
    write_video(str(path), [np.full((32, 32, 3), colour, np.uint8)] * frames, fps)


def _one_error_line(err: str, prog: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert all(w in lines[0] for w in words), err
    assert "Traceback" not in err


def test_video_and_image_flags_exclude_each_other(tmp_path, capsys):
    argv = ["--ckpt", str(tmp_path / "none"), "--prompt", "q"]
    for extra, words in [(["--image", "a.png", "--video", "b.mp4"], ["--video", "--image"]),
                         (["--uniform_frames"], ["--uniform_frames needs --video"])]:
        with pytest.raises(SystemExit) as e:
            generate.main([*argv, *extra])
        assert e.value.code == 2
        _one_error_line(capsys.readouterr().err, "lladav-generate", *words)


def test_generate_video(model_dir, tmp_path, capsys, monkeypatch):
    _clip(tmp_path / "clip.mp4", (200, 30, 30))
    seen = []
    original = api.Model.generate_batch
    monkeypatch.setattr(api.Model, "generate_batch",
                        lambda self, items, **kw: seen.extend(items) or original(self, items, **kw))
    argv = ["--ckpt", str(model_dir), "--prompt", "What colour?", *SHORT, "--video",
            str(tmp_path / "clip.mp4")]
    assert generate.main([*argv, "--uniform_frames", "--output_ids"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(record["answer"], str) and len(record["tokens"]) == 2
    assert seen[-1][0] == api.Video(str(tmp_path / "clip.mp4"), uniform=True)
    assert generate.main(argv) == 0  # about a frame a second
    assert capsys.readouterr().out.endswith("\n")  # the answer's line (random: maybe empty)
    assert seen[-1][0] == api.Video(str(tmp_path / "clip.mp4"), uniform=False)
    # A file that is not a video: one line naming it, after the model is loaded.
    (tmp_path / "bad.mp4").write_bytes(b"this is not an mp4 file")
    assert generate.main([*argv[:-1], str(tmp_path / "bad.mp4")]) == 1
    _one_error_line(capsys.readouterr().err, "lladav-generate", "bad.mp4", "cannot open")


def test_eval_videomme(model_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "mme"
    (folder / "videos").mkdir(parents=True)
    _clip(folder / "videos" / "red.mp4", (200, 30, 30))
    _clip(folder / "videos" / "blue.mp4", (30, 30, 200), frames=6)
    Image.new("RGB", (40, 40), (30, 200, 30)).save(folder / "green.png")
    choices = ["A. red", "B. green", "C. blue", "D. black"]
    rows = [
        {"video": "videos/red.mp4", "question": "What colour is it?", "choices": choices,
         "answer": "A", "duration": "short"},
        {"video": "videos/blue.mp4", "question": "Which colour?", "answer": "C",
         "choices": [*choices[:3], "D. none"]},
        {"image": "green.png", "question": "And this?", "choices": choices, "answer": "B"},
    ]
    data = folder / "mme.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    original = api.Model.generate_batch
    monkeypatch.setattr(api.Model, "generate_batch",
                        lambda self, items, **kw: seen.append((items, kw)) or
                        original(self, items, **kw))
    out = tmp_path / "out.jsonl"
    argv = ["--ckpt", str(model_dir), "--data", str(data), "--out", str(out), "--preset",
            "videomme", "--batch_size", "3"]
    assert eval_cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("accuracy: ")
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 3
    for row, pred in zip(rows, preds, strict=True):
        assert {k: pred[k] for k in row} == row
        assert pred["metric"] == "multiple_choice" and isinstance(pred["correct"], bool)
        assert isinstance(pred["prediction"], str) and "letter" in pred
    # One batch of a video, a video and an image, asked in VideoMME's words, with the preset.
    ((items, kw),) = seen
    assert [v for v, _ in items] == [api.Video(folder / "videos" / "red.mp4", uniform=True),
                                     api.Video(folder / "videos" / "blue.mp4", uniform=True),
                                     [folder / "green.png"]]
    assert items[0][1] == scoring.prompt_of(rows[0], "videomme")
    assert items[0][1].startswith("Select the best answer") and "A. A." not in items[0][1]
    assert (kw["gen_length"], kw["block_length"], kw["steps"]) == (2, 2, 2)
    assert kw["temperature"] == 0 and kw["remasking"] == "low_confidence"
    # A video that does not decode: one line naming the data file, its line and the video.
    (folder / "videos" / "red.mp4").write_bytes(b"garbage")
    assert eval_cli.main([*argv, "--batch_size", "1"]) == 1
    _one_error_line(capsys.readouterr().err, "lladav-eval", "mme.jsonl (lines 1)", "red.mp4")
