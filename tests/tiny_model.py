"""A random `tiny` model directory with the demo tokenizer: for tests of the commands and the
API that need a model to load, not a trained one."""

from __future__ import annotations

import pathlib

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.models import lladav, variants


def random_model_dir(root: pathlib.Path) -> pathlib.Path:
    """root/model: the tiny variant at seed 0, its tokenizer in root/tok."""
    load_demo_tokenizer().save(root / "tok")
    cfg = variants.model_config("tiny")
    modeldir.save_model_dir(root / "model", lladav.create(cfg, seed=0), cfg,
                            tokenizer_dir=root / "tok")
    return root / "model"
