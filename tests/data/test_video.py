"""Video samples: the frames chosen (the official LLaDA-V rule), the pooled grid-newline layout
against transformers' LLaVA-OneVision video features, decoding and skips through the
featurizer and the pipeline, and that the decoded frames are the chosen ones."""

import collections
import json

import av
import ml_collections
import numpy as np
import pytest

from lladav_jax.data import pipeline
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import Example, Skip
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.image import process_frames
from lladav_jax.data.layout import NEWLINE, collate_visual, pooled_side, video_layout, video_tokens
from lladav_jax.data.sources.llava_json import LlavaJsonSource
from lladav_jax.data.video import frame_indices, probe, read_frames, write_video
from lladav_jax.models import variants

TOK = load_demo_tokenizer()
CFG = variants.model_config("tiny")  # 56 px tiles: 4x4 features, pooled to 2x2, 6 tokens a frame

# --- Which frames ---------------------------------------------------------------------------

LINSPACE_3000_32 = [0, 96, 193, 290, 386, 483, 580, 677, 773, 870, 967, 1064, 1160, 1257, 1354,
                    1451, 1547, 1644, 1741, 1838, 1934, 2031, 2128, 2225, 2321, 2418, 2515, 2612,
                    2708, 2805, 2902, 2999]  # fmt: skip
LINSPACE_1200_32 = [0, 38, 77, 116, 154, 193, 232, 270, 309, 348, 386, 425, 464, 502, 541, 580,
                    618, 657, 696, 734, 773, 812, 850, 889, 928, 966, 1005, 1044, 1082, 1121,
                    1160, 1199]  # fmt: skip

INDEX_CASES = [  # total frames, fps, video.fps, max_frames, expected
    (300, 30.0, 1.0, 32, [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]),  # one a second
    (100, 29.97, 1.0, 32, [0, 30, 60, 90]),  # NTSC: round(29.97) = 30
    (101, 25.0, 1.0, 32, [0, 25, 50, 75, 100]),  # the last frame lands on the step
    (7, 2.0, 1.0, 32, [0, 2, 4, 6]),
    (60, 30.0, 2.0, 32, [0, 15, 30, 45]),  # two a second
    (10, 2.5, 1.0, 32, [0, 2, 4, 6, 8]),  # Python's round: half to even, 2.5 -> 2
    (10, 3.5, 1.0, 32, [0, 4, 8]),  # 3.5 -> 4
    (3000, 30.0, 1.0, 32, LINSPACE_3000_32),  # 100 s: 100 > 32 frames, spread evenly
    (3000, 30.0, 1.0, 8, [0, 428, 856, 1285, 1713, 2142, 2570, 2999]),
    (960, 30.0, 1.0, 32, list(range(0, 960, 30))),  # exactly 32: every 30th, no linspace
    (1200, 30.0, 1.0, 0, list(range(0, 1200, 30))),  # max_frames 0: no limit, 40 frames
    (1200, 30.0, 1.0, 32, LINSPACE_1200_32),  # the same video with the limit
    # Below 0.5 fps the official step round(0.4) = 0 cannot step (range raises): every frame.
    (5, 0.4, 1.0, 32, [0, 1, 2, 3, 4]),
    (5, 0.4, 1.0, 3, [0, 2, 4]),
    (1, 30.0, 1.0, 32, [0]),
    (0, 30.0, 1.0, 32, []),
]


@pytest.mark.parametrize("total,fps,video_fps,max_frames,want", INDEX_CASES)
def test_frame_indices_cases(total, fps, video_fps, max_frames, want):
    assert frame_indices(total, fps, video_fps, max_frames) == want


def official_indices(total: int, avg_fps: float, video_fps: float, upbound: int) -> list[int]:
    """`process_video_with_decord`'s choice, read plainly (force_sample off)."""
    step = round(avg_fps / video_fps)
    chosen = list(range(0, total, step))
    if upbound > 0 and len(chosen) > upbound:
        chosen = np.linspace(0, total - 1, upbound, dtype=int).tolist()
    return chosen


