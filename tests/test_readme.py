"""Every command README.md shows works as shown.

The ```bash blocks are split into commands (continuation lines joined, comments dropped, `&&`
chains split). Each command either runs here, as a subprocess in a temporary directory, in the
README's order, or is listed in NOT_RUN with the reason. A README command in neither list fails
the test, and so does a NOT_RUN entry that the README no longer shows. The ```python blocks
then run as one script in the same directory.

Substitutions, the README's placeholders made real in the temporary directory:
- the quickstart's `lladav-train ... --workdir /tmp/lladav-demo` trains a smoke run
  (`--config.train.steps=20`, as configs/demo.py's docstring shows) into `WORKDIR` in the
  temporary directory, and every `WORKDIR` (in commands and in the Python example) is that
  directory's absolute path;
- `LLaDA-V` (the official release) is a float32 export of that run, and `LLaDA-8B-Instruct` /
  `siglip2-so400m-patch14-384` its language and vision parts in those releases' layouts;
- `shapes.png`, `a.png` are synthetic images, `questions.jsonl` three synthetic questions,
  `data.json` + `img/` a synthetic LLaVA data set;
- `configs/...` paths point into the repository;
- `lladav-serve` (SERVER) runs in the background on a free port until the Python examples,
  whose OpenAI client calls it, have run.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from lladav_jax.checkpoints import hf_convert, safetensors_io
from lladav_jax.data import synthetic
from lladav_jax.models import hf_params

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SMOKE = "--config.train.steps=20"
SMOKE_EVAL = "--config.data.eval_size=32"  # the end-of-training report on 32 held-out samples

INSTALLED = "installs packages: this test runs in the environment those commands set up"
MEDIA = ("needs a model that takes several tiles (the smoke run's demo takes one); "
         "tests/cli/test_video_eval.py runs these on a tiny model")
DIGITS = ("the real-data demo (minutes of training): tests/data/test_digits.py writes the set, "
          "tests/train/test_answer_length_digits.py trains a shorter run and runs lladav-eval "
          "on it")
NOT_RUN = {
    "lladav-data digits --out /tmp/lladav-digits": DIGITS,
    "lladav-train --config configs/demo_digits.py --workdir /tmp/lladav-digits-run": DIGITS,
    "lladav-eval --ckpt /tmp/lladav-digits-run --data /tmp/lladav-digits/test.jsonl "
    "--out /tmp/lladav-digits-answers.jsonl": DIGITS,
    "pip install torch==2.13.0": INSTALLED,
    "pip install -e .[test]": INSTALLED,
    "pip install --no-deps lmms-eval>=0.7.3,<0.8": INSTALLED,
    "ruff check .": "CI's lint step: .ci/run runs it before the tests",
    "python -m pytest -q tests": "the whole test suite, this test included",
    "python -m pytest -q -m not slow tests": "the quick subset of the suite; CI runs it all",
    "lladav-plan --config configs/stage2a.py --topology v5p-64":
        "compiles the 8B training step for 32 simulated chips (minutes of CPU); "
        "tests/test_plan.py runs lladav-plan",
    "lladav-train --config configs/lora.py --workdir /ckpt/my-lora --config.init_from=lladav-8b "
    "--config.tokenizer=lladav-8b --config.data.path=train.json --config.quantize.weights=int4":
        "trains the 8B model; tests/train/test_lora.py runs LoRA and QLoRA on the tiny one",
    "lladav-generate --ckpt WORKDIR --image a.png --image b.png --prompt Which image is red?":
        MEDIA,
    "lladav-generate --ckpt WORKDIR --video clip.mp4 --prompt Which way does the square move?":
        MEDIA,
    "lladav-eval --ckpt WORKDIR --data videos.jsonl --out predictions.jsonl --preset videomme":
        MEDIA,
}


def readme_blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def readme_commands() -> list[list[str]]:
    """Every command of the bash blocks as words, `&&` chains split, in README order."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


def key(words: list[str]) -> str:
    return " ".join(words)


# --- The placeholders ------------------------------------------------------------------------


