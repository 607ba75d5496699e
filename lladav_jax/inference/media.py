"""What a prompt may show the model: no image, one image, several images, or one video.

    m.generate("cat.png", "What is this?")                     # one image: AnyRes
    m.generate(["a.png", "b.png"], "Which one is red?")         # several: one padded tile each
    m.generate(lv.Video("clip.mp4"), "What happens?")          # a video: about a frame a second
    m.generate(lv.Video("clip.mp4", uniform=True), "...")      # video.max_frames frames, evenly

Images may be PIL images, paths or encoded bytes; a video a path or encoded bytes. Each is laid
out as in training (`data/image.py`, `data/video.py`; docs/design.md §2).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from PIL import Image

from lladav_jax.data.image import ProcessedImage, process_frames, process_images
from lladav_jax.data.image_file import load_image
from lladav_jax.data.video import probe, read_frames, video_frames

ImageInput = Image.Image | str | os.PathLike | bytes


@dataclasses.dataclass(frozen=True)
class Video:
    """A video for a prompt: a path or the encoded file's bytes. Frames are chosen as in
    training (about `video.fps` a second, at most `video.max_frames`), or with `uniform`
    `video.max_frames` frames spread evenly from the first to the last (as the official
    evaluation reads benchmark videos)."""

    source: str | os.PathLike | bytes
    uniform: bool = False


Visual = ImageInput | Sequence[ImageInput] | Video | None


def as_list(images: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, Image.Image | str | os.PathLike | bytes | bytearray | memoryview):
        return [images]
    return list(images)


def as_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return load_image(image)


def process_visual(visual: Visual, cfg) -> list[ProcessedImage]:
    """The prompt's visual inputs laid out for the model `cfg`: one per `<image>` tag (a video
    is one). Raises ValueError naming the file that cannot be read."""
    if isinstance(visual, Video):
        name = None if isinstance(visual.source, bytes) else os.fspath(visual.source)
        info = probe(visual.source, name=name)
        indices = video_frames(info, cfg, uniform=visual.uniform)
        return [process_frames(read_frames(visual.source, indices, name=name), cfg)]
    return process_images([as_pil(x) for x in as_list(visual)], cfg)
