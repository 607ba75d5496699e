"""Visual token layout: where each visual token of an image comes from (host side, numpy only).

LLaDA-V (like LLaVA-OneVision, `anyres_max_N` + `spatial_unpad`) turns the tile features of an
image into a token sequence: the base tile's P = u*u tokens, then the grid tiles' features as
one (u*rows, u*cols) map, unpadded to the image's aspect ratio, bilinearly downsampled when
larger than about N tiles, with `image_newline` after every row. Every step is a fixed linear
map of the tile features, so we express each token as up to 4 (source, weight) taps into the
image's flat tile features [n_tiles * P] (or NEWLINE). The model then does one weighted gather
with static shapes, and the host knows the token count from the image size alone.

Two more layouts (docs/design.md §2.5, §2.6): an image of a sample with several images is one
padded tile with one `image_newline` after its P tokens (`pad_layout`, 730 tokens at 384 px;
no newline under stage 1's plain layout);
a video's frames are one tile each, every frame's u x u map bilinearly pooled to
ceil(u / stride) per side with `image_newline` after every row (`video_layout`, 210 tokens a
frame at 384 px).

All sizes are (width, height) as in PIL and the official LLaVA code; grids are (cols, rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NEWLINE = -1  # tap source meaning the learned `image_newline` vector
TAPS = 4


@dataclass(frozen=True, eq=False)
class VisualLayout:
    """src int32 [V, 4] (t*P + p, or NEWLINE), weight float32 [V, 4]; unused taps: (0, 0.0)."""

    src: np.ndarray
    weight: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.src.shape[0])


def grid_pinpoints(tile: int, max_grid: int) -> list[tuple[int, int]]:
    """(width, height) of every cols x rows grid, in LLaVA's `(1x1),...,(6x6)` order."""
    # LLaVA-NeXT expands the range as [(i, j) for i ... for j ...] and reads pairs as (w, h).
    n = range(1, max_grid + 1)
    return [(i * tile, j * tile) for i in n for j in n]


def select_best_resolution(
    size_wh: tuple[int, int], candidates: list[tuple[int, int]]
) -> tuple[int, int]:
    """LLaVA's choice: max effective resolution, then min wasted area; first wins ties."""
    width, height = size_wh
    best, best_eff, best_waste = None, 0, float("inf")
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    return best


def best_grid(size_wh: tuple[int, int], cfg) -> tuple[int, int]:
    """(cols, rows) of tiles that AnyRes picks for an image of this size."""
    tile = cfg.vision.image_size
    w, h = select_best_resolution(size_wh, grid_pinpoints(tile, cfg.image.max_grid))
    return w // tile, h // tile


def _tokens_per_side(cfg) -> int:
    return cfg.vision.image_size // cfg.vision.patch_size


