"""What the benchmarks time our model on, with no torch: the train batch (`make_batch`: one
image per row, the answer filling the rest of the row), `JaxStep` (`make_train_step` jitted
with the state donated, as the trainer runs it) and the sampler's prompt (`image_prompt`).
benchmarks/train_step.py and sampler.py time them against PyTorch on the CPU;
benchmarks/accelerator.py on a GPU or TPU."""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from lladav_jax.data.image import process_image
from lladav_jax.data.layout import collate_visual
from lladav_jax.data.template import encode_prompt
from lladav_jax.train import optim
from lladav_jax.train.step import TrainState, make_train_step, split_accum

LRS = dict(vision=2e-6, connector=1e-5, llm=1e-5)  # stages 2-3: everything trains


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(lr=LRS, warmup_ratio=0.0, clip_norm=1.0, b1=0.9,
                                          b2=0.999, eps=1e-8, weight_decay=0.0))


# ----------------------------------------------------------------------------------- the batch


def make_batch(cfg, rows: int, seq_len: int, image_px: int, prompt: int = 40, seed: int = 0):
    """(bench cfg, batch of numpy arrays, info): one image per row, no padding.

    The bench cfg has max_tiles / max_visual_tokens set to what the image needs, so that the
    vision tower runs on the real tiles only (the trainer pads to `image.max_tiles`)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), np.uint8))
    proc = process_image(img, cfg)
    n_tiles, v = proc.tiles.shape[0], proc.layout.num_tokens
    if prompt + v + 16 > seq_len:
        raise SystemExit(f"seq_len {seq_len} too short for {v} visual tokens + text; use more")
    cfg = copy.deepcopy(cfg)
    cfg.image.max_tiles, cfg.image.max_visual_tokens = n_tiles, v
    vocab = cfg.text.vocab_size
    image_id, mask_id = vocab - 1, vocab - 2  # image_id: onevision_config's image_token_index
    tokens = rng.integers(0, vocab - 2, (rows, seq_len)).astype(np.int32)
    start = prompt // 2  # half the prompt before the image, half after
    tokens[:, start:start + v] = image_id
    targets = np.zeros((rows, seq_len), bool)
    targets[:, prompt + v:] = True  # the answer fills the rest of the row
    visual = collate_visual([[(proc, start)]] * rows, cfg, seq_len)
    batch = dict(
        tokens=tokens, targets=targets,
        positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        segment_ids=np.ones((rows, seq_len), np.int32), **visual,
    )
    info = dict(tiles_per_row=n_tiles, visual_tokens=v, answer_tokens=seq_len - prompt - v,
                mask_id=mask_id, image_id=image_id, image_hw=(image_px, image_px))
    return cfg, batch, info


# ------------------------------------------------------------------------------------- ours


class JaxStep:
    """`make_train_step` jitted with the state donated, as the trainer runs it (accum 1)."""

    def __init__(self, model, batch: dict, mask_id: int, head_chunk: int = 0):
        tx, _ = optim.make_optimizer(optim_config(), total_steps=1000)
        graphdef, trainable, frozen = nnx.split(model, optim.trainable_filter(LRS), ...)
        self.num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        self.frozen = frozen
        self.state = TrainState(jnp.int32(0), trainable, jax.jit(tx.init)(trainable),
                                jax.random.key(0))
        self.batch = jax.device_put(split_accum(batch, 1))
        jitted = jax.jit(make_train_step(graphdef, tx, mask_id, head_chunk=head_chunk),
                         donate_argnums=0)
        start = time.perf_counter()
        self.fn = jitted.lower(self.state, self.frozen, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.losses = []

    def __call__(self) -> None:
        self.state, m = self.fn(self.state, self.frozen, self.batch)
        jax.block_until_ready((self.state, m))
        self.losses.append(float(m["loss"]))


def image_prompt(cfg, tok, size: int):
    """One random size x size image and "What is in the image?", as one prompt: (the processed
    image, tokens [1, P], the image's start in them, the visual inputs of
    `LLaDAV.embed_inputs`)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8))
    img = process_image(image, cfg)
    tokens, starts = encode_prompt(tok, "What is in the image?", [img.layout.num_tokens])
    tokens = np.asarray(tokens, np.int32)[None]
    visual = collate_visual([[(img, starts[0])]], cfg, tokens.shape[1])
    return img, tokens, starts, visual