def write_inputs(root: pathlib.Path) -> None:
    """shapes.png, a.png, questions.jsonl (+ its images), data.json + img/."""
    for name, index in (("shapes.png", 0), ("a.png", 1)):
        (root / name).write_bytes(synthetic.make_sample(index, "test")["images"][0])
    rows = []
    for i in range(3):
        sample = synthetic.make_sample(10 + i, "test")
        (root / f"q{i}.png").write_bytes(sample["images"][0])
        question = sample["conversations"][0]["value"].replace("<image>\n", "")
        rows.append({"image": f"q{i}.png", "question": question, "answer": sample["answer"]})
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    synthetic.write_llava_json(root / "data.json", root / "img", 8)


def official_release(root: pathlib.Path) -> None:
    """LLaDA-V: the smoke run in the official layout."""
    hf_convert.export_hf(root / "WORKDIR", root / "LLaDA-V", dtype="float32", progress=False)


def stage1_parts(root: pathlib.Path) -> None:
    """LLaDA-8B-Instruct (HF-port names, LLaDA config) and a SigLIP vision model (names and
    config as transformers saves a SiglipVisionModel), split from the exported release."""
    release = root / "LLaDA-V"
    config = json.loads((release / "config.json").read_text())
    tensors = safetensors_io.open_checkpoint(release)
    llm = {k: t for k, t in tensors.items() if hf_params.llada_key(k) == k}
    vp = hf_params.VISION_PREFIX
    vision = {k.removeprefix(vp): t for k, t in tensors.items()
              if k.startswith(vp) and "post_layernorm" not in k}
    v = config["vision_config"]
    siglip = {"model_type": "siglip_vision_model", "hidden_size": v["hidden_size"],
              "num_hidden_layers": v["num_layers"], "num_attention_heads": v["num_heads"],
              "intermediate_size": v["intermediate_size"], "image_size": v["image_size"],
              "patch_size": v["patch_size"], "layer_norm_eps": v["layer_norm_eps"]}
    for name, part, part_config in (
        ("LLaDA-8B-Instruct", llm, {**config, "model_type": "llada"}),
        ("siglip2-so400m-patch14-384", vision, siglip),
    ):
        out = root / name
        out.mkdir()
        safetensors_io.write_sharded(
            out, [safetensors_io.pending(k, np.asarray(t)) for k, t in part.items()])
        (out / "config.json").write_text(json.dumps(part_config))
    shutil.copy(release / "tokenizer.json", root / "LLaDA-8B-Instruct")


# Run just before the command (they need the smoke run, which the quickstart makes).
PREPARE: dict[str, Callable[[pathlib.Path], None]] = {
    "lladav-convert import-hf --hf_dir LLaDA-V --out lladav-8b": official_release,
    "lladav-convert import-hf --llm LLaDA-8B-Instruct --vision siglip2-so400m-patch14-384 "
    "--out init": stage1_parts,
}


# Started in the background and left running for the Python examples (the OpenAI client's),
# on a free port instead of 8000, compiling one batch shape instead of eight (one row, prompts
# up to 128 tokens: the example's is about 60).
SERVER = ("lladav-serve --ckpt WORKDIR --port 8000 --gen_length 32 --steps 32 --block_length 32 "
          "--cache dual --threshold 0.9")
SERVER_PORT = "8000"


def substitute(words: list[str], root: pathlib.Path) -> list[str]:
    workdir = str(root / "WORKDIR")
    out = [str(REPO / w) if w.startswith("configs/") else w for w in words]
    out = [workdir if w in ("WORKDIR", "/tmp/lladav-demo") else w.replace("=WORKDIR",
                                                                           f"={workdir}")
           for w in out]
    if out[0] == "lladav-train":
        out += [SMOKE, SMOKE_EVAL]
    return out


# --- What each run must leave ---------------------------------------------------------------


def train_outputs(root: pathlib.Path, stdout: str) -> None:
    work = root / "WORKDIR"
    for name in ("metrics.jsonl", "tensorboard", "loss.png", "eval.json", "checkpoints"):
        assert (work / name).exists(), f"the README says the demo run writes {name}"
    assert json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 20


