"""The inference front ends: `lladav_jax.load(...).generate`, lladav-generate, lladav-eval and
the denoising-order picture, on a tiny random model (answers are gibberish; shapes, batching,
plumbing and scoring are what is checked)."""

import dataclasses
import io
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

from lladav_jax.checkpoints import modeldir
from lladav_jax.cli import eval as eval_cli
from lladav_jax.cli import generate
from lladav_jax.data import synthetic
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.template import DEFAULT_SYSTEM_PROMPT
from lladav_jax.diffusion.options import SamplerOptions
from lladav_jax.inference import api, scoring
from lladav_jax.inference.visualize import denoising_order_png
from lladav_jax.models import lladav, variants
from lladav_jax.scale import sharding

# Two blocks of 4, two steps each: small programs, still more than one block.
FAST = dict(gen_length=8, block_length=4, steps=4)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tok = load_demo_tokenizer()
    tok.save(root / "tok")
    cfg = variants.model_config("tiny")
    model = lladav.create(cfg, seed=3)
    modeldir.save_model_dir(root / "model", model, cfg, tokenizer_dir=root / "tok")
    # A training workdir: config + tokenizer at the top, parameters under checkpoints/STEP.
    work = root / "work"
    step = modeldir.save_model_dir(work / modeldir.CHECKPOINTS_DIR / "7", model, cfg)
    (step / modeldir.CONFIG_FILE).unlink()  # a step directory holds no config of its own
    (work / modeldir.CONFIG_FILE).write_text(modeldir.config_to_json(cfg))
    tok.save(work)
    return {"model": root / "model", "work": work, "root": root}


@pytest.fixture(scope="module")
def model(dirs):
    return api.load(dirs["model"])


def _png(index: int) -> bytes:
    return synthetic.make_sample(index, "test")["images"][0]


