"""Samples with several images: each image `pad`ded to a square and made one tile, its P tokens
then one `image_newline` (730 at 384 px), as the official `process_image(f, "pad")` and the
`flat` + newline merge; a sample's only image keeps AnyRes."""

import io

import numpy as np
import pytest
from PIL import Image

from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import Example
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.image import process_image, process_images
from lladav_jax.data.layout import NEWLINE, image_mode, num_tiles, num_visual_tokens
from lladav_jax.data.template import llava_llada
from lladav_jax.models.variants import model_config

CFG_8B = model_config("8b")
CFG_TINY = model_config("tiny")
TOK = load_demo_tokenizer()

SIZES = [(500, 200), (200, 500), (300, 300), (101, 50), (51, 100), (384, 384), (1, 3),
         (1000, 999)]  # landscape, portrait, square, odd differences, tiny, nearly square


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed + 7 * w + h).integers(
        0, 256, (h, w, 3), np.uint8))


def official_pad_tile(image: Image.Image, side: int = 384) -> np.ndarray:
    """The official `pad` reading, plainly: a square of the SigLIP mean's colour
    (int(0.5 * 255) = 127 per channel), the image pasted at the middle of the long side, resized
    to side x side (bicubic), then (x / 255 - 0.5) / 0.5. [side, side, 3] float32."""
    w, h = image.size
    square = image
    if w > h:
        square = Image.new(image.mode, (w, w), (127, 127, 127))
        square.paste(image, (0, (w - h) // 2))
    elif h > w:
        square = Image.new(image.mode, (h, h), (127, 127, 127))
        square.paste(image, ((h - w) // 2, 0))
    x = np.asarray(square.resize((side, side), Image.BICUBIC), np.float32)
    return ((x / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


def official_pad_features(feats: np.ndarray, newline: np.ndarray) -> np.ndarray:
    """One tile's features [P, D] as the official merge lays an image of several out: the P
    tokens in order, then one newline."""
    return np.concatenate([feats, newline[None]])


def apply(layout, feats: np.ndarray, newline: np.ndarray) -> np.ndarray:
    """The model's weighted gather, in numpy."""
    table = np.concatenate([feats.reshape(-1, feats.shape[-1]), newline[None]])
    src = np.where(layout.src == NEWLINE, table.shape[0] - 1, layout.src)
    return np.einsum("vk,vkd->vd", layout.weight, table[src])


@pytest.mark.parametrize("size", SIZES)
def test_pad_matches_the_official_reading(size):
    image = picture(*size)
    out = process_image(image, CFG_8B, "pad")
    want = official_pad_tile(image)
    assert out.tiles.shape == (1, 384, 384, 3) and out.tiles.dtype == np.float32
    np.testing.assert_allclose(out.tiles[0], want, rtol=0, atol=1e-6)
    assert out.size == size and out.grid == (0, 0)
    # The background where the image is not: 127 -> (127/255 - 0.5) / 0.5.
    w, h = size
    if max(w, h) >= 2 * min(w, h) + 4:  # a band of pure background along the short side
        corner = out.tiles[0, 0, 191] if w > h else out.tiles[0, 191, 0]  # top / left band
        np.testing.assert_allclose(corner, (127 / 255 - 0.5) / 0.5, atol=1e-6)
    layout = out.layout
    assert layout.num_tokens == 730 == num_visual_tokens(w, h, CFG_8B, mode="pad")
    np.testing.assert_array_equal(layout.src[:729, 0], np.arange(729))
    np.testing.assert_array_equal(layout.weight[:729, 0], 1.0)
    assert layout.src[729, 0] == NEWLINE and layout.weight[729, 0] == 1.0
    assert not layout.weight[:, 1:].any() and not layout.src[:, 1:].any()
    rng = np.random.default_rng(1)
    feats, newline = rng.standard_normal((729, 8), np.float32), rng.standard_normal(8, np.float32)
    np.testing.assert_array_equal(apply(layout, feats, newline),
                                  official_pad_features(feats, newline))


def test_pad_of_images_not_rgb():
    gray = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 90), np.uint8), "L")
    out = process_image(gray, CFG_TINY, "pad")
    np.testing.assert_allclose(out.tiles[0], official_pad_tile(gray.convert("RGB"), 56),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [CFG_8B, CFG_TINY], ids=["8b", "tiny"])
@pytest.mark.parametrize("size", [(500, 200), (200, 500), (300, 300), (150, 70), (1, 1)])
def test_a_single_image_keeps_anyres(cfg, size):
    image = picture(*size, seed=5)
    assert image_mode(1, cfg) == "anyres" and image_mode(2, cfg) == image_mode(5, cfg) == "pad"
    (got,) = process_images([image], cfg)
    for want in (process_image(image, cfg, "anyres"), process_image(image, cfg)):
        np.testing.assert_array_equal(got.tiles, want.tiles)
        np.testing.assert_array_equal(got.layout.src, want.layout.src)
        np.testing.assert_array_equal(got.layout.weight, want.layout.weight)
        assert got.grid == want.grid and got.size == want.size
    assert got.tiles.shape[0] == num_tiles(*size, cfg) > 1
    assert got.layout.num_tokens == num_visual_tokens(*size, cfg)


def test_several_images_are_each_padded():
    images = [picture(500, 200), picture(200, 500), picture(300, 300)]
    got = process_images(images, CFG_8B)
    for image, out in zip(images, got):
        np.testing.assert_allclose(out.tiles[0], official_pad_tile(image), rtol=0, atol=1e-6)
        assert out.tiles.shape[0] == 1 and out.layout.num_tokens == 730
    plain = model_config("8b")
    plain.image.aspect_ratio = "plain"  # stage 1: padded tiles too, but no newline (flat merge)
    processed = process_images(images, plain)
    assert [p.layout.num_tokens for p in processed] == [729] * 3
    for p, out in zip(processed, got):
        np.testing.assert_array_equal(p.tiles, out.tiles)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_two_image_sample_through_the_featurizer():
    images = [picture(500, 200, seed=1), picture(200, 500, seed=2)]
    conversations = [
        {"from": "human", "value": "<image>\nThe first.\n<image>\nWhich is taller?"},
        {"from": "gpt", "value": "the second"},
    ]
    raw = {"id": "two", "images": [png(i) for i in images], "conversations": conversations}
    feat = Featurizer(CFG_8B, TOK, seq_len=2048)
    measured = feat.measure(raw)
    assert measured.image_tokens == (730, 730) and measured.image_tiles == (1, 1)
    ex = feat(raw)
    assert isinstance(ex, Example) and len(ex.images) == 2
    expected = llava_llada(TOK, conversations, [730, 730])
    np.testing.assert_array_equal(ex.tokens, expected.tokens)
    assert ex.image_starts == tuple(expected.image_starts) == measured.image_starts
    first, second = ex.image_starts
    assert second - first > 730  # the text between them
    is_placeholder = ex.tokens == TOK.placeholder_id
    assert is_placeholder.sum() == 2 * 730
    for start, image, out in zip(ex.image_starts, images, ex.images):
        assert is_placeholder[start:start + 730].all() and not is_placeholder[start - 1]
        assert not ex.targets[start:start + 730].any()
        np.testing.assert_allclose(out.tiles[0], official_pad_tile(image), rtol=0, atol=1e-6)
        assert out.layout.num_tokens == 730 and out.size == image.size
    assert not is_placeholder[second + 730]
    # The same image alone: AnyRes, many more tokens and tiles.
    alone = feat({"id": "one", "images": [png(images[0])], "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "noise"}]})
    assert alone.images[0].layout.num_tokens == num_visual_tokens(500, 200, CFG_8B) > 730
    assert alone.images[0].tiles.shape[0] == num_tiles(500, 200, CFG_8B) > 1