def hf_directory(path: pathlib.Path, dtype: str) -> None:
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == dtype
    assert safetensors_io.open_checkpoint(path)


def assert_nonempty(path: pathlib.Path) -> None:
    assert path.is_dir() and any(path.iterdir()), f"{path} is empty"


def model_directory(path: pathlib.Path) -> None:
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()


def adapter_directory(path: pathlib.Path) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert (path / "adapter_model.safetensors").exists()


def eval_outputs(root: pathlib.Path, stdout: str) -> None:
    rows = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("prediction" in r for r in rows)
    assert "accuracy" in stdout


def lmms_outputs(root: pathlib.Path, stdout: str) -> None:
    (results,) = (root / "lmms-out").rglob("*_results.json")
    accuracy = json.loads(results.read_text())["results"]["shapes"]["accuracy,none"]
    assert 0 <= accuracy <= 1 and "shapes" in stdout


def model_counts(root: pathlib.Path, stdout: str) -> None:
    """The 8b row of the README's variant table is what the command prints."""
    (row,) = [line for line in README.read_text().splitlines() if line.startswith("| `8b`")]
    counts = re.findall(r"\d{1,3}(?:,\d{3})+", row)
    assert len(counts) == 3 and all(c in stdout for c in counts), (counts, stdout)


CHECKS: dict[str, Callable[[pathlib.Path, str], None]] = {
    "lladav-train --config configs/demo.py --workdir /tmp/lladav-demo": train_outputs,
    "lladav-data pack-arrayrecord --data_path data.json --image_folder img/ --video_folder "
    "videos/ --out shards/ --num_shards 64": lambda root, _: assert_nonempty(root / "shards"),
    "lladav-data build-tfds --data_path data.json --image_folder img/ --out tfds/":
        lambda root, _: assert_nonempty(root / "tfds"),
    "lladav-convert import-hf --hf_dir LLaDA-V --out lladav-8b":
        lambda root, _: model_directory(root / "lladav-8b"),
    "lladav-convert import-hf --llm LLaDA-8B-Instruct --vision siglip2-so400m-patch14-384 "
    "--out init": lambda root, _: model_directory(root / "init"),
    "lladav-convert export-hf --ckpt WORKDIR --out LLaDA-V-finetuned --dtype bfloat16":
        lambda root, _: hf_directory(root / "LLaDA-V-finetuned", "bfloat16"),
    "lladav-eval --ckpt WORKDIR --data questions.jsonl --out predictions.jsonl --preset chartqa":
        eval_outputs,
    "python -m lladav_jax.models 8b": model_counts,
    "lladav-data lmms-task --data questions.jsonl --out lmms-tasks --name shapes --preset "
    "multiple_choice": lambda root, _: assert_nonempty(root / "lmms-tasks"),
    "python -m lmms_eval --model lladav --model_args pretrained=WORKDIR --batch_size 8 --tasks "
    "shapes --include_path lmms-tasks --output_path lmms-out": lmms_outputs,
    "lladav-convert export-hf --ckpt demo-lora --out demo-lora-peft --adapter_only":
        lambda root, _: adapter_directory(root / "demo-lora-peft"),
    "lladav-convert import-hf --adapter demo-lora-peft --base lladav-8b --out demo-lora-again":
        lambda root, _: model_directory(root / "demo-lora-again"),
}


# --- The tests ----------------------------------------------------------------------------------