def _small(index: int) -> Image.Image:
    """A synthetic image shrunk to a few tiles (two full-size ones overflow `tiny`'s max_tiles)."""
    image = Image.open(io.BytesIO(_png(index)))
    return image.resize((image.width // 3, image.height // 3))


def _params(m: api.Model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(m.module, nnx.Param))]


def test_import_is_light():
    code = "import sys, lladav_jax as lv; assert 'jax' not in sys.modules; assert callable(lv.load)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_load_from_workdir_and_step_dir(dirs, model):
    want = _params(model)
    for path in (dirs["work"], dirs["work"] / modeldir.CHECKPOINTS_DIR / "7"):
        got = api.load(path)
        assert got.tokenizer.to_json() == model.tokenizer.to_json()
        for a, b in zip(want, _params(got), strict=True):
            np.testing.assert_array_equal(a, b)


def test_load_from_a_relative_path(dirs, model, monkeypatch):
    monkeypatch.chdir(dirs["work"].parent)
    got = api.load(dirs["work"].name)
    for a, b in zip(_params(model), _params(got), strict=True):
        np.testing.assert_array_equal(a, b)


def test_system_prompt_is_the_trained_one(dirs, model, tmp_path):
    """A training workdir answers under the system prompt it was trained with (train_config.json);
    a model directory, or a run on the plain template, under the official one."""
    work = dirs["work"]
    assert api.load(work).system_prompt == DEFAULT_SYSTEM_PROMPT  # no train_config.json
    assert model.system_prompt == DEFAULT_SYSTEM_PROMPT
    config = {"data": {"template": "llava_llada", "system_prompt": "Answer in one word."}}
    (tmp_path / modeldir.TRAIN_CONFIG_FILE).write_text(json.dumps(config))
    assert api.trained_system_prompt(tmp_path) == "Answer in one word."
    config["data"]["template"] = "plain"
    (tmp_path / modeldir.TRAIN_CONFIG_FILE).write_text(json.dumps(config))
    assert api.trained_system_prompt(tmp_path) == DEFAULT_SYSTEM_PROMPT
    # The prompt reaches the tokens: a different system prompt gives a different prompt.
    a = model._encode(None, "Hi?", model.system_prompt).tokens
    b = model._encode(None, "Hi?", "Answer in one word.").tokens
    assert len(a) != len(b)


def test_sampler_defaults_follow_the_training(dirs, model, tmp_path, monkeypatch):
    """A model trained with EOS padding (data.answer_window > 0) decodes with allow_eos unless
    a call says otherwise; the official recipe, or no train_config.json, keeps EOS forbidden.
    lladav-generate passes --allow_eos only when given."""
    assert model.sampler_defaults == {} and api.sampler_defaults({"answer_window": 0}) == {}
    work = tmp_path / "work"
    shutil.copytree(dirs["work"], work)
    (work / modeldir.TRAIN_CONFIG_FILE).write_text(json.dumps({"data": {"answer_window": 24}}))
    trained = api.load(work)
    assert trained.sampler_defaults == {"allow_eos": True}
    seen = []
    real = api.Model._sampler
    monkeypatch.setattr(api.Model, "_sampler",
                        lambda self, o, s: seen.append(o.allow_eos) or real(self, o, s))
    trained.generate(None, "Hi?", **FAST)
    trained.generate(None, "Hi?", allow_eos=False, **FAST)
    model.generate(None, "Hi?", **FAST)
    assert seen == [True, False, False]
    parse = generate._parser().parse_args
    base = ["--ckpt", "x", "--prompt", "p"]
    assert "allow_eos" not in generate.sampler_options(parse(base))
    assert generate.sampler_options(parse([*base, "--no-allow_eos"]))["allow_eos"] is False
    assert generate.sampler_options(parse([*base, "--allow_eos"]))["allow_eos"] is True


def test_load_on_a_mesh_places_by_the_runs_rules(dirs, tmp_path):
    """With a mesh, the parameters are placed by the training run's mesh.rules (its
    train_config.json), or by the rules given."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = lambda m: m.module.llm.embed.embedding[...].sharding.spec
    assert spec(api.load(dirs["work"], mesh)) == P("tensor", "fsdp")  # no train_config.json
    work = shutil.copytree(dirs["work"], tmp_path / "work")
    config = {"mesh": {"data": 2, "fsdp": 2, "tensor": 2, "rules": [["embed", None]]}}
    (work / modeldir.TRAIN_CONFIG_FILE).write_text(json.dumps(config))
    assert spec(api.load(work, mesh)) == P("tensor", None)
    assert spec(api.load(work, mesh, rules=sharding.DEFAULT_RULES)) == P("tensor", "fsdp")


def test_sampler_defaults_are_the_sampler_options(model):
    """One definition: the CLI's defaults and Model.generate's options are SamplerOptions',
    but for those the loaded model decides (MODEL_DEFAULTS)."""
    args = generate._parser().parse_args(["--ckpt", "d", "--prompt", "p"])
    assert generate.MODEL_DEFAULTS == ("allow_eos",)
    assert generate.sampler_options(args) == {
        k: v for k, v in dataclasses.asdict(SamplerOptions()).items() if k != "allow_eos"}
    assert SamplerOptions(**generate.sampler_options(args)) == SamplerOptions()
    with pytest.raises(TypeError, match=r"\['gen_len'\]; the sampler's options are \['gen_len"):
        model.generate(None, "Hi?", gen_len=8)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_generate_each_cache(model, cache, tmp_path):
    blocks = []
    g = model.generate(_png(0), "What color is the shape?", cache=cache, on_block=blocks.append,
                       return_details=True, **FAST)
    assert isinstance(g, api.Generation)
    assert g.tokens.shape == g.committed_at.shape == (FAST["gen_length"],)
    assert 0 < g.steps <= FAST["steps"]
    assert g.committed_at.max() < g.steps and g.committed_at.min() >= -1
    assert g.ids == [int(t) for t in g.tokens[: len(g.ids)]]
    assert model.tokenizer.eot_id not in g.ids
    assert [b.index for b in blocks] == [0, 1] and blocks[-1].text == g.text
    # Paths, bytes and PIL images are the same input; the answer text is the default result.
    # (on_block again: the same compiled sampler, a different callback.)
    path = tmp_path / "img.png"
    path.write_bytes(_png(0))
    for image in (path, str(path), Image.open(io.BytesIO(_png(0)))):
        text = model.generate(image, "What color is the shape?", cache=cache,
                              on_block=lambda _: None, **FAST)
        assert text == g.text


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_batch_equals_single(model, cache):
    # Rows 0 and 2 pad to the same length alone as in the batch (their sampler is compiled
    # once); row 1 is much shorter, so the batch pads it further than it is alone.
    items = [
        (_png(0), "What color is the shape?"),
        (None, "Say something."),
        ([_small(3), _small(4)], "Are the two pictures the same?"),
    ]
    batch = model.generate_batch(items, cache=cache, return_details=True, **FAST)
    for (images, prompt), b in zip(items, batch, strict=True):
        one = model.generate(images, prompt, cache=cache, return_details=True, **FAST)
        np.testing.assert_array_equal(one.tokens, b.tokens)
        assert one.text == b.text
        np.testing.assert_array_equal(one.committed_at, b.committed_at)


@pytest.mark.slow
def test_generate_cli(dirs, capsys, tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(_png(0))
    png = tmp_path / "order.png"
    common = ["--ckpt", str(dirs["work"]), "--image", str(image), "--prompt", "What color?",
              "--gen_length", "8", "--block_length", "4", "--steps", "4", "--cache", "dual"]
    assert generate.main([*common, "--output_ids", "--order_png", str(png)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(record["tokens"]) == 8 and record["steps"] > 0
    assert record["ids"] == record["tokens"][: len(record["ids"])]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert generate.main([*common, "--stream"]) == 0  # streamed blocks add up to the answer
    assert capsys.readouterr().out.rstrip("\n") == record["answer"].rstrip("\ufffd")


def write_eval_rows(folder: pathlib.Path, n: int) -> pathlib.Path:
    data = folder / "llava.jsonl"
    synthetic.write_llava_json(data, folder / "images", n, split="test")
    rows = []
    for r in map(json.loads, data.read_text().splitlines()):
        question = r["conversations"][0]["value"].replace("<image>\n", "")
        rows.append({"image": f"images/{r['image']}", "question": question,
                     "answer": r["answer"], "question_type": r["question_type"]})
    rows.append({"image": rows[0]["image"], "question": "Which color?",
                 "choices": ["red", "green", "blue"], "answer": "B"})
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_cli(dirs, capsys, tmp_path):
    data = write_eval_rows(tmp_path, 4)
    out = tmp_path / "out" / "pred.jsonl"
    argv = ["--ckpt", str(dirs["model"]), "--data", str(data), "--out", str(out),
            "--batch_size", "3", "--gen_length", "4", "--block_length", "4", "--steps", "2"]
    assert eval_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("accuracy: ")
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(preds) == len(rows) == 5
    for row, pred in zip(rows, preds, strict=True):
        assert {k: pred[k] for k in row} == row
        assert isinstance(pred["prediction"], str) and isinstance(pred["correct"], bool)
    assert preds[-1]["metric"] == "multiple_choice" and "letter" in preds[-1]
    accuracy = sum(p["correct"] for p in preds) / len(preds)
    assert f"accuracy: {accuracy:.4f}" in printed


def test_eval_bad_rows_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing key 'answer'"):
        scoring.read_rows(bad)
    bad.write_text('{"question": "q", "answer": "a", "image": "nope.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: image .*nope.png: no such file"):
        scoring.read_rows(bad)
    bad.write_text('{"question": "q", "answer": "E", "choices": ["x", "y"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: answer 'E'"):
        scoring.read_rows(bad)


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"), ("(C)", "C"), ("A.", "A"), ("The answer is B.", "B"), ("Answer: (C)", "C"),
        ("green", "B"), ("Green.", "B"), ("B. green", "B"), ("(A) red", "A"),
        ("It is blue, I think", "C"), ("I'd say C", "C"), ("", None), ("red or green", None),
        ("E", None),
    ],
)
def test_extract_letter(prediction, letter):
    assert scoring.extract_letter(prediction, ["red", "green", "blue"]) == letter


def test_answer_letter_and_choice_prompt():
    choices = ["red", "green", "blue"]
    assert [scoring.answer_letter(a, choices) for a in ("B", "(C)", "red", 1)] == list("BCAB")
    assert scoring.format_choices("Color?", choices).startswith("Color?\nA. red\nB. green\nC. ")


def test_exact_and_relaxed_match():
    assert scoring.exact_match("  The  Cat. ", "the cat")
    assert scoring.exact_match("yes", ["No", "Yes"]) and not scoring.exact_match("cat", "cats")
    relaxed = scoring.relaxed_match
    assert relaxed("104", "100") and relaxed("95.5", "100") and not relaxed("106", "100")
    assert relaxed("1,050", "1000") and relaxed("12%", "0.12") and relaxed("42.", "42")
    assert relaxed("0", "0") and not relaxed("0.01", "0")  # a zero answer needs an exact match
    assert relaxed("Blue!", "blue") and not relaxed("red", "blue")


def test_presets_follow_the_paper():
    p = scoring.PRESETS
    triples = {k: (v["gen_length"], v["block_length"], v["steps"]) for k, v in p.items()}
    assert triples == {"multiple_choice": (2, 2, 2), "chartqa": (16, 16, 16),
                       "docvqa": (32, 32, 16), "infovqa": (32, 32, 16),
                       "mathvista": (96, 96, 48), "mathverse": (64, 64, 32),
                       "videomme": (2, 2, 2)}
    assert all(v["temperature"] == 0 and v["remasking"] == "low_confidence" for v in p.values())


def test_order_png(tmp_path):
    tok = load_demo_tokenizer()
    tokens = np.array([*tok.encode("a red circle and a blue square"), tok.eot_id, tok.mask_id])
    committed = np.arange(tokens.size)[::-1].copy()
    committed[-1] = -1
    path = denoising_order_png(tokens, committed, tok, tmp_path / "o.png")
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


def test_flags_override_preset():
    args = eval_cli._parser().parse_args(
        ["--ckpt", "d", "--data", "x", "--out", "y", "--preset", "docvqa", "--steps", "8"])
    preset = {k: v for k, v in scoring.PRESETS[args.preset].items() if k != "metric"}
    options = generate.sampler_options(args, preset)
    assert (options["gen_length"], options["block_length"], options["steps"]) == (32, 32, 8)
    assert options["cache"] == "none" and options["threshold"] is None
