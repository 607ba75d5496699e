"""What flows through the data pipeline, stage by stage.

    source  -> RawSample   {"id", "conversations", "images": [bytes | path]}   (LLaVA format)
    measure -> Measured    tokens, targets, image sizes and counts: everything but pixels
    add pixels -> Example  tokens, targets, processed images at their placeholder starts
    batch   -> dict of fixed-shape arrays (see `BATCH_KEYS`), one row per sequence

A sample that cannot be used becomes a `Skip` with a reason from `SKIP_REASONS`; the pipeline
counts skips by reason instead of dying, and the counts travel with the batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lladav_jax.data.image import ProcessedImage
from lladav_jax.data.video import VideoInfo

# A raw sample, as every source yields it: the LLaVA JSON fields, with `images` holding encoded
# image bytes (ArrayRecord, TFDS) or file paths (JSON + image folder), in `<image>` order, and
# for a video sample `videos` holding its one video (bytes, or a path in the video folder;
# `_unsafe_videos` marks one that leaves it, `_video_info` [frames, fps, width, height] spares
# the measure step its header, as `_image_sizes` does for images).
# Sources never raise on bad data; they mark it for the featurizer to skip and count:
# `_error` ("malformed: <what>") for an unreadable sample, `_missing_images` (indices into
# `images`) for image files missing when the sample was packed, `_unsafe_images` (indices) for
# paths that leave the image folder (never opened, kept as written). `_source` names the source.
# `_image_sizes` ([width, height] per image, as decoded) lets a source that knows its sizes
# spare the measure step the image headers (`SyntheticSource.header`).
RawSample = dict[str, Any]

SKIP_REASONS = (
    "missing_image",  # the file is not there
    "corrupt_image",  # it cannot be decoded
    "image_tag_mismatch",  # more or fewer `<image>` tags than images
    "empty_conversation",  # no turns, or no assistant answer to learn from
    "malformed",  # not the LLaVA format (missing fields, wrong roles or types)
    "too_long",  # longer than the sequence length and not truncatable without cutting a target
    "too_many_visual",  # more tiles or visual tokens than the fixed shapes hold
    "unsafe_path",  # an image or video path that leaves its folder (`..`, absolute): never opened
    "missing_video",  # the video file is not there
    "corrupt_video",  # it does not open, or a chosen frame does not decode
    "empty_video",  # its stream holds no frame
    "too_many_turns",  # more dialogue turns than model.max_turns (the conversation mask)
)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A sample left out, and why; `detail` names the file or field at fault."""

    reason: str
    sample_id: str
    detail: str = ""

    def __post_init__(self):
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Measured:
    """A sample as its pixels will make it, measured without them: the tokens and targets, and
    per image its size (width, height, EXIF orientation applied), visual tokens and tiles.
    Enough to plan rows and batches (`data/plan.py`); `Featurizer.add_pixels` adds the images.
    """

    sample_id: str
    tokens: np.ndarray
    targets: np.ndarray
    turn_ids: np.ndarray  # int32 [n]: the dialogue turn of every position (template.Encoded)
    image_starts: tuple[int, ...] = ()
    image_sizes: tuple[tuple[int, int], ...] = ()
    image_tokens: tuple[int, ...] = ()
    image_tiles: tuple[int, ...] = ()
    video: VideoInfo | None = None  # a video sample's header: its one "image" is the video

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tiles(self) -> int:
        return sum(self.image_tiles)

    @property
    def num_visual_tokens(self) -> int:
        return sum(self.image_tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenized sample (variable length).

    tokens int32 [n]; targets bool [n]: the positions the objective may mask and predict;
    turn_ids int32 [n]: the dialogue turn of each position (the conversation mask's input);
    images[k] occupies tokens[image_starts[k] : image_starts[k] + images[k].layout.num_tokens]
    (placeholder ids there are overwritten by visual features in the model).
    """

    sample_id: str
    tokens: np.ndarray
    targets: np.ndarray
    turn_ids: np.ndarray
    images: tuple[ProcessedImage, ...] = ()
    image_starts: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


# The image inputs of the model (`LLaDAV.embed_inputs`), as `layout.collate_visual` makes them:
# the tiles and, per visual token, where it goes and which tile features it mixes.
VISUAL_KEYS = ("pixels", "visual_pos", "visual_src", "visual_w")
# The arrays of a batch. Model inputs: tokens, positions, segment_ids, turn_ids and VISUAL_KEYS
# (see `LLaDAV.__call__`). For the objective: targets. Segment ids are 1, 2, ... per packed
# sample and 0 for padding; positions and turn ids restart at 0 in every segment. `turn_ids` is
# there only for a model with the conversation mask (`pipeline.collate`).
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "turn_ids", *VISUAL_KEYS)