def test_frame_indices_sweep_matches_the_official_rule():
    for total in (1, 2, 29, 30, 31, 959, 960, 961, 991, 4321):
        for fps in (0.5, 1.0, 7.5, 23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 60.0, 120.0):
            for video_fps in (0.5, 1.0, 2.0):
                if round(fps / video_fps) == 0:
                    continue
                for max_frames in (0, 8, 32, 64):
                    want = official_indices(total, fps, video_fps, max_frames)
                    assert frame_indices(total, fps, video_fps, max_frames) == want


def test_uniform_frame_indices():
    # The evaluation's choice: always max_frames frames; a short video repeats frames.
    assert frame_indices(5, 30.0, 1.0, 8, uniform=True) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert frame_indices(3000, 30.0, 1.0, 8, uniform=True) == [0, 428, 856, 1285, 1713, 2142,
                                                                2570, 2999]
    assert frame_indices(960, 30.0, 1.0, 32, uniform=True) == np.linspace(
        0, 959, 32, dtype=int).tolist() != list(range(0, 960, 30))


# --- Layout and features against transformers -----------------------------------------------


def test_token_counts_at_384_px():
    cfg = variants.model_config("8b")  # layout only: 27x27 features a frame -> 14x14
    assert pooled_side(cfg) == 14 and video_tokens(1, cfg) == 210
    layout = video_layout(32, cfg)
    assert layout.num_tokens == video_tokens(32, cfg) == 32 * 210
    newline = layout.src[:, 0] == NEWLINE
    np.testing.assert_array_equal(np.flatnonzero(newline), np.arange(14, 32 * 210, 15))
    np.testing.assert_allclose(layout.weight.sum(1), 1.0, rtol=0, atol=1e-6)
    used = layout.src[~newline][layout.weight[~newline] != 0]
    assert used.min() == 0 and used.max() == 32 * 729 - 1  # frame f reads tile f only
    assert np.all(layout.src[:210][~newline[:210]] < 729)


# u = 27 features a side (the 384-px geometry: odd, 27 -> 14), and 4 and 5.
@pytest.mark.parametrize("image_size", [384, pytest.param(56, marks=pytest.mark.slow),
                                        pytest.param(70, marks=pytest.mark.slow)])
def test_video_features_match_llava_onevision(image_size):
    import torch
    import transformers
    from flax import nnx

    from lladav_jax.checkpoints import torch_reference as ref
    from lladav_jax.models import hf_params
    from lladav_jax.models.lladav import LLaDAV

    cfg = variants.model_config("tiny")
    cfg.vision.image_size = image_size
    cfg.image.max_visual_tokens = 1024
    # Read at vision layer -2 of the 3-layer tower (our 2 kept layers), no post-layernorm.
    hf = ref.randomize(transformers.LlavaOnevisionForConditionalGeneration(
        ref.onevision_config(cfg)), scale=0.1)
    ours = LLaDAV(cfg, rngs=nnx.Rngs(0))
    hf_params.load_hf(ours, ref.official_from_onevision(hf, cfg), hf_params.lladav_entries(cfg),
                      cfg)
    rng = np.random.default_rng(image_size)
    num_frames = 3
    frames = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(num_frames)]
    video = process_frames(frames, cfg)
    v, start = video.layout.num_tokens, 2
    s = pooled_side(cfg)
    assert v == num_frames * s * (s + 1)
    batch = collate_visual([[(video, start)]], cfg, v + 5)
    got = np.asarray(ours.embed_inputs(np.zeros((1, v + 5), np.int32), **batch))[0]

    pixels = torch.from_numpy(video.tiles.transpose(0, 3, 1, 2).copy())[None]  # [1, F, 3, S, S]
    with torch.no_grad():  # tower -> projector -> bilinear apply_pooling, one newline at the end
        out = hf.model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy="full")
    pooled = out.pooler_output[0].numpy()
    newline = hf.model.image_newline.detach().numpy()
    np.testing.assert_array_equal(pooled[-1], newline)
    grid = pooled[:-1].reshape(num_frames, s, s, -1)  # rows of s, then the newline (`grid`)
    rows = np.concatenate([grid, np.broadcast_to(newline, (num_frames, s, 1, len(newline)))], 2)
    want = rows.reshape(-1, len(newline))
    np.testing.assert_allclose(got[start:start + v], want, rtol=0, atol=1e-5)
    assert np.abs(want[: s * (s + 1)] - want[s * (s + 1): 2 * s * (s + 1)]).max() > 1e-3


