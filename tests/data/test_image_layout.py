"""AnyRes preprocessing and visual layout against transformers' LLaVA-OneVision reference.

transformers writes sizes and grid pinpoints as (height, width); we (like LLaVA) use
(width, height), so every comparison swaps the pairs.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from transformers.models.llava_onevision.processing_llava_onevision import (
    LlavaOnevisionProcessor,
)

from lladav_jax.data.image import grid_pinpoints, process_image, select_best_resolution
from lladav_jax.data.layout import (
    NEWLINE,
    anyres_layout,
    best_grid,
    collate_visual,
    num_visual_tokens,
)
from lladav_jax.models.variants import model_config

CFG_8B = model_config("8b")
CFG_TINY = model_config("tiny")  # tile 56 -> 4x4 tokens per tile

SIZES = [  # (width, height)
    (384, 384), (1, 1), (10, 10), (10000, 50), (50, 10000), (2000, 1500), (1500, 2000),
    (640, 480), (1024, 768), (800, 300), (300, 800), (1920, 1080), (3000, 3000), (500, 2000),
    (123, 457), (2304, 384), (769, 385), (4000, 100),
]  # fmt: skip


def _hf_pinpoints(cfg):
    return [[h, w] for w, h in grid_pinpoints(cfg.vision.image_size, cfg.image.max_grid)]


def _hf_processor(cfg):
    proc = object.__new__(LlavaOnevisionProcessor)  # no tokenizer needed for counting
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=_hf_pinpoints(cfg))
    proc.num_image_tokens = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    proc.vision_aspect_ratio = f"anyres_max_{cfg.image.max_num_patches}"
    return proc


def _hf_count(cfg, w, h):
    s = cfg.vision.image_size
    return _hf_processor(cfg)._get_number_of_features(h, w, s, s)


def test_pinpoints_match_transformers_default():
    assert len(grid_pinpoints(384, 6)) == 36
    # Same numbers as HF's default list; LLaVA reads them (w, h), HF (h, w).
    assert [list(p) for p in grid_pinpoints(384, 6)] == (
        LlavaOnevisionImageProcessorPil.image_grid_pinpoints
    )


def test_best_resolution_matches_transformers_including_ties():
    rng = np.random.default_rng(0)
    pins = grid_pinpoints(384, 6)
    hf_pins = LlavaOnevisionImageProcessorPil.image_grid_pinpoints  # HF's own (h, w) order
    sizes = [(w, h) for w in range(1, 2400, 37) for h in range(1, 2400, 41)]
    sizes += [tuple(int(v) for v in rng.integers(1, 12000, 2)) for _ in range(3000)]
    for w, h in sizes:
        ours = select_best_resolution((w, h), pins)
        th, tw = hf_select((h, w), hf_pins)
        assert ours == (tw, th), (w, h)


@pytest.mark.parametrize("w,h", SIZES)
def test_token_counts_match_transformers(w, h):
    assert num_visual_tokens(w, h, CFG_8B) == _hf_count(CFG_8B, w, h)
    assert num_visual_tokens(w, h, CFG_TINY) == _hf_count(CFG_TINY, w, h)


def test_token_counts_sweep_with_hf_rounding():
    rng = np.random.default_rng(1)
    for w, h in rng.integers(1, 6000, (1500, 2)).tolist():
        for cfg in (CFG_8B, CFG_TINY):
            assert num_visual_tokens(w, h, cfg, hf_rounding=True) == _hf_count(cfg, w, h), (w, h)


def test_known_counts():
    assert num_visual_tokens(384, 384, CFG_8B) == 729 + 729 + 27
    plain = model_config("8b")
    plain.image.aspect_ratio = "plain"
    assert num_visual_tokens(1000, 300, plain) == 729


def test_unpad_rounding_llava_vs_transformers():
    # LLaVA-NeXT/LLaDA-V's unpad_image does int(x); transformers int(round(x, 7)). For 820x738
    # (grid 3x2, map 54x81) x = 54 * 820 / 738 = 59.99999999999999: LLaVA keeps 59 columns.
    assert best_grid((820, 738), CFG_8B) == (3, 2)
    assert num_visual_tokens(820, 738, CFG_8B) == 729 + 54 * 60
    assert _hf_count(CFG_8B, 820, 738) == 729 + 54 * 62
    for w, h in [(820, 738), (750, 1750), (1107, 1640), (1872, 832)]:
        assert num_visual_tokens(w, h, CFG_8B, hf_rounding=True) == _hf_count(CFG_8B, w, h)


def _llava_unpad_image(tensor, original_size):
    """LLaVA-NeXT's unpad_image (as in LLaDA-V), with transformers' (h, w) size argument."""
    original_height, original_width = (int(v) for v in original_size)
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


@pytest.mark.parametrize("size", [(820, 738), (750, 1750), (1107, 1640)])
def test_layout_matches_llava_unpad_rounding(size, monkeypatch):
    import transformers.models.llava_onevision.modeling_llava_onevision as hf_mod

    feats, newline = _random_feats(CFG_8B, size)
    grid = best_grid(size, CFG_8B)
    hf = _hf_pack(CFG_8B, feats, newline, *size)
    ours_hf = _apply(anyres_layout(size, grid, CFG_8B, hf_rounding=True), feats, newline)
    np.testing.assert_allclose(ours_hf, hf, atol=1e-5, rtol=0)
    monkeypatch.setattr(hf_mod, "unpad_image", _llava_unpad_image)
    llava = _hf_pack(CFG_8B, feats, newline, *size)
    ours = _apply(anyres_layout(size, grid, CFG_8B), feats, newline)
    assert ours.shape[0] == num_visual_tokens(*size, CFG_8B)
    np.testing.assert_allclose(ours, llava, atol=1e-5, rtol=0)


def _random_feats(cfg, size, d=8):
    u = cfg.vision.image_size // cfg.vision.patch_size
    cols, rows = best_grid(size, cfg)
    rng = np.random.default_rng(size[0] * 7 + size[1])
    feats = rng.standard_normal((1 + cols * rows, u * u, d), dtype=np.float32)
    return feats, rng.standard_normal(d, dtype=np.float32)


def _apply(layout, feats, newline):
    """Numpy version of the model's weighted gather."""
    table = np.concatenate([feats.reshape(-1, feats.shape[-1]), newline[None]])
    src = np.where(layout.src == NEWLINE, table.shape[0] - 1, layout.src)
    return np.einsum("vk,vkd->vd", layout.weight, table[src])