def _grid_geometry(size_wh, grid, u: int, max_num_patches: int, hf_rounding: bool):
    """(row0, col0, h, w, out_h, out_w): unpadded window of the grid map and its output size."""
    width, height = size_wh
    cols, rows = grid
    cur_h, cur_w = u * rows, u * cols
    # LLaVA's unpad_image truncates; transformers rounds to 7 digits first (they differ
    # when the float product lands just below an integer, e.g. 820x738).
    trunc = (lambda x: int(round(x, 7))) if hf_rounding else int
    if width / height > cur_w / cur_h:
        pad = (cur_h - trunc(height * (cur_w / width))) // 2
        r0, c0, h, w = pad, 0, cur_h - 2 * pad, cur_w
    else:
        pad = (cur_w - trunc(width * (cur_h / height))) // 2
        r0, c0, h, w = 0, pad, cur_h, cur_w - 2 * pad
    times = math.sqrt(h * w / (max_num_patches * u**2))
    if times > 1.1:
        return r0, c0, h, w, int(h // times), int(w // times)
    return r0, c0, h, w, h, w


def _max_num_patches(cfg) -> int:
    return int(cfg.image.max_num_patches)


def image_mode(num_images: int, cfg) -> str:
    """How each image of a sample with `num_images` images is laid out: `pad` for several
    (the official `process_image(f, "pad")`, whatever the aspect ratio), else `anyres` or, for
    the stage-1 `plain` aspect ratio, `plain`."""
    aspect = str(cfg.image.aspect_ratio)
    if aspect != "plain" and not aspect.startswith("anyres_max"):
        raise ValueError(f"unsupported image.aspect_ratio {aspect!r}")
    if num_images > 1:
        return "pad"
    return "plain" if aspect == "plain" else "anyres"


def pad_newline(cfg) -> bool:
    """Whether a `pad` image's tokens end with a newline: under the `spatial_unpad` merge of
    AnyRes (stages 2-3), not under stage 1's `flat` merge."""
    return cfg.image.aspect_ratio != "plain"


def num_tiles(width: int, height: int, cfg, mode: str = "anyres") -> int:
    """Tiles of one image in `mode` (`image_mode`): 1, or the base tile + the AnyRes grid."""
    if mode != "anyres":
        return 1
    cols, rows = best_grid((width, height), cfg)
    return 1 + cols * rows


def num_visual_tokens(width: int, height: int, cfg, *, hf_rounding: bool = False,
                      mode: str | None = None) -> int:
    """Visual tokens of a width x height image, from its size alone (no pixels); `mode` as
    `image_mode` gives it (default: a sample's only image)."""
    u = _tokens_per_side(cfg)
    mode = mode or image_mode(1, cfg)
    if mode == "plain":
        return u * u
    if mode == "pad":
        return u * u + pad_newline(cfg)
    grid = best_grid((width, height), cfg)
    *_, out_h, out_w = _grid_geometry((width, height), grid, u, _max_num_patches(cfg), hf_rounding)
    return u * u + out_h * (out_w + 1)


def _linear_taps(n_in: int, n_out: int):
    """torch bilinear (align_corners=False, size given) along one axis: i0, i1, l0, l1."""
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    # torch: float32 scale = in/out, source = scale * (dst + 0.5) - 0.5 as one fused
    # multiply-add rounded to float32 (exact in float64 here; bit-exact vs torch CPU), clamped at 0.
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    real = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
    real = np.maximum(real, np.float32(0))
    i0 = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    l1 = np.clip(real - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def plain_layout(cfg) -> VisualLayout:
    """Stage-1 layout: one tile, its P tokens in order, no newline."""
    p = _tokens_per_side(cfg) ** 2
    src = np.zeros((p, TAPS), np.int32)
    weight = np.zeros((p, TAPS), np.float32)
    src[:, 0], weight[:, 0] = np.arange(p), 1.0
    return VisualLayout(src, weight)


def _bilinear(source, row_taps, col_taps) -> tuple[np.ndarray, np.ndarray]:
    """The 4 taps of a bilinear resize: src int [H, W, 4] (`source(rows, cols)` gives the flat
    feature index of each pair) and weight float32 [H, W, 4]; unused taps: source 0, weight 0.
    row_taps / col_taps: `_linear_taps` along each axis."""
    ri0, ri1, rl0, rl1 = row_taps
    ci0, ci1, cl0, cl1 = col_taps
    src = np.stack([source(ri0, ci0), source(ri0, ci1), source(ri1, ci0), source(ri1, ci1)],
                   axis=-1)
    w = np.stack([np.outer(rl0, cl0), np.outer(rl0, cl1), np.outer(rl1, cl0), np.outer(rl1, cl1)],
                 axis=-1).astype(np.float32)
    return np.where(w != 0, src, 0), w


def _with_newlines(src: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps [..., H, W, 4] with one NEWLINE token closing every row, flattened to [N, 4]
    (src int32, weight float32)."""
    nl_src = np.zeros((*src.shape[:-2], 1, TAPS), np.int64)
    nl_src[..., 0] = NEWLINE
    nl_w = np.zeros(nl_src.shape, np.float32)
    nl_w[..., 0] = 1.0
    rows_src = np.concatenate([src, nl_src], axis=-2).reshape(-1, TAPS).astype(np.int32)
    return rows_src, np.concatenate([w, nl_w], axis=-2).reshape(-1, TAPS)


def anyres_layout(
    size_wh: tuple[int, int], grid: tuple[int, int], cfg, *, hf_rounding: bool = False
) -> VisualLayout:
    """Layout for an image of `size_wh` cut into a `grid` = (cols, rows) of tiles + base tile.

    Tiles are numbered as `process_image` emits them: 0 = base, then the grid row by row.
    """
    u = _tokens_per_side(cfg)
    p = u * u
    cols, _ = grid
    geometry = _grid_geometry(size_wh, grid, u, _max_num_patches(cfg), hf_rounding)
    r0, c0, h, w, out_h, out_w = geometry

    def source(rows_idx, cols_idx):  # [out_h], [out_w] -> [out_h, out_w] flat feature index
        y = (r0 + rows_idx)[:, None]
        x = (c0 + cols_idx)[None, :]
        tile = 1 + (y // u) * cols + x // u
        return tile * p + (y % u) * u + x % u

    rows_src, rows_w = _with_newlines(*_bilinear(source, _linear_taps(h, out_h),
                                                 _linear_taps(w, out_w)))
    base = plain_layout(cfg)
    src = np.concatenate([base.src, rows_src])
    weight = np.concatenate([base.weight, rows_w])
    return VisualLayout(src, weight)


def pad_layout(cfg) -> VisualLayout:
    """One image of several (`pad`): the tile's P tokens in order, then one newline (none under
    stage 1's plain layout, `pad_newline`)."""
    base = plain_layout(cfg)
    if not pad_newline(cfg):
        return base
    return VisualLayout(*_with_newlines(base.src[None], base.weight[None]))  # one row of P


def pooled_side(cfg) -> int:
    """Tokens per side of a pooled video frame: ceil(u / video.pool_stride)."""
    return math.ceil(_tokens_per_side(cfg) / cfg.video.pool_stride)


def video_tokens(num_frames: int, cfg) -> int:
    """Visual tokens of a video of `num_frames` chosen frames: a pooled side s, s * (s + 1)
    per frame (its rows, each closed by a newline)."""
    side = pooled_side(cfg)
    return num_frames * side * (side + 1)


def video_layout(num_frames: int, cfg) -> VisualLayout:
    """The frames' u x u maps (tile f = frame f) bilinearly resized to s x s (torch's
    `interpolate(mode="bilinear")`, align_corners False) and laid row after row, frame after
    frame, each row of s tokens closed by `image_newline` (the official `grid` newlines)."""
    u, s = _tokens_per_side(cfg), pooled_side(cfg)
    taps = _linear_taps(u, s)
    src, w = _bilinear(lambda r, c: r[:, None] * u + c[None, :], taps, taps)  # inside a frame
    frames = np.arange(num_frames)[:, None, None, None] * (u * u)  # tile f = frame f
    frame_src = np.where(w != 0, src[None] + frames, 0)  # [F, s, s, 4]
    return VisualLayout(*_with_newlines(frame_src, np.broadcast_to(w, frame_src.shape)))


def collate_visual(samples, cfg, seq_len: int,
                   with_pixels: bool = True) -> dict[str, np.ndarray]:
    """Pack a batch's images into fixed-shape arrays for the model.

    samples: per batch row, a list of (ProcessedImage, start) where `start` is the sequence
    position of the image's first placeholder (its V placeholders are consecutive).
    Returns pixels [B, T, S, S, 3] (not `with_pixels`: none, the caller brings features),
    visual_pos [B, Vmax] (seq_len = unused, dropped by the scatter), visual_src [B, Vmax, 4]
    into the row's T*P flat tile features (T*P = newline), visual_w [B, Vmax, 4].
    """
    t_max, v_max = int(cfg.image.max_tiles), int(cfg.image.max_visual_tokens)
    s = cfg.vision.image_size
    p = _tokens_per_side(cfg) ** 2
    b = len(samples)
    pixels = np.zeros((b, t_max, s, s, 3), np.float32) if with_pixels else None
    visual_pos = np.full((b, v_max), seq_len, np.int32)
    visual_src = np.zeros((b, v_max, TAPS), np.int32)
    visual_w = np.zeros((b, v_max, TAPS), np.float32)
    for i, images in enumerate(samples):
        n_tiles = sum(img.tiles.shape[0] for img, _ in images)
        n_tokens = sum(img.layout.num_tokens for img, _ in images)
        if n_tiles > t_max:
            raise ValueError(f"sample {i} needs {n_tiles} tiles > max_tiles {t_max}")
        if n_tokens > v_max:
            raise ValueError(
                f"sample {i} needs {n_tokens} visual tokens > max_visual_tokens {v_max}"
            )
        t_off = v_off = 0
        for img, start in images:
            n, v = img.tiles.shape[0], img.layout.num_tokens
            if start < 0 or start + v > seq_len:
                msg = f"sample {i}: image placeholders [{start}, {start + v}) exceed seq_len"
                raise ValueError(f"{msg} {seq_len}")
            if pixels is not None:
                pixels[i, t_off : t_off + n] = img.tiles
            visual_pos[i, v_off : v_off + v] = np.arange(start, start + v)
            src = img.layout.src
            visual_src[i, v_off : v_off + v] = np.where(src == NEWLINE, t_max * p, src + t_off * p)
            visual_w[i, v_off : v_off + v] = img.layout.weight
            t_off, v_off = t_off + n, v_off + v
    out = dict(visual_pos=visual_pos, visual_src=visual_src, visual_w=visual_w)
    return out if pixels is None else {"pixels": pixels, **out}
