"""Image files: the header (size, EXIF orientation) without the pixels, and the pixels as RGB.

Bad data raises `ImageLoadError` with a skip reason (missing_image or corrupt_image) and a
message naming the file; the featurizer turns it into a counted skip (`featurize.py`).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

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