def _hf_pack(cfg, feats, newline, w, h):
    s = cfg.vision.image_size
    stub = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=s, patch_size=cfg.vision.patch_size),
            image_grid_pinpoints=_hf_pinpoints(cfg),
        )
    )
    out, _ = LlavaOnevisionModel.pack_image_features(
        stub,
        [torch.from_numpy(feats)],
        torch.tensor([[h, w]]),
        image_newline=torch.from_numpy(newline),
        vision_aspect_ratio=f"anyres_max_{cfg.image.max_num_patches}",
    )
    return out[0].numpy()


PACK_CASES = [
    (CFG_8B, (384, 384)),  # 1x1 grid, nothing cut
    (CFG_8B, (1000, 1000)),  # 3x3 -> downsampled 81x81 -> 54x54
    (CFG_8B, (2000, 1000)),  # unpadded rows + downsampled
    (CFG_8B, (700, 1900)),  # unpadded columns + downsampled
    (CFG_8B, (800, 300)),  # unpad only
    (CFG_8B, (10000, 50)),  # one feature row left
    (CFG_TINY, (150, 70)),
    (CFG_TINY, (200, 100)),
    (CFG_TINY, (300, 310)),
    (CFG_TINY, (70, 330)),
    (CFG_TINY, (1, 1)),
]


@pytest.mark.parametrize("cfg,size", PACK_CASES)
def test_layout_matches_pack_image_features(cfg, size):
    w, h = size
    feats, newline = _random_feats(cfg, size)
    layout = anyres_layout(size, best_grid(size, cfg), cfg)
    ref = _hf_pack(cfg, feats, newline, w, h)
    assert layout.num_tokens == ref.shape[0] == num_visual_tokens(w, h, cfg)
    np.testing.assert_allclose(_apply(layout, feats, newline), ref, atol=1e-5, rtol=0)
    used = layout.weight != 0
    assert np.all(layout.src[~used] == 0) and np.all(layout.src[used] >= NEWLINE)


def _hf_pixels(cfg, image):
    s = cfg.vision.image_size
    proc = LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s},
        image_grid_pinpoints=_hf_pinpoints(cfg),
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    out = proc(image, return_tensors="np")["pixel_values"][0]  # [n, 3, S, S]
    return out.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [(150, 70), (30, 200), (56, 56), (300, 120), (1, 1), (97, 401)])
