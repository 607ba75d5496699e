"""Full LLaDA-V logits equal transformers' LLaVA-OneVision set up as LLaDA-V (fp32, tiny).

The reference is `LlavaOnevisionForConditionalGeneration` with a Llama text model made
bidirectional (all-zero 4-D mask), a SigLIP tower read at layer -2, anyres_max_4 and 36 grid
pinpoints. Our tiles were checked bit-exact against its image processor (test_image_layout), so
both models get the same tiles here.
"""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.data.image import process_image
from lladav_jax.data.layout import collate_visual, num_visual_tokens
from lladav_jax.models import hf_params, variants
from lladav_jax.models.lladav import LLaDAV
from tests.close import assert_close


@pytest.fixture(scope="module")
def models():
    cfg = variants.model_config("tiny")
    hf = ref.randomize(
        transformers.LlavaOnevisionForConditionalGeneration(ref.onevision_config(cfg)), scale=0.1
    )
    ours = LLaDAV(cfg, rngs=nnx.Rngs(0))
    hf_params.load_hf(ours, ref.official_from_onevision(hf, cfg), hf_params.lladav_entries(cfg),
                      cfg)
    return cfg, hf, ours


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_logits_match_llava_onevision(models):
    cfg, hf, ours = models
    u = cfg.vision.image_size // cfg.vision.patch_size
    wide, square = picture(230, 97, 1), picture(112, 112, 2)
    wide_p, square_p = process_image(wide, cfg), process_image(square, cfg)
    # The wide image fills a 5x2 grid: unpadded rows, then downsampled (20x8 > 1.1^2 * 4 * 4^2).
    assert wide_p.grid == (5, 2)
    assert wide_p.layout.num_tokens < u * u + 2 * u * (5 * u + 1)
    for w, h in ((230, 97), (112, 112)):  # transformers rounds unpadding like LLaDA-V here
        assert num_visual_tokens(w, h, cfg) == num_visual_tokens(w, h, cfg, hf_rounding=True)

    image_id = hf.config.image_token_index
    rng = np.random.default_rng(0)
    lengths, seq_len = [], 0
    rows = []
    for img, before, after in ((wide_p, 5, 9), (square_p, 3, 4)):
        v = img.layout.num_tokens
        text = rng.integers(0, image_id, before + after)
        rows.append((np.concatenate([text[:before], np.full(v, image_id), text[before:]]), before))
        lengths.append(before + v + after)
    seq_len = max(lengths) + 3
    tokens = np.zeros((2, seq_len), np.int64)
    valid = np.zeros((2, seq_len), np.int32)
    for i, (row, _) in enumerate(rows):
        tokens[i, : len(row)], valid[i, : len(row)] = row, 1
    visual = collate_visual(
        [[(wide_p, rows[0][1])], [(square_p, rows[1][1])]], cfg, seq_len
    )

    ours_logits = np.asarray(
        nnx.jit(lambda m, b: m(**b))(ours, dict(tokens=tokens, segment_ids=valid, **visual))
    )

    pixels = torch.from_numpy(visual["pixels"].transpose(0, 1, 4, 2, 3).copy())
    sizes = torch.tensor([[97, 230], [112, 112]])  # (height, width)
    with torch.no_grad():
        want = hf(
            input_ids=torch.from_numpy(tokens), pixel_values=pixels, image_sizes=sizes,
            attention_mask=ref.bidirectional_mask(valid),
        ).logits.numpy()
    assert_close(ours_logits[valid > 0], want[valid > 0])


@pytest.mark.slow
def test_newline_and_base_order_matter(models):
    """The visual tokens reach the text model: a changed tile changes the logits."""
    cfg, _, ours = models
    img = process_image(picture(150, 60, 3), cfg)
    v = img.layout.num_tokens
    tokens = np.zeros((1, v + 4), np.int64)
    batch = dict(tokens=tokens, **collate_visual([[(img, 2)]], cfg, v + 4))
    base = np.asarray(ours(**batch))
    batch["pixels"] = batch["pixels"].copy()
    batch["pixels"][0, 1] += 0.5  # first grid tile
    assert np.abs(np.asarray(ours(**batch)) - base).max() > 1e-4
    text_only = np.asarray(ours(tokens=tokens))
    assert np.abs(text_only - base).max() > 1e-4
