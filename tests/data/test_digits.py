"""The real-data demo's set (`lladav-data digits`): scikit-learn's digits as LLaVA JSON and
lladav-eval rows, read back by the data pipeline and the scorer."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from lladav_jax.cli import data as data_cli
from lladav_jax.data.digits import NAMES, QUESTION, load_digits
from lladav_jax.data.example import Example
from lladav_jax.data.sources.llava_json import LlavaJsonSource
from lladav_jax.inference.scoring import read_rows
from lladav_jax.train.config_check import check_config
from lladav_jax.train.inputs import load_tokenizer, make_featurizer

CONFIG = pathlib.Path(__file__).parents[2] / "configs" / "demo_digits.py"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert data_cli.main(["digits", "--out", str(out)]) == 0
    return out


def test_files(digits, capsys):
    train = json.loads((digits / "train.json").read_text())
    test = json.loads((digits / "test.json").read_text())
    assert (len(train), len(test)) == (1500, 297)
    assert not {s["id"] for s in train} & {s["id"] for s in test}
    images, labels = load_digits()
    for s in train[:20] + test[:20]:
        i = int(s["id"].split("-")[1])
        human, gpt = s["conversations"]
        assert human["value"] == f"<image>\n{QUESTION}" and gpt["value"] == NAMES[labels[i]]
        with Image.open(digits / s["image"]) as im:
            assert im.mode == "L" and im.size == (8, 8)
            np.testing.assert_array_equal(np.asarray(im), images[i])
    rows = read_rows(digits / "test.jsonl")
    assert [r["id"] for r in rows] == [s["id"] for s in test]
    assert [r["answer"] for r in rows] == [s["conversations"][1]["value"] for s in test]
    assert all(r["question"] == QUESTION for r in rows)
    # Every digit in both splits, ink dark on light paper.
    assert {s["conversations"][1]["value"] for s in test} == set(NAMES)
    assert images.mean() > 128


def test_the_demo_config_reads_it(digits):
    spec = importlib.util.spec_from_file_location("demo_digits", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.path, config.data.eval_path = str(digits / "train.json"), str(digits / "test.json")
    check_config(config)
    tok = load_tokenizer(config.tokenizer)
    featurize = make_featurizer(config, tok)
    source = LlavaJsonSource(config.data.path)
    examples = [featurize(source[i]) for i in range(16)]
    assert all(isinstance(ex, Example) for ex in examples)
    # The answer words are 1-4 tokens of the demo tokenizer: several are multi-token.
    lengths = {name: len(tok.encode(name)) for name in NAMES}
    assert max(lengths.values()) >= 3 and min(lengths.values()) == 1
