"""Featurizer: every bad input of the data issue gives the right Example or Skip (file named)."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import Example, Skip
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.image_file import ImageLoadError, image_size, load_image
from lladav_jax.data.layout import num_visual_tokens
from lladav_jax.data.template import llava_llada
from lladav_jax.models.variants import model_config


@pytest.fixture(scope="module")
def tok():
    return load_demo_tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return model_config("tiny")


@pytest.fixture(scope="module")
def feat(cfg, tok):
    return Featurizer(cfg, tok, seq_len=512)


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def picture(w: int = 90, h: int = 60, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (w, h), (250, 250, 250))
    image.paste((200, 30, 30), (0, 0, w // 2, h // 2))  # red top-left quarter
    return image.convert(mode) if mode != "RGB" else image


PNG = encoded(picture())


def sample(images=(PNG,), question="<image>\nWhat color?", answer="red", **extra):
    return {
        "id": "s1",
        "image": [f"img{k}.png" for k in range(len(images))],
        "images": list(images),
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ],
        **extra,
    }


def skipped(result, reason: str, *named: str) -> Skip:
    assert isinstance(result, Skip), result
    assert result.reason == reason, result
    for name in named:
        assert name in result.detail, result
    return result


def test_good_sample(feat, tok, cfg):
    ex = feat(sample())
    assert isinstance(ex, Example) and ex.sample_id == "s1"
    assert ex.tokens.dtype == np.int32 and ex.targets.dtype == bool
    assert len(ex.images) == 1 and len(ex.image_starts) == 1
    v = num_visual_tokens(90, 60, cfg)
    assert ex.images[0].layout.num_tokens == v
    s = ex.image_starts[0]
    assert (ex.tokens[s : s + v] == tok.placeholder_id).all() and not ex.targets[s : s + v].any()
    expected = llava_llada(tok, sample()["conversations"], [v])
    np.testing.assert_array_equal(ex.tokens, expected.tokens)
    np.testing.assert_array_equal(ex.targets, expected.targets)
    assert ex.images[0].tiles.shape[1:] == (56, 56, 3)


def test_paths_and_the_image_field(feat, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    ex = feat(sample(images=[str(tmp_path / "a.png")]))
    assert isinstance(ex, Example)
    # No `images`: the `image` field is read as paths.
    raw = sample()
    del raw["images"]
    raw["image"] = str(tmp_path / "a.png")
    assert isinstance(feat(raw), Example)


def test_missing_file_named(feat, tmp_path):
    path = str(tmp_path / "gone.png")
    skipped(feat(sample(images=[path])), "missing_image", path)
    packed = sample(images=["/data/x.jpg"], _missing_images=[0])
    skipped(feat(packed), "missing_image", "/data/x.jpg")


def test_corrupt_bytes_named(feat, tmp_path):
    skipped(feat(sample(images=[b"definitely not an image"])), "corrupt_image", "img0.png")
    skipped(feat(sample(images=[b""])), "corrupt_image", "img0.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    skipped(feat(sample(images=[str(tmp_path / "bad.jpg")])), "corrupt_image", "bad.jpg")
    (tmp_path / "dir.png").mkdir()
    skipped(feat(sample(images=[str(tmp_path / "dir.png")])), "corrupt_image", "dir.png")


def test_truncated_png(feat):
    big = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), np.uint8)))
    skipped(feat(sample(images=[big[: len(big) // 2]])), "corrupt_image", "img0.png")
    jpeg = encoded(picture(200, 200), "JPEG")
    skipped(feat(sample(images=[jpeg[: len(jpeg) // 2]])), "corrupt_image", "img0.png")


def test_decompression_bomb(cfg, tok):
    feat = Featurizer(cfg, tok, seq_len=512, max_pixels=1000)
    skipped(feat(sample()), "corrupt_image", "img0.png", "decompression bomb")


def test_tag_mismatch_both_ways(feat):
    skipped(feat(sample(question="<image>\n<image>\nBoth?")), "image_tag_mismatch", "2 <image>")
    # An image without any tag: the official code would silently ignore the image; we skip.
    skipped(feat(sample(question="What color?")), "image_tag_mismatch", "0 <image>", "img0.png")
    skipped(feat(sample(images=[])), "image_tag_mismatch", "1 <image> tags but 0 images")


def test_single_tag_moved_first_as_official(feat):
    a = feat(sample(question="What color?\n<image>"))
    b = feat(sample(question="<image>\nWhat color?"))
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_multi_image_sample(feat, cfg):
    images = [encoded(picture(90, 60)), encoded(picture(40, 120)), encoded(picture(5, 5))]
    raw = sample(images=images, question="<image> <image>\nCompare them.")
    raw["conversations"] += [
        {"from": "human", "value": "And this one?\n<image>"},
        {"from": "gpt", "value": "smaller"},
    ]
    ex = feat(raw)
    assert isinstance(ex, Example) and len(ex.images) == 3
    sizes = [(90, 60), (40, 120), (5, 5)]
    for image, start, size in zip(ex.images, ex.image_starts, sizes):
        assert image.size == size  # several images: one padded tile each (docs §2.6)
        assert image.tiles.shape[0] == 1
        assert image.layout.num_tokens == num_visual_tokens(*size, cfg, mode="pad")
        assert not ex.targets[start : start + image.layout.num_tokens].any()


def test_text_only_sample(feat):
    raw = sample(images=[], question="What is 2+2?", answer="4")
    ex = feat(raw)
    assert isinstance(ex, Example) and ex.images == () and ex.image_starts == ()


@pytest.mark.parametrize(
    "conversations,reason,named",
    [
        ([], "empty_conversation", "empty"),
        ([{"from": "human", "value": "<image>\nHi"}], "empty_conversation", "no assistant"),
        (
            [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "  "}],
            "empty_conversation",
            "no assistant",
        ),
        ("hello", "malformed", "'conversations' is a str"),
        ([["human", "hi"]], "malformed", "conversations[0] is a list"),
        (
            [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}],
            "malformed",
            "conversations[0].from is 'system'",
        ),
        (
            [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}],
            "malformed",
            "conversations[0].value is a int",
        ),
        (
            [{"from": "gpt", "value": "y"}, {"from": "human", "value": "<image>"}],
            "malformed",
            "conversations[0].from is 'gpt'",
        ),
        (
            [{"from": "human", "value": "<image>"}, {"from": "human", "value": "again"}],
            "malformed",
            "conversations[1].from is 'human'",
        ),
        (
            [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}],
            "malformed",
            "conversations[1] is an answer",
        ),
    ],
)
def test_empty_and_malformed_conversations(feat, conversations, reason, named):
    raw = sample()
    raw["conversations"] = conversations
    skipped(feat(raw), reason, named)


def test_malformed_fields(feat):
    raw = sample()
    del raw["conversations"]
    skipped(feat(raw), "malformed", "conversations")
    skipped(feat(sample(images=[123])), "malformed", "images[0]")
    raw = sample()
    raw["images"] = PNG
    skipped(feat(raw), "malformed", "'images'")
    assert skipped(feat(["not", "a", "dict"]), "malformed").sample_id == ""
    marked = {"id": "f.jsonl:7", "conversations": [], "images": [], "_error": "malformed: bad"}
    skip = skipped(feat(marked), "malformed", "bad")
    assert skip.sample_id == "f.jsonl:7"


def test_never_raises_on_garbage(feat):
    header_only = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    garbage = [None, 1, "x", {}, {"conversations": None}, {"conversations": [None]},
               {"conversations": [{"from": "human"}]}, {"id": 5, "images": {"a": 1}},
               sample(images=[None]), sample(images=[header_only])]  # fmt: skip
    for raw in garbage:
        assert isinstance(feat(raw), Skip), raw


def three_rounds():
    raw = sample(question="<image>\nWhat color is the shape?", answer="red")
    raw["images"] = [PNG, encoded(picture(60, 90))]
    raw["image"] = ["one.png", "two.png"]
    raw["conversations"] += [
        {"from": "human", "value": "What shape is it?"},
        {"from": "gpt", "value": "a square"},
        {"from": "human", "value": "<image>\nAnd this one?"},
        {"from": "gpt", "value": "a triangle"},
    ]
    return raw


def test_overlong_drop_vs_truncate(cfg, tok):
    full = Featurizer(cfg, tok, seq_len=4096)(three_rounds())
    n = len(full)
    cuts = [i + 1 for i in np.flatnonzero(full.tokens == tok.eot_id)]
    two_rounds = cuts[-3]  # after the second answer (cuts: system, u1, a1, u2, a2, u3, a3)
    seq_len = two_rounds + 3
    drop = Featurizer(cfg, tok, seq_len=seq_len, overlong="drop")
    skipped(drop(three_rounds()), "too_long", f"{n} tokens > seq_len {seq_len}")
    trunc = Featurizer(cfg, tok, seq_len=seq_len, overlong="truncate")
    ex = trunc(three_rounds())
    assert isinstance(ex, Example) and len(ex) == two_rounds
    np.testing.assert_array_equal(ex.tokens, full.tokens[:two_rounds])
    np.testing.assert_array_equal(ex.targets, full.targets[:two_rounds])
    assert ex.tokens[-1] == tok.eot_id
    assert tok.decode(ex.tokens).endswith("assistant<|end_header_id|>\n\na square<|eot_id|>")
    # The image of the cut-off third round goes with it.
    assert len(ex.images) == 1 and ex.image_starts == full.image_starts[:1]
    # Not even the first answer fits: skipped either way.
    tiny = Featurizer(cfg, tok, seq_len=cuts[2] - 1, overlong="truncate")
    skipped(tiny(three_rounds()), "too_long", "first answer")
    # Exactly fitting is kept whole.
    assert len(Featurizer(cfg, tok, seq_len=n, overlong="drop")(three_rounds())) == n


def test_plain_template_and_overlong(cfg, tok):
    raw = sample(question="<image>\nDescribe.", answer="a red square")
    ex = Featurizer(cfg, tok, template="plain", seq_len=512)(raw)
    v = num_visual_tokens(90, 60, cfg)
    assert ex.image_starts == (0,) and len(ex) == v + len(tok.encode("a red square\n"))
    short = Featurizer(cfg, tok, template="plain", seq_len=v + 1, overlong="truncate")
    skipped(short(raw), "too_long")


def test_too_many_visual(tok):
    cfg = model_config("tiny")
    cfg.image.max_visual_tokens = 20
    skipped(Featurizer(cfg, tok)(sample()), "too_many_visual", "img0.png")
    cfg = model_config("tiny")
    cfg.image.max_tiles = 2
    skipped(Featurizer(cfg, tok)(sample()), "too_many_visual", "tiles")


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "1", "CMYK", "I;16", "I", "F"])
def test_odd_modes_become_rgb(feat, mode):
    pic = picture(mode=mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        pic = Image.fromarray((np.arange(90 * 60).reshape(60, 90) * 12).astype(np.uint16))
    elif mode in ("I", "F"):
        pic = picture(mode="L").convert(mode)
    fmt = {"CMYK": "JPEG", "I": "TIFF", "F": "TIFF"}.get(mode, "PNG")
    data = encoded(pic, fmt)
    image = load_image(data)
    assert image.mode == "RGB" and image.size == (90, 60)
    assert isinstance(feat(sample(images=[data])), Example)
    if mode in ("RGBA", "P", "L", "I", "F"):  # lossless: the red quarter survives as colour/grey
        px = np.asarray(image)
        assert px[5, 5].tolist() != px[50, 80].tolist()


def test_sixteen_bit_is_rescaled_not_clipped():
    data = np.array([[0, 257 * 100, 65535]], np.uint16)
    image = load_image(encoded(Image.fromarray(data)))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 100, 255]


def test_transparency_composited_over_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (200, 0, 0, 255))
    px = np.asarray(load_image(encoded(rgba)))
    assert px[5, 5].tolist() == [255, 255, 255] and px[0, 0].tolist() == [200, 0, 0]
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1
    px = np.asarray(load_image(encoded(pal, transparency=1)))
    assert px[0, 0].tolist() == [255, 255, 255]


def test_measure_reads_sizes_from_headers(feat, tmp_path):
    """The measure step opens headers only; its sizes and tokens are what full featurizing
    gives (EXIF orientation included), and a truncated file measures but fails its pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 60 x 90
    rotated = encoded(picture(), "JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "a.png").write_bytes(PNG)
    for ref, size in [(PNG, (90, 60)), (rotated, (60, 90)), (str(tmp_path / "a.png"), (90, 60)),
                      (encoded(picture(40, 120), "WEBP"), (40, 120))]:
        assert image_size(ref) == size == load_image(ref).size
        m = feat.measure(sample(images=[ref]))
        ex = feat(sample(images=[ref]))
        assert m.image_sizes == (size,) and len(m) == len(ex)
        np.testing.assert_array_equal(m.tokens, ex.tokens)
        assert m.image_tokens == (ex.images[0].layout.num_tokens,)
        assert m.image_tiles == (ex.images[0].tiles.shape[0],)
    big = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), np.uint8)))
    cut = sample(images=[big[: len(big) // 2]])
    m = feat.measure(cut)
    assert m.image_sizes == ((80, 80),)
    skipped(feat.add_pixels(m, cut), "corrupt_image", "img0.png")


def test_sizes_a_source_gives(feat):
    """`_image_sizes` spares the headers; a size the pixels then contradict is a skip when
    they are added, and a malformed one is a skip when measured."""
    m = feat.measure(sample(images=[b"not even read"], _image_sizes=[[90, 60]]))
    assert m.image_sizes == ((90, 60),)
    lying = sample(_image_sizes=[[60, 90]])
    skipped(feat.add_pixels(feat.measure(lying), lying), "corrupt_image", "header says 60x90")
    for bad in ([[90]], [[90, 60], [1, 1]], [[0, 60]], "90x60", [[90.0, 60]]):
        skipped(feat.measure(sample(_image_sizes=bad)), "malformed", "_image_sizes")


def test_exif_rotation_applied(feat):
    # Stored 90 wide x 60 high with orientation 6 ("rotate 90 CW to display"): shown 60 x 90.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(picture(), "JPEG", exif=exif.tobytes(), quality=95)
    image = load_image(data)
    assert image.size == (60, 90)
    px = np.asarray(image).astype(int)
    # The red top-left quarter of the stored image is at the top right once rotated clockwise.
    assert px[10, 50, 0] > 150 and px[10, 50, 1] < 100
    assert px[80, 10].min() > 200
    ex = feat(sample(images=[data]))
    assert ex.images[0].size == (60, 90)


@pytest.mark.parametrize("size", [(1, 1), (10000, 50), (50, 10000)])
def test_extreme_sizes(feat, cfg, size):
    ex = feat(sample(images=[encoded(Image.new("RGB", size, (9, 99, 199)))]))
    assert isinstance(ex, Example)
    assert ex.images[0].layout.num_tokens == num_visual_tokens(*size, cfg)
    assert np.isfinite(ex.images[0].tiles).all()


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.png: no such file") as err:
        load_image(str(tmp_path / "nope.png"))
    assert err.value.reason == "missing_image"
    with pytest.raises(ImageLoadError, match="cannot decode") as err:
        load_image(b"xx", name="foo.jpg")
    assert err.value.reason == "corrupt_image" and "foo.jpg" in str(err.value)
    with pytest.raises(TypeError):
        load_image(3)


def test_config_errors_raise(cfg, tok):
    with pytest.raises(ValueError, match="template"):
        Featurizer(cfg, tok, template="chatml")
    with pytest.raises(ValueError, match="overlong"):
        Featurizer(cfg, tok, overlong="cut")
    with pytest.raises(ValueError, match="seq_len"):
        Featurizer(cfg, tok, seq_len=0)
    small = model_config("tiny")
    small.text.vocab_size = 100
    with pytest.raises(ValueError, match="vocab_size 100"):
        Featurizer(small, tok)


def test_featurizer_pickles(feat):
    clone = pickle.loads(pickle.dumps(feat))
    a, b = clone(sample()), feat(sample())
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_never_raises_on_mutated_samples(feat):
    """Random fields of a good sample replaced by values of random types: always a result."""
    rng = np.random.default_rng(0)
    values = [None, 0, -1, 2.5, "", "x", "<image>", b"", PNG[:30], [], [None], {}, {"a": 1},
              ["<image>"], [{"from": ["x"]}], {"from": "human"}, [PNG, PNG],
              ("human", "hi")]  # fmt: skip
    for _ in range(300):
        raw = sample()
        raw["conversations"] = [dict(t) for t in raw["conversations"]]
        for _ in range(int(rng.integers(1, 4))):
            value = values[int(rng.integers(len(values)))]
            target = int(rng.integers(6))
            if target < 4:
                key = ["id", "image", "images", "_missing_images"][target]
                raw[key] = value
            else:
                turn = raw["conversations"][target - 4]
                turn[["from", "value"][int(rng.integers(2))]] = value
        assert isinstance(feat(raw), Example | Skip), raw


def test_plain_needs_two_turns(cfg, tok):
    raw = three_rounds()
    skipped(Featurizer(cfg, tok, template="plain")(raw), "malformed", "plain template")
