"""RawSample -> Example | Skip: validate, load images, apply the chat template, fit the length.

Two steps, so that a process can plan its batches from every sample but decode only the images
of its own rows (`data/pipeline.py`): `Featurizer.measure` does all but the pixel work (image
sizes come from the headers) and gives the final tokens; `Featurizer.add_pixels` decodes and
tiles the images. One code path makes the tokens, so a measured length is the featurized one.

Bad data never raises here: it becomes a `Skip` with a reason from `SKIP_REASONS` and a detail
naming the file or field at fault. Only programming and configuration errors raise.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from lladav_jax.data.example import SKIP_REASONS, Example, Measured, RawSample, Skip
from lladav_jax.data.image import process_image
from lladav_jax.data.layout import best_grid, num_visual_tokens
from lladav_jax.data.template import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_TAG,
    ROLES,
    TEMPLATES,
    encode_conversation,
    move_image_tag_first,
)
from lladav_jax.data.tokenizer import Tokenizer

OVERLONG = ("drop", "truncate")
# Pillow's own bomb threshold (it only warns up to twice this); we refuse above it.
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height

ImageRef = bytes | bytearray | memoryview | str | os.PathLike


class ImageLoadError(ValueError):
    """An image that cannot be used; `reason` is 'missing_image' or 'corrupt_image'."""

    def __init__(self, reason: str, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.reason, self.name = reason, name


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited over white (as transformers does)."""
    if image.mode == "RGB":
        return image
    if image.mode in (*_SIXTEEN_BIT, "I", "F"):
        # Pillow's convert clips these to 0..255; rescale 16-bit data to 8 bits instead.
        a = np.asarray(image, dtype=np.float64)
        if image.mode in _SIXTEEN_BIT or (image.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif image.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # P, L, 1, CMYK, YCbCr, ...


@contextlib.contextmanager
def _opened(ref: ImageRef, name: str | None,
            max_pixels: int | None) -> Iterator[tuple[Image.Image, str]]:
    """(image, name): the image at `ref` with its header read and its pixels not decoded yet
    (Pillow decodes lazily), refused above `max_pixels`; the file stays open inside."""
    if isinstance(ref, str | os.PathLike):
        path = os.fspath(ref)
        name = name or path or "<empty path>"
        if not os.path.exists(path):
            raise ImageLoadError("missing_image", name, "no such file")
        try:
            stream: Any = open(path, "rb")  # noqa: SIM115  (closed below)
        except OSError as e:
            raise ImageLoadError("corrupt_image", name, f"cannot read ({e})") from e
    elif isinstance(ref, bytes | bytearray | memoryview):
        stream = io.BytesIO(ref)
        name = name or f"<{len(stream.getbuffer())} bytes>"
    else:
        raise TypeError(f"an image is bytes or a path, got {type(ref).__name__}")
    with stream:
        try:
            with warnings.catch_warnings():
                # Our own pixel limit below replaces Pillow's warning.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream)
            width, height = image.size
        except Image.DecompressionBombError as e:
            raise ImageLoadError("corrupt_image", name, f"decompression bomb ({e})") from e
        except Exception as e:  # Pillow raises many types on bad data (OSError, SyntaxError, ...)
            raise ImageLoadError(
                "corrupt_image", name, f"cannot decode ({type(e).__name__}: {e})"
            ) from e
        if max_pixels is not None and width * height > max_pixels:
            raise ImageLoadError(
                "corrupt_image", name,
                f"{width}x{height} pixels exceeds {max_pixels} (decompression bomb?)",
            )  # fmt: skip
        yield image, name


def image_size(
    ref: ImageRef, *, name: str | None = None, max_pixels: int | None = MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of the image `load_image` returns, from the header alone (no pixels
    decoded): what the measure step needs. Raises `ImageLoadError` as `load_image` does for
    what a header shows (missing file, unreadable header, too many pixels).

    EXIF orientation is read where the header holds it; a PNG's eXIf chunk after the image
    data is not (reading it decodes the pixels), so such a rotated PNG measures as stored and
    `Featurizer.add_pixels` skips it as corrupt_image (its size differs from its measure)."""
    with _opened(ref, name, max_pixels) as (image, _):
        width, height = image.size
        orientation = 1
        if image.format != "PNG" or "exif" in image.info:  # PNG's getexif() would decode
            with contextlib.suppress(Exception):  # a broken EXIF block: used as stored
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        return (height, width) if orientation in _TRANSPOSED else (width, height)


def load_image(
    ref: ImageRef, *, name: str | None = None, max_pixels: int | None = MAX_PIXELS
) -> Image.Image:
    """Decodes an image from encoded bytes or a path into an RGB `PIL.Image`.

    EXIF orientation is applied (`ImageOps.exif_transpose`): a deliberate fix, the official code
    ignores EXIF and trains on phone photos lying on their side. Raises `ImageLoadError`
    (reason 'missing_image' or 'corrupt_image', message naming `name` or the path) for a missing
    file, undecodable or truncated data, or more than `max_pixels` pixels (a decompression bomb).
    """
    with _opened(ref, name, max_pixels) as (image, name):
        try:
            image.load()  # truncated files fail here (LOAD_TRUNCATED_IMAGES stays off)
        except Exception as e:
            raise ImageLoadError(
                "corrupt_image", name, f"cannot decode ({type(e).__name__}: {e})"
            ) from e
    # A broken EXIF block leaves the image as stored: its pixels are still good.
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    try:
        return _to_rgb(image)
    except Exception as e:
        raise ImageLoadError(
            "corrupt_image", name, f"cannot convert mode {image.mode} to RGB"
        ) from e


class _Skipped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _turns(raw: Mapping) -> list[dict[str, str]]:
    """Validated LLaVA turns (human first, alternating), single image tags moved first."""
    if "conversations" not in raw:
        raise _Skipped("malformed", "missing field 'conversations'")
    conv = raw["conversations"]
    if not isinstance(conv, list | tuple):
        raise _Skipped("malformed", f"'conversations' is a {type(conv).__name__}, not a list")
    if not conv:
        raise _Skipped("empty_conversation", "'conversations' is empty")
    turns = []
    for k, turn in enumerate(conv):
        where = f"conversations[{k}]"
        if not isinstance(turn, Mapping):
            raise _Skipped("malformed", f"{where} is a {type(turn).__name__}, not a dict")
        sender, value = turn.get("from"), turn.get("value")
        if not isinstance(sender, str) or sender not in ROLES:
            raise _Skipped("malformed", f"{where}.from is {sender!r}, not one of {sorted(ROLES)}")
        if not isinstance(value, str):
            raise _Skipped("malformed", f"{where}.value is a {type(value).__name__}, not a str")
        expected = "human" if k % 2 == 0 else "gpt"
        if sender != expected:
            raise _Skipped("malformed", f"{where}.from is {sender!r}; turns alternate from 'human'")
        if sender == "gpt" and IMAGE_TAG in value:
            raise _Skipped("malformed", f"{where} is an answer holding an {IMAGE_TAG} tag")
        if sender == "human":
            value = move_image_tag_first(value)  # as the official preprocess_multimodal
        turns.append({"from": sender, "value": value})
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise _Skipped("empty_conversation", "no assistant answer")
    return turns


def _marked(raw: Mapping, key: str) -> set[int]:
    """The image indices a source listed under `key` (`_missing_images`, `_unsafe_images`)."""
    marked = raw.get(key)
    if not isinstance(marked, list | tuple):
        return set()
    return {m for m in marked if isinstance(m, int | np.integer)}


def _unsafe_detail(name: str) -> str:
    return f"{name}: leaves the image folder (not opened)"


def _image_refs(raw: Mapping) -> tuple[list, list[str]]:
    """The sample's images (`images`, else the `image` field as paths) and a name for each."""
    listed = raw.get("image")
    listed = [listed] if isinstance(listed, str) else listed
    field, refs = "images", raw.get("images")
    if refs is None:
        field, refs = "image", [] if listed is None else listed
    if not isinstance(refs, list | tuple):
        raise _Skipped("malformed", f"'{field}' is a {type(refs).__name__}, not a list")
    names = []
    for k, ref in enumerate(refs):
        if isinstance(ref, str | os.PathLike):
            names.append(os.fspath(ref))
        elif isinstance(ref, bytes | bytearray | memoryview):
            has_name = isinstance(listed, list | tuple) and len(listed) == len(refs)
            names.append(str(listed[k]) if has_name else f"images[{k}]")
        else:
            raise _Skipped(
                "malformed", f"images[{k}] is a {type(ref).__name__}, not bytes or a path"
            )
    return list(refs), names


class Featurizer:
    """RawSample -> Example | Skip for one model config, tokenizer and template.

    overlong: 'drop' skips a sample longer than `seq_len` (too_long); 'truncate' cuts it after
    the last assistant turn that fits (never inside an answer or an image), and skips it only if
    not even the first answer fits.
    """

    def __init__(
        self,
        cfg,
        tokenizer: Tokenizer,
        *,
        template: str = "llava_llada",
        seq_len: int = 2048,
        system: str = DEFAULT_SYSTEM_PROMPT,
        overlong: str = "drop",
        max_pixels: int | None = MAX_PIXELS,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if tokenizer.vocab_size > cfg.text.vocab_size:
            raise ValueError(
                f"the tokenizer needs {tokenizer.vocab_size} embedding rows but the model has "
                f"vocab_size {cfg.text.vocab_size}"
            )
        self.cfg, self.tokenizer, self.template = cfg, tokenizer, template
        self.seq_len, self.system, self.overlong = int(seq_len), system, overlong
        self.max_pixels = max_pixels

    def __call__(self, raw: RawSample) -> Example | Skip:
        """The whole featurization: `measure`, then `add_pixels`."""
        measured = self.measure(raw)
        return measured if isinstance(measured, Skip) else self.add_pixels(measured, raw)

    def measure(self, raw: RawSample) -> Measured | Skip:
        """Everything but the pixels: validation, image sizes from the headers (or the
        source's `_image_sizes`), the template, the length fit and the visual limits. The
        tokens are final: `add_pixels` only adds the images, so a plan made from measures
        holds exactly the lengths of the featurized samples."""
        sample_id = str(raw.get("id", "")) if isinstance(raw, Mapping) else ""
        try:
            return self._measure(raw, sample_id)
        except _Skipped as s:
            return Skip(s.reason, sample_id, s.detail)

    def add_pixels(self, measured: Measured, raw: RawSample) -> Example | Skip:
        """Decodes, resizes and tiles the images `measure` kept (of the full sample `raw`,
        whose measure `measured` is). Data the headers did not show to be bad (truncated pixel
        data, a size other than the header's) is a Skip here."""
        try:
            refs, names = _image_refs(raw)
            unsafe = _marked(raw, "_unsafe_images")  # `measure` skips these; never open them
            images = []
            for k, (ref, name, size, count) in enumerate(zip(refs, names, measured.image_sizes,
                                                             measured.image_tokens)):  # kept
                if k in unsafe:
                    raise _Skipped("unsafe_path", _unsafe_detail(name))
                try:
                    pil = load_image(ref, name=name, max_pixels=self.max_pixels)
                except ImageLoadError as e:
                    raise _Skipped(e.reason, str(e)) from e
                if pil.size != tuple(size):
                    raise _Skipped("corrupt_image", f"{name}: decoded {pil.size[0]}x"
                                   f"{pil.size[1]}, its header says {size[0]}x{size[1]}")
                image = process_image(pil, self.cfg)
                if image.layout.num_tokens != count:  # the host count must match the layout
                    raise RuntimeError(f"{name}: layout has {image.layout.num_tokens} tokens, "
                                       f"expected {count}")  # fmt: skip
                images.append(image)
        except _Skipped as s:
            return Skip(s.reason, measured.sample_id, s.detail)
        return Example(measured.sample_id, measured.tokens, measured.targets, tuple(images),
                       measured.image_starts)

    def _tiles(self, size: tuple[int, int]) -> int:
        if self.cfg.image.aspect_ratio == "plain":
            return 1
        cols, rows = best_grid(size, self.cfg)
        return 1 + cols * rows  # base tile + grid

    def _sizes(self, raw: Mapping, refs: list, names: list[str]) -> list[tuple[int, int]]:
        """(width, height) of each image: the source's `_image_sizes`, else the headers'."""
        missing = _marked(raw, "_missing_images")  # missing when packed (sources/array_record.py)
        unsafe = _marked(raw, "_unsafe_images")  # outside the image folder (sources/)
        given = raw.get("_image_sizes")
        if given is not None and not (
                isinstance(given, list | tuple) and len(given) == len(refs)
                and all(isinstance(s, list | tuple) and len(s) == 2
                        and all(isinstance(v, int | np.integer) and v > 0 for v in s)
                        for s in given)):
            raise _Skipped("malformed", f"'_image_sizes' is not one [width, height] per "
                                        f"image: {given!r:.80}")  # fmt: skip
        sizes = []
        for k, (ref, name) in enumerate(zip(refs, names)):
            if k in unsafe:  # checked first: such a path is never opened, nor was it packed
                raise _Skipped("unsafe_path", _unsafe_detail(name))
            if k in missing:
                raise _Skipped("missing_image", f"{name}: missing when the records were packed")
            if given is not None:
                sizes.append((int(given[k][0]), int(given[k][1])))
                continue
            try:
                sizes.append(image_size(ref, name=name, max_pixels=self.max_pixels))
            except ImageLoadError as e:
                raise _Skipped(e.reason, str(e)) from e
        return sizes

    def _measure(self, raw: RawSample, sample_id: str) -> Measured:
        if not isinstance(raw, Mapping):
            raise _Skipped("malformed", f"a sample is a dict, got {type(raw).__name__}")
        if raw.get("_error"):  # a source marked it: "<reason>: <what>" (data/sources/)
            reason, _, what = str(raw["_error"]).partition(": ")
            if reason not in SKIP_REASONS:
                reason, what = "malformed", str(raw["_error"])
            raise _Skipped(reason, what)
        turns = _turns(raw)
        if self.template == "plain" and len(turns) != 2:
            raise _Skipped("malformed", f"the plain template takes one human and one gpt turn, "
                                        f"got {len(turns)} turns")  # fmt: skip
        refs, names = _image_refs(raw)
        n_tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
        if n_tags != len(refs):
            listed = f" ({', '.join(names)})" if names else ""
            raise _Skipped(
                "image_tag_mismatch", f"{n_tags} {IMAGE_TAG} tags but {len(refs)} images{listed}"
            )
        sizes = self._sizes(raw, refs, names)
        counts = [num_visual_tokens(*size, self.cfg) for size in sizes]
        enc = encode_conversation(self.template, self.tokenizer, turns, counts, system=self.system)
        tokens, targets, starts = enc.tokens, enc.targets, enc.image_starts
        if len(tokens) > self.seq_len:
            fits = [c for c in enc.cut_points if c <= self.seq_len]
            if self.overlong == "drop" or not fits:
                why = "" if self.overlong == "drop" else " (the first answer does not fit)"
                raise _Skipped("too_long", f"{len(tokens)} tokens > seq_len {self.seq_len}{why}")
            cut = max(fits)  # the end of an assistant turn: no answer, no image is split
            tokens, targets = tokens[:cut], targets[:cut]
            starts = tuple(s for s in starts if s < cut)
            sizes, counts, names = sizes[: len(starts)], counts[: len(starts)], names[: len(starts)]
        tiles = [self._tiles(size) for size in sizes]
        if sum(tiles) > self.cfg.image.max_tiles or sum(counts) > self.cfg.image.max_visual_tokens:
            raise _Skipped(
                "too_many_visual",
                f"{sum(tiles)} tiles / {sum(counts)} visual tokens > max_tiles "
                f"{self.cfg.image.max_tiles} / max_visual_tokens "
                f"{self.cfg.image.max_visual_tokens} ({', '.join(names)})",
            )
        return Measured(sample_id, tokens, targets, tuple(starts), tuple(sizes), tuple(counts),
                        tuple(tiles))
