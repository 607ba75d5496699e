"""lmms-eval's `--model lladav` (inference/lmms.py) and the local task `lladav-data lmms-task`
writes (inference/lmms_task.py), on a tiny random model.

The end-to-end test runs lmms-eval's own command line, which finds the model through the entry
point this package installs, and checks it against lladav-eval on the same rows: the same
answer for every row and the same accuracy. Some rows take the model's own answer as their
reference, so that the accuracy compared is not 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from lmms_eval.api.instance import Instance

from lladav_jax.cli import data as data_cli
from lladav_jax.cli import eval as eval_cli
from lladav_jax.data import synthetic
from lladav_jax.inference import api, lmms, lmms_task
from lladav_jax.inference.scoring import prompt_of
from tests.inference.test_generate_api import write_eval_rows
from tests.tiny_model import random_model_dir

SETTINGS = dict(gen_length=8, block_length=4, steps=4)  # two blocks: small, still blocked


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return random_model_dir(tmp_path_factory.mktemp("lmms"))


@pytest.fixture(scope="module")
def adapter(model_dir) -> lmms.LladaV:
    return lmms.LladaV(pretrained=str(model_dir), batch_size=3)


def _request(lm: lmms.LladaV, doc: dict, gen_kwargs: dict, doc_id: int) -> Instance:
    """One generate_until request, as lmms-eval builds it, for `doc` of a task named "t"."""
    lm.task_dict.setdefault("t", {"test": {}})["test"][doc_id] = doc
    args = (doc["prompt"], dict(gen_kwargs), lmms_task.doc_to_visual, doc_id, "t", "test")
    return Instance("generate_until", args, 0, {"task": "t", "doc_id": doc_id, "repeats": 1})


def test_generate_until_follows_the_official_settings(adapter, tmp_path):
    """Settings in the official names (gen_steps, cfg) and ours; requests of two settings in
    one call; think_mode after questions that show an image only; stopping_criteria; answers in
    request order with their token counts."""
    png = tmp_path / "a.png"
    png.write_bytes(synthetic.make_sample(0, "test")["images"][0])
    docs = [{"prompt": f"What shape is this? ({i})", "images": [str(png)], "video": ""}
            for i in range(4)]
    docs.append({"prompt": "Say something.", "images": [], "video": ""})
    short = {"gen_length": 4, "block_length": 4, "gen_steps": 2, "cfg": 0.0,
             "think_mode": "no_think", "until": ["\n\n"], "max_new_tokens": 16}
    long = {"gen_length": 8, "block_length": 4, "steps": 4, "cache": "prefix",
            "stopping_criteria": ["e"]}
    requests = [_request(adapter, d, short if i % 2 else long, i) for i, d in enumerate(docs)]
    got = adapter.generate_until(requests)
    model = adapter.model
    for i, (doc, result) in enumerate(zip(docs, got, strict=True)):
        image = [str(png)] if doc["images"] else None
        if i % 2:
            want = model.generate(image, doc["prompt"] + (" /no_think" if image else ""),
                                  gen_length=4, block_length=4, steps=2, return_details=True)
            stops = ()
        else:
            want = model.generate(image, doc["prompt"], gen_length=8, block_length=4, steps=4,
                                  cache="prefix", return_details=True)
            stops = ("e",)
        assert result.text == lmms.clean_answer(want.text, stops)
        assert result.token_counts.output_tokens == len(want.ids)


def test_settings_and_answers_as_the_official_adapter():
    options, think, stops, ignored = lmms._setting(
        {"gen_steps": 4, "cfg": 0.5, "think_mode": "think", "stopping_criteria": "\n",
         "top_p": 1.0, "threshold": "none", "cache": "dual"})
    assert options == {"steps": 4, "cfg_scale": 0.5, "threshold": None, "cache": "dual"}
    assert (think, stops, ignored) == ("think", ("\n",), ["top_p"])
    with pytest.raises(ValueError, match="gen_steps and steps disagree"):
        lmms._setting({"gen_steps": 4, "steps": 8})
    with pytest.raises(ValueError, match="think_mode 'maybe'"):
        lmms._setting({"think_mode": "maybe"})
    assert lmms.clean_answer(" B.") == "B"
    assert lmms.clean_answer("red.\nThen blue.", ["\n"]) == "red"
    assert lmms.clean_answer("3.5..") == "3.5."  # one trailing "." only, as the official
    video = lmms._visual(["clip.mp4"])
    assert video.uniform and video.source == "clip.mp4"
    assert lmms._visual([]) is None and lmms._visual(None) is None
    with pytest.raises(ValueError, match="expected PIL images or one video path"):
        lmms._visual(["a.mp4", "b.mp4"])


def test_bad_model_arguments_and_requests(adapter, model_dir):
    with pytest.raises(TypeError, match=r"unknown model arguments \['colour'\]"):
        lmms.LladaV(pretrained=str(model_dir), colour="red")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        lmms.LladaV(pretrained=str(model_dir), batch_size=0)
    doc = {"prompt": "q", "images": [], "video": ""}
    with pytest.raises(ValueError, match="remasking"):
        adapter.generate_until([_request(adapter, doc, {"remasking": "sideways"}, 0)])
    with pytest.raises(NotImplementedError, match="generate_until"):
        adapter.loglikelihood([])


def test_task_files_and_their_faults(tmp_path):
    data = write_eval_rows(tmp_path, 2)
    task = lmms_task.write_task(data, tmp_path / "tasks", name="shapes", preset="chartqa")
    text = task.read_text()
    assert task.name == "shapes.yaml" and 'task: "shapes"' in text
    assert ('generation_kwargs: {"gen_length": 16, "block_length": 16, "gen_steps": 16, '
            '"temperature": 0.0, "remasking": "low_confidence"}') in text
    docs = [json.loads(line) for line in (tmp_path / "tasks" / "shapes.jsonl").read_text()
            .splitlines()]
    assert [d["metric"] for d in docs] == ["relaxed", "relaxed", "relaxed"]
    assert docs[-1]["prompt"].endswith("C. blue\nAnswer with the option's letter from the "
                                       "given choices directly.")
    assert all(pathlib.Path(p).is_absolute() and pathlib.Path(p).is_file()
               for d in docs for p in d["images"])
    with pytest.raises(ValueError, match="task name 'a b'"):
        lmms_task.write_task(data, tmp_path / "x", name="a b")
    with pytest.raises(ValueError, match="preset 'mmlu'"):
        lmms_task.write_task(data, tmp_path / "x", preset="mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'answer'"):
        lmms_task.write_task(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_lmms_eval_command_equals_lladav_eval(model_dir, tmp_path, capsys):
    """lmms-eval's CLI (`python -m lmms_eval --model lladav`, batch 4) on the task lladav-data
    writes, against lladav-eval (batch 3) on its rows: every answer and the accuracy agree."""
    rows_file = write_eval_rows(tmp_path, 6)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    rows.append({"question": "Name a colour.", "answer": "red"})
    model = api.load(model_dir)
    items = [([str(tmp_path / r["image"])] if "image" in r else None, prompt_of(r))
             for r in rows]
    own = model.generate_batch(items, **SETTINGS)
    for i in (0, 2, 4, 7):  # the model's own answers: right for both (6 is multiple choice)
        rows[i]["answer"] = own[i]
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    flags = [f"--{k}={v}" for k, v in SETTINGS.items()]
    out = tmp_path / "lladav_eval.jsonl"
    assert eval_cli.main(["--ckpt", str(model_dir), "--data", str(rows_file), "--out", str(out),
                          "--batch_size", "3", *flags]) == 0
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    accuracy = sum(r["correct"] for r in ours) / len(ours)
    assert accuracy >= 3 / len(ours)

    assert data_cli.main(["lmms-task", "--data", str(rows_file), "--out", str(tmp_path / "t"),
                          "--name", "shapes"]) == 0
    assert "--tasks shapes --include_path" in capsys.readouterr().out
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    gen = ",".join(f"{'gen_steps' if k == 'steps' else k}={v}" for k, v in SETTINGS.items())
    subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "lladav", "--model_args",
                    f"pretrained={model_dir}", "--batch_size", "4", "--tasks", "shapes",
                    "--include_path", str(tmp_path / "t"), "--gen_kwargs", gen,
                    "--output_path", str(tmp_path / "out"), "--log_samples"],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    (results,) = (tmp_path / "out").rglob("*_results.json")
    (samples,) = (tmp_path / "out").rglob("*_samples_shapes.jsonl")
    assert json.loads(results.read_text())["results"]["shapes"]["accuracy,none"] == \
        pytest.approx(accuracy)
    theirs = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(theirs) == len(ours)
    for mine, sample in zip(ours, theirs, strict=True):
        assert sample["filtered_resps"] == lmms.clean_answer(mine["prediction"])
        assert sample["accuracy"] == float(mine["correct"])
