"""A prompt + answer longer than the model's positions fails up front, by name, in the Python
API and in lladav-generate (not as an allocation of gigabytes on the device)."""

import re

import pytest
from PIL import Image

from lladav_jax.cli import generate
from lladav_jax.inference import api
from tests.tiny_model import random_model_dir

FAST = dict(gen_length=8, block_length=4, steps=4)
LONG = "describe the red square " * 600  # ~2,400 words: over tiny's 2048 positions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("prompt_length"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (40, 40), (200, 20, 20)).save(path)
    return path


def test_the_api_names_the_lengths_and_the_maximum(model_dir, image):
    model = api.load(model_dir)
    assert model.max_positions == 2048  # tiny's text.max_position_embeddings
    with pytest.raises(ValueError) as e:
        model.generate(image, LONG, **FAST)
    m = re.fullmatch(r"the prompt is (\d+) tokens \((\d+) of them image tokens\) and the answer "
                     r"gen_length 8: more than the model's maximum of 2048 positions "
                     r"\(text.max_position_embeddings\); shorten the prompt or gen_length",
                     str(e.value))
    assert m, str(e.value)
    assert int(m[1]) + 8 > 2048 and int(m[2]) > 0
    # In a batch, the item that is too long is named.
    with pytest.raises(ValueError, match=r"^item 1: the prompt is"):
        model.generate_batch([(image, "What color?"), (image, LONG)], **FAST)


def test_generate_cli_says_so_in_one_line(model_dir, image, capsys):
    argv = ["--ckpt", str(model_dir), "--image", str(image), "--prompt", LONG,
            "--gen_length", "8", "--block_length", "4", "--steps", "4"]
    assert generate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lladav-generate: error: the prompt is ")
    assert "maximum of 2048 positions" in err