def test_tiles_match_transformers_pil_processor(size):
    rng = np.random.default_rng(size[0] + 1000 * size[1])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = process_image(image, CFG_TINY)
    ref = _hf_pixels(CFG_TINY, image)
    assert ours.tiles.shape == ref.shape and ours.tiles.dtype == np.float32
    assert ours.size == size and ours.grid == best_grid(size, CFG_TINY)
    assert ours.layout.num_tokens == num_visual_tokens(*size, CFG_TINY)
    # Both make the same Pillow bicubic resizes on uint8 and normalise with the same float32
    # steps, so the tiles are bit-identical (no bicubic-implementation slack needed).
    np.testing.assert_array_equal(ours.tiles, ref)


def test_plain_and_mode_conversion():
    cfg = model_config("8b")
    cfg.image.aspect_ratio = "plain"
    image = Image.new("L", (500, 200), 255)
    out = process_image(image, cfg)
    assert out.tiles.shape == (1, 384, 384, 3) and out.layout.num_tokens == 729
    np.testing.assert_allclose(out.tiles, 1.0)
    np.testing.assert_array_equal(out.layout.src[:, 0], np.arange(729))
    assert np.all(out.layout.weight[:, 1:] == 0)


def test_collate_visual_places_taps():
    cfg = model_config("tiny")  # P = 16, max_tiles 37
    rgb = lambda w, h: Image.new("RGB", (w, h), (10, 20, 30))
    a, b = process_image(rgb(56, 56), cfg), process_image(rgb(150, 70), cfg)
    assert a.grid == (1, 1) and a.layout.num_tokens == 16 + 16 + 4
    seq_len = 200
    batch = collate_visual([[(a, 3), (b, 50)], []], cfg, seq_len)
    t, p = cfg.image.max_tiles, 16
    pos, src, w = batch["visual_pos"], batch["visual_src"], batch["visual_w"]
    assert batch["pixels"].shape == (2, t, 56, 56, 3)
    np.testing.assert_array_equal(batch["pixels"][0, :2], a.tiles)
    np.testing.assert_array_equal(batch["pixels"][0, 2 : 2 + len(b.tiles)], b.tiles)
    assert not batch["pixels"][0, 2 + len(b.tiles) :].any() and not batch["pixels"][1].any()
    na = a.layout.num_tokens
    nb = b.layout.num_tokens
    np.testing.assert_array_equal(pos[0, :na], np.arange(3, 3 + na))
    np.testing.assert_array_equal(pos[0, na : na + nb], np.arange(50, 50 + nb))
    assert np.all(pos[0, na + nb :] == seq_len) and np.all(pos[1] == seq_len)
    # Image a: base tile 0 (patch 5), grid tile 1 row 0 (patches 0-3 = flat 16-19), newline.
    assert src[0, 5, 0] == 5 and src[0, 16, 0] == 16 and src[0, 19, 0] == 19
    assert src[0, 20, 0] == t * p and w[0, 20, 0] == 1 and not w[0, 20, 1:].any()
    # Image b starts at tile 2: its base patch 0 is flat row 2*P.
    assert src[0, na, 0] == 2 * p and w[0, na, 0] == 1
    newline_rows = b.layout.src[:, 0] == NEWLINE
    assert np.all(src[0, na : na + nb][newline_rows, 0] == t * p)
    assert not w[1].any() and not src[1].any()


def test_collate_visual_overflow_errors():
    cfg = model_config("tiny")
    img = process_image(Image.new("RGB", (300, 310)), cfg)  # 37 tiles
    with pytest.raises(ValueError, match=r"sample 1 needs 74 tiles > max_tiles 37"):
        collate_visual([[], [(img, 0), (img, 200)]], cfg, 1000)
    small = process_image(Image.new("RGB", (56, 56)), cfg)  # 36 tokens
    cfg.image.max_visual_tokens = 50
    with pytest.raises(ValueError, match=r"sample 0 needs 72 visual tokens > max_visual_tokens"):
        collate_visual([[(small, 0), (small, 40)]], cfg, 1000)
    with pytest.raises(ValueError, match=r"sample 0: image placeholders \[90, 126\) exceed"):
        collate_visual([[(small, 90)]], cfg, 100)