def test_every_command_is_run_or_explained():
    shown = {key(c) for c in readme_commands()}
    assert shown, "no ```bash blocks found in README.md"
    assert not set(NOT_RUN) - shown, f"no longer in the README: {set(NOT_RUN) - shown}"
    for name in (PREPARE, CHECKS):
        assert not set(name) - shown, f"no longer in the README: {set(name) - shown}"
    # The quickstart's two commands are what CI runs: they must stay as they are.
    blocks = readme_blocks("bash")
    assert blocks[0].strip() == ("pip install torch==2.13.0 && pip install -e \".[test]\" && "
                                 "lladav-train --config configs/demo.py --workdir /tmp/lladav-demo")
    lmms = '"lmms-eval>=0.7.3,<0.8"'
    assert blocks[1].strip() == ("pip install torch==2.13.0 && pip install -e \".[test]\" && "
                                 f"pip install --no-deps {lmms} && ruff check . && "
                                 "python -m pytest -q tests")
    ci = (REPO / ".ci" / "run").read_text()
    assert "ruff check ." in ci and "python -m pytest -q tests" in ci
    assert f"pip install -q --no-deps {lmms}" in ci


def architecture_map_paths() -> list[str]:
    """The paths the README's architecture map names: every line starts with a file or folder
    name, nested by two spaces a level."""
    text = README.read_text().split("## Architecture map", 1)[1]
    block = re.search(r"^```\n(.*?)^```", text, re.S | re.M).group(1)
    paths, stack = [], []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth, name = (len(line) - len(line.lstrip())) // 2, line.split()[0]
        stack[depth:] = [name.rstrip("/")]
        paths.append("/".join(stack) + ("/" if name.endswith("/") else ""))
    return paths


def test_architecture_map_names_existing_paths():
    paths = architecture_map_paths()
    assert "lladav_jax/models/config.py" in paths and "lladav_jax/cli/" in paths
    missing = [p for p in paths if not (REPO / p).exists()
               or (p.endswith("/") != (REPO / p).is_dir())]
    assert not missing, f"README's architecture map names what the repository lacks: {missing}"
    # Every package folder of lladav_jax is on the map.
    packages = {str(d.relative_to(REPO)) + "/" for d in (REPO / "lladav_jax").rglob("*")
                if d.is_dir() and (d / "__init__.py").exists()}
    assert not packages - set(paths), f"not on the map: {packages - set(paths)}"


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """One CPU device, as on a laptop (conftest simulates 8 for the sharding tests)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def _run(args: list[str], root: pathlib.Path, env: dict) -> str:
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"{shlex.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
        f"{done.stderr[-4000:]}")
    return done.stdout


@contextlib.contextmanager
def background(args: list[str], root: pathlib.Path, env: dict) -> Iterator[str]:
    """The README's server, started and stopped around the rest; yields its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = [port if a == SERVER_PORT else a for a in args] + ["--max_batch", "1",
                                                               "--prompt_lengths", "128"]
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            assert proc.poll() is None, f"{shlex.join(args)} stopped:\n{log.read_text()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_commands_run_as_shown(tmp_path, env):
    write_inputs(tmp_path)
    # lmms-eval reads its task through Hugging Face datasets: its cache here, nothing fetched.
    env = {**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    ran = []
    with contextlib.ExitStack() as stack:
        port = None
        for words in readme_commands():
            k = key(words)
            if k in NOT_RUN:
                continue
            if k in PREPARE:
                PREPARE[k](tmp_path)
            if k == SERVER:
                port = stack.enter_context(background(substitute(words, tmp_path), tmp_path,
                                                      env))
                continue
            stdout = _run(substitute(words, tmp_path), tmp_path, env)
            if k in CHECKS:
                CHECKS[k](tmp_path, stdout)
            ran.append(k)
        assert ran[0].startswith("lladav-train"), "the smoke run must come first: the rest read it"
        assert len(ran) >= 8 and port is not None, "the README no longer starts lladav-serve"

        # The Python examples, in the same directory: WORKDIR is the smoke run, the OpenAI
        # client talks to the server above.
        script = "\n".join(readme_blocks("python"))
        assert 'lv.load("WORKDIR")' in script and f"127.0.0.1:{SERVER_PORT}/v1" in script
        script = script.replace('"WORKDIR"', repr(str(tmp_path / "WORKDIR")))
        script = script.replace(f"127.0.0.1:{SERVER_PORT}/", f"127.0.0.1:{port}/")
        _run([sys.executable, "-c", script], tmp_path, env)
