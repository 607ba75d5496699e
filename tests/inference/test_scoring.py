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


def test_video_rows(tmp_path):
    """`video`: a path checked like `image`; `images`: another name for a list of images; a row
    with two of them is an error naming the line."""
    folder = tmp_path / "eval"
    (folder / "v").mkdir(parents=True)
    (folder / "v" / "clip.mp4").write_bytes(b"not decoded here")
    (folder / "a.png").write_bytes(b"a")
    (tmp_path / "out.mp4").write_bytes(b"outside")
    data = folder / "q.jsonl"

    def write(*rows):
        data.write_text("".join(json.dumps({"question": "q", "answer": "a", **r}) + "\n"
                                for r in rows))

    write({"video": "v/clip.mp4"}, {"images": ["a.png", "a.png"]}, {"image": "a.png"}, {})
    rows = scoring.read_rows(data)
    assert [r["_video"] for r in rows] == [folder / "v" / "clip.mp4", None, None, None]
    assert [r["_images"] for r in rows] == [[], [folder / "a.png"] * 2, [folder / "a.png"], []]
    bad = [
        ({"video": "v/none.mp4"}, r"q\.jsonl:2: video .*none\.mp4: no such file"),
        ({"video": "../out.mp4"}, r"q\.jsonl:2: video '\.\./out\.mp4' leaves the data file's"),
        ({"video": str(tmp_path / "out.mp4")}, r"q\.jsonl:2: video '.*out\.mp4' leaves"),
        ({"video": ["v/clip.mp4"]}, r"q\.jsonl:2: 'video' must be a path"),
        ({"video": "v/clip.mp4", "image": "a.png"},
         r"q\.jsonl:2: a row gives 'image' and 'video': one of them at most"),
        ({"video": "v/clip.mp4", "images": ["a.png"]}, r"q\.jsonl:2: a row gives 'images' and"),
        ({"image": "a.png", "images": ["a.png"]}, r"q\.jsonl:2: a row gives 'image' and 'images'"),
        ({"images": ["a.png", "b.png"]}, r"q\.jsonl:2: image .*b\.png: no such file"),
    ]
    for row, message in bad:
        write({"video": "v/clip.mp4"}, row)
        with pytest.raises(ValueError, match=message):
            scoring.read_rows(data)


VIDEOMME_HEAD = ("Select the best answer to the following multiple-choice question based on the "
                 "video. Respond with only the letter ({}) of the correct option.\n")
MC = "Answer with the option's letter from the given choices directly."


def test_videomme_prompt():
    row = {"question": "What is shown?", "choices": ["a cat", "a dog", "a bird", "a fish"]}
    assert scoring.prompt_of(row, "videomme") == (
        VIDEOMME_HEAD.format("A, B, C, or D")
        + f"What is shown?\nA. a cat\nB. a dog\nC. a bird\nD. a fish\n{MC}")
    row["choices"].append("a frog")
    assert scoring.prompt_of(row, "videomme") == (
        VIDEOMME_HEAD.format("A, B, C, D, or E")
        + f"What is shown?\nA. a cat\nB. a dog\nC. a bird\nD. a fish\nE. a frog\n{MC}")
    # The default style is unchanged; a question without choices is asked as it is.
    assert scoring.prompt_of(row) == scoring.format_choices("What is shown?", row["choices"])
    assert scoring.prompt_of({"question": "Why?"}, "videomme") == "Why?"
    assert scoring.PRESETS["videomme"]["prompt"] == "videomme"
    assert scoring.PRESETS["videomme"]["uniform_frames"] is True
    with pytest.raises(ValueError, match="prompt style 'mme'"):
        scoring.prompt_of(row, "mme")


def test_lettered_choices_are_not_lettered_twice():
    """VideoMME's options come as "A. red": lettered once; a letter naming another position,
    or one not followed by text, is part of the choice."""
    lettered = ["A. red", "B. green", "(C) blue", "D: C. 3", "E.coli", "A. x"]
    assert scoring.prompt_of({"question": "Q?", "choices": lettered[:4]}, "videomme") == (
        VIDEOMME_HEAD.format("A, B, C, or D") + f"Q?\nA. red\nB. green\nC. blue\nD. C. 3\n{MC}")
    assert scoring.format_choices("Q?", lettered) == (
        f"Q?\nA. red\nB. green\nC. blue\nD. C. 3\nE. E.coli\nF. A. x\n{MC}")
    row = {"question": "Q?", "choices": lettered[:3], "answer": "green"}
    assert scoring.score(row, "green", "exact")["letter"] == "B"
    assert scoring.score(row, "B", "exact")["correct"]


def test_word_accuracy():
    """Words right at their place over the longer of the two; 1.0 exactly on an exact match."""
    answer = "a red circle and a blue square"
    assert scoring.word_accuracy("A red circle, and a blue square.", answer) == 1.0
    assert scoring.word_accuracy("a red square and a blue square", answer) == pytest.approx(6 / 7)
    assert scoring.word_accuracy("a red circle", answer) == pytest.approx(3 / 7)
    assert scoring.word_accuracy(answer + " and a green circle", answer) == pytest.approx(7 / 11)
    assert scoring.word_accuracy("red circle and a blue square", answer) == pytest.approx(0 / 7)
    assert scoring.word_accuracy("", answer) == 0.0
    assert scoring.word_accuracy("yes", ["no", "yes"]) == 1.0
    for prediction in ("a red circle", "a red circles", ""):
        exact = scoring.exact_match(prediction, answer)
        assert (scoring.word_accuracy(prediction, answer) == 1.0) == exact