# --- Decoding and skips ---------------------------------------------------------------------


def noise_frames(n: int, size=(64, 48), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), np.uint8) for _ in range(n)]


def write_faststart(path, frames, fps: int) -> None:
    """An MP4 with its index (moov) first: cut short, its header still reads."""
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as c:
        stream = c.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for array in frames:
            c.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        c.mux(stream.encode())


def write_audio_only(path) -> None:
    with av.open(str(path), mode="w", format="mp4") as c:
        stream = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 8000
        c.mux(stream.encode(frame))
        c.mux(stream.encode())


def write_no_frames(path, fmt: str) -> None:
    """A video stream without a frame: an AVI keeps it (no frames), an MP4 drops the track."""
    with av.open(str(path), mode="w", format=fmt) as c:
        stream = c.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()  # the header, written at the first packet otherwise


def conv(question: str = "<image>\nWhat happens?") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "a cat runs"}]


@pytest.fixture
def videos(tmp_path):
    """A video folder with good, bad and missing videos, and a good one outside it."""
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(str(folder / "good.mp4"), noise_frames(10), 2)  # frames 0 2 4 6 8 chosen
    write_video(str(tmp_path / "outside.mp4"), noise_frames(10), 2)
    (folder / "garbage.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    whole = (folder / "good.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # the index is at the end
    write_faststart(folder / "fast.mp4", noise_frames(10, seed=2), 2)
    fast = (folder / "fast.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(fast[: len(fast) // 2])  # header fine, stream ends early
    write_audio_only(folder / "audio.mp4")
    write_no_frames(folder / "empty.mp4", "mp4")
    write_no_frames(folder / "empty.avi", "avi")
    return tmp_path, folder


def source(tmp_path, rows: list[dict]) -> LlavaJsonSource:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return LlavaJsonSource(path, tmp_path / "images", tmp_path / "videos")


def featurizer(cfg=CFG) -> Featurizer:
    return Featurizer(cfg, TOK, seq_len=512)


def test_good_video(videos):
    tmp_path, folder = videos
    raw = source(tmp_path, [{"id": "good", "video": "good.mp4", "conversations": conv()}])[0]
    measured = featurizer().measure(raw)
    assert measured.video == probe(folder / "good.mp4") and measured.image_tiles == (5,)
    ex = featurizer()(raw)
    assert isinstance(ex, Example) and len(ex.images) == 1
    (video,) = ex.images
    s = pooled_side(CFG)
    assert video.tiles.shape == (5, 56, 56, 3) and video.size == (64, 48)
    assert video.layout.num_tokens == 5 * s * (s + 1) == measured.image_tokens[0] == 30
    start = ex.image_starts[0]
    assert (ex.tokens[start:start + 30] == TOK.placeholder_id).all()
    assert ex.tokens[start - 1] != TOK.placeholder_id != ex.tokens[start + 30]
    want = process_frames(read_frames(folder / "good.mp4", [0, 2, 4, 6, 8]), CFG)
    np.testing.assert_array_equal(video.tiles, want.tiles)


def test_probe_counts_frames_a_header_does_not_give(tmp_path):
    path = tmp_path / "clip.mkv"  # Matroska stores no frame count: probe counts the packets
    with av.open(str(path), mode="w", format="matroska") as c:
        stream = c.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for array in noise_frames(7):
            c.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        c.mux(stream.encode())
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    info = probe(path)
    assert (info.frames, info.fps, info.width, info.height) == (7, 5.0, 64, 48)
    assert len(read_frames(path, [0, 6])) == 2
    assert probe(path.read_bytes()) == info  # bytes as from an ArrayRecord


def test_bad_videos_are_skipped_by_reason(videos, monkeypatch):
    tmp_path, folder = videos
    good = str(folder / "good.mp4")
    rows = [
        {"id": "missing", "video": "nope.mp4", "conversations": conv()},
        {"id": "garbage", "video": "garbage.mp4", "conversations": conv()},
        {"id": "truncated", "video": "truncated.mp4", "conversations": conv()},
        {"id": "cut", "video": "cut.mp4", "conversations": conv()},
        {"id": "audio", "video": "audio.mp4", "conversations": conv()},
        {"id": "empty", "video": "empty.avi", "conversations": conv()},
        {"id": "empty_mp4", "video": "empty.mp4", "conversations": conv()},
        {"id": "escape", "video": "../outside.mp4", "conversations": conv()},
        {"id": "both", "video": "good.mp4", "image": "x.png", "conversations": conv()},
        {"id": "no_tag", "video": "good.mp4", "conversations": conv("What happens?")},
        {"id": "two_tags", "video": "good.mp4", "conversations": conv("<image> <image>\nAnd?")},
    ]
    src = source(tmp_path, rows)
    raws = [src[i] for i in range(len(src))]
    # A source's header that claims more frames than the stream holds; one claiming none;
    # and one no frame choice can use.
    raws.append({"id": "overclaimed", "videos": [good], "conversations": conv(),
                 "_video_info": [40, 2.0, 64, 48]})  # wants frame 38 of 10
    raws.append({"id": "zero", "videos": [good], "conversations": conv(),
                 "_video_info": [0, 2.0, 64, 48]})
    raws.append({"id": "nan_fps", "videos": [good], "conversations": conv(),
                 "_video_info": [10, float("nan"), 64, 48]})
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    want = {"missing": ("missing_video", "nope.mp4"), "garbage": ("corrupt_video", "cannot open"),
            "truncated": ("corrupt_video", "truncated.mp4"),
            "cut": ("corrupt_video", "ends early"), "audio": ("corrupt_video", "no video stream"),
            "empty": ("empty_video", "no frames"),
            "empty_mp4": ("corrupt_video", "no video stream"),
            "escape": ("unsafe_path", "outside.mp4"),
            "both": ("malformed", "not both"), "no_tag": ("image_tag_mismatch", "0 <image>"),
            "two_tags": ("image_tag_mismatch", "2 <image>"),
            "overclaimed": ("corrupt_video", "ends early"), "zero": ("empty_video", "no frames"),
            "nan_fps": ("malformed", "_video_info")}  # fmt: skip
    for raw in raws:
        out = featurizer()(raw)
        reason, named = want[raw["id"]]
        assert isinstance(out, Skip) and out.reason == reason and named in out.detail, out
        assert out.sample_id == raw["id"]
    assert not isinstance(featurizer().measure(raws[3]), Skip)  # cut: found by the decoding
    assert opened and not any("outside" in str(f) for f in opened)


def settings(**kw) -> ml_collections.ConfigDict:
    base = dict(seq_len=256, batch_size=2, seed=3, num_epochs=1, window=32, pack=True,
                group_by_length=False, num_workers=0, max_skip_fraction=0.5,
                min_seen_for_abort=1)  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


def test_pipeline_counts_skips_and_packs_frames_as_tiles(videos):
    from PIL import Image

    tmp_path, folder = videos
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "red.png")  # 2 tiles
    for k in range(4):  # 6 frames at 2 fps: frames 0 2 4, 3 tiles
        write_video(str(folder / f"v{k}.mp4"), noise_frames(6, seed=10 + k), 2)
    rows = [{"id": f"v{k}", "video": f"v{k}.mp4", "conversations": conv()} for k in range(4)]
    rows += [{"id": f"i{k}", "image": "red.png", "conversations": conv()} for k in range(4)]
    rows += [{"id": "missing", "video": "nope.mp4", "conversations": conv()},
             {"id": "garbage", "video": "garbage.mp4", "conversations": conv()},
             {"id": "escape", "video": "../outside.mp4", "conversations": conv()},
             {"id": "cut", "video": "cut.mp4", "conversations": conv()}]
    cfg = variants.model_config("tiny")
    # A video is 85 tokens and 3 tiles, an image sample 103 tokens and 2 tiles: in 192 tokens
    # two videos would fit, but not in 5 tiles; a video and an image fit both.
    cfg.image.max_tiles = 5
    feat = Featurizer(cfg, TOK, seq_len=192)
    assert [len(feat.measure(source(tmp_path, rows)[i])) for i in (0, 4)] == [85, 103]
    batches = list(pipeline.make_dataset(source(tmp_path, rows), feat, cfg,
                                         settings(seq_len=192), pad_id=TOK.pad_id))
    skips, local = collections.Counter(), collections.Counter()
    for b in batches:
        skips.update({r: int(n) for r, n in b["skips"].items()})
        local.update({r: int(n) for r, n in b["local_skips"].items()})
    assert +skips == {"missing_video": 1, "corrupt_video": 1, "unsafe_path": 1}
    assert +local == {"corrupt_video": 1}  # cut: its header reads, its frames do not
    assert sum(int(b["num_samples"]) for b in batches) == 9  # planned, cut included
    tiles_per_row, shared = [], 0
    for b in batches:
        for i in range(b["tokens"].shape[0]):
            tiles = int(np.any(b["pixels"][i] != 0, axis=(1, 2, 3)).sum())  # never 0 if used
            tiles_per_row.append(tiles)
            placeholders = int(((b["tokens"][i] == TOK.placeholder_id)
                                & (b["segment_ids"][i] > 0)).sum())
            assert placeholders == int((b["visual_pos"][i] < b["tokens"].shape[1]).sum())
            shared += int(b["segment_ids"][i].max() > 1 and tiles == 5)
    assert max(tiles_per_row) <= cfg.image.max_tiles
    assert sum(tiles_per_row) == 3 * 4 + 2 * 4  # the cut video's place is padding
    assert shared == 4  # each video packed with an image, never with another video


# --- The decoded frames are the chosen ones -------------------------------------------------


def numbered_frame(k: int, w: int = 64, h: int = 48) -> np.ndarray:
    """Frame k shows its number in 8 bars of w/8 pixels, white for a 1 bit (low bit left)."""
    bars = np.array([(k >> b) & 1 for b in range(8)], np.uint8) * 255
    return np.repeat(np.repeat(bars[None, :, None], h, 0), w // 8, 1).repeat(3, 2)


def frame_number(pixels: np.ndarray) -> int:
    """The number `numbered_frame` drew, from a frame of any size (codec error tolerated)."""
    w = pixels.shape[1]
    centres = ((np.arange(8) + 0.5) * w / 8).astype(int)
    bits = pixels[:, centres].mean(axis=(0, 2)) > pixels.max() / 2
    return int(sum(int(bit) << b for b, bit in enumerate(bits)))


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_decoded_frames_are_the_chosen_ones(tmp_path, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    path = tmp_path / "numbered.mp4"
    write_video(str(path), [numbered_frame(k) for k in range(100)], 10, codec=codec)
    info = probe(path)
    assert (info.frames, info.fps, info.width, info.height) == (100, 10.0, 64, 48)
    for max_frames, want in ((32, list(range(0, 100, 10))), (4, [0, 33, 66, 99])):
        chosen = frame_indices(info.frames, info.fps, 1.0, max_frames)
        assert chosen == want
        frames = read_frames(path, chosen)
        assert [frame_number(f) for f in frames] == want
        for k, frame in zip(want, frames):  # and the pixels are those of the frame drawn
            assert np.abs(frame.astype(int) - numbered_frame(k)).mean() < 8
    # Through the featurizer: its tiles (resized, normalised) show the chosen frames.
    cfg = variants.model_config("tiny")
    cfg.video.max_frames = 4
    raw = {"id": "n", "videos": [str(path)], "conversations": conv()}
    ex = featurizer(cfg)(raw)
    tiles = ((ex.images[0].tiles + 1) * 127.5).round()
    assert [frame_number(t) for t in tiles] == [0, 33, 66, 99]
    # Indices as given: in any order, repeats allowed (decoded once).
    assert [frame_number(f) for f in read_frames(path, [5, 5, 2])] == [5, 5, 2]
