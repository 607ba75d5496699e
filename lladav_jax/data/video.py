"""Video samples: which frames LLaDA-V looks at, read with PyAV (docs/design.md §2.5).

About one frame a second (every `round(fps / video.fps)`-th frame from frame 0); when that
gives more than `video.max_frames`, that many frames spread evenly from the first to the last
(`linspace`, cast to int). Each chosen frame becomes one plain tile (`image.process_frames`).

Two steps, like images (`featurize.py`): `probe` reads the container header only (frame count,
frame rate, size), enough to count the visual tokens; `read_frames` decodes the chosen frames.
Both raise `VideoLoadError` with a skip reason: missing_video, corrupt_video or empty_video.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np

VideoRef = bytes | bytearray | memoryview | str | os.PathLike


class VideoLoadError(ValueError):
    """A video that cannot be used; `reason` is missing_video, corrupt_video or empty_video."""

    def __init__(self, reason: str, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.reason, self.name = reason, name


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container header says: frames in the first video stream, their average rate
    (frames a second) and the frame size (width, height)."""

    frames: int
    fps: float
    width: int
    height: int


def frame_indices(total: int, fps: float, video_fps: float, max_frames: int, *,
                  uniform: bool = False) -> list[int]:
    """The official choice (`process_video_with_decord`): every `round(fps / video_fps)`-th
    frame from 0; more than `max_frames` of them (when max_frames > 0): `max_frames` frames at
    `linspace(0, total - 1, max_frames)` cast to int, first and last included.

    `uniform`: always those `max_frames` linspace frames, whatever the rate (how the official
    evaluation reads benchmark videos, `load_video`; a short video repeats frames)."""
    if total <= 0:
        return []
    if uniform and max_frames > 0:
        return np.linspace(0, total - 1, max_frames, dtype=int).tolist()
    # Python's round, as the official code (half to even); a rate below half a frame per
    # video_fps rounds to 0, which the official code cannot step by: take every frame then.
    step = max(round(fps / video_fps), 1)
    chosen = list(range(0, total, step))
    if 0 < max_frames < len(chosen):
        chosen = np.linspace(0, total - 1, max_frames, dtype=int).tolist()
    return chosen


def video_frames(info: VideoInfo, cfg, *, uniform: bool = False) -> list[int]:
    """The frame indices a video uses under the model config (`cfg.video`): `frame_indices`
    of its header."""
    return frame_indices(info.frames, info.fps, cfg.video.fps, cfg.video.max_frames,
                         uniform=uniform)


def _open(ref: VideoRef, name: str | None):
    """(container, name): the video at `ref` opened with PyAV (import deferred: only video
    data needs it)."""
    import av

    if isinstance(ref, str | os.PathLike):
        path = os.fspath(ref)
        name = name or path or "<empty path>"
        if not os.path.isfile(path):
            raise VideoLoadError("missing_video", name, "no such file")
        source = path
    elif isinstance(ref, bytes | bytearray | memoryview):
        source = io.BytesIO(ref)
        name = name or f"<{len(source.getbuffer())} bytes>"
    else:
        raise TypeError(f"a video is bytes or a path, got {type(ref).__name__}")
    try:
        container = av.open(source, mode="r")
    except Exception as e:  # PyAV raises its own error types per FFmpeg error code
        raise VideoLoadError("corrupt_video", name,
                             f"cannot open ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoLoadError("corrupt_video", name, "no video stream")
    return container, name


def _count_frames(container) -> int:
    """Frames of the first video stream by demuxing (no decoding): for containers whose header
    does not say (WebM, some AVI). Leaves the container at its end (no seek back: seeking an
    empty AVI fails, which would make an empty video look corrupt)."""
    stream = container.streams.video[0]
    return sum(1 for packet in container.demux(stream) if packet.size)


def probe(ref: VideoRef, *, name: str | None = None) -> VideoInfo:
    """The header of a video: its frame count, average frame rate and frame size, without
    decoding a frame. Raises VideoLoadError (missing_video, corrupt_video, empty_video)."""
    container, name = _open(ref, name)
    with container:
        stream = container.streams.video[0]
        try:
            frames = int(stream.frames) or _count_frames(container)
        except Exception as e:
            raise VideoLoadError("corrupt_video", name,
                                 f"cannot read its packets ({type(e).__name__}: {e})") from e
        rate = stream.average_rate or stream.guessed_rate
        width, height = stream.codec_context.width, stream.codec_context.height
    if frames <= 0:
        raise VideoLoadError("empty_video", name, "no frames")
    if not rate or float(rate) <= 0:
        raise VideoLoadError("corrupt_video", name, "no frame rate in its header")
    if width <= 0 or height <= 0:
        raise VideoLoadError("corrupt_video", name, f"frame size {width}x{height}")
    return VideoInfo(frames, float(rate), int(width), int(height))


def read_frames(ref: VideoRef, indices: Sequence[int], *,
                name: str | None = None) -> list[np.ndarray]:
    """The frames at `indices` (ascending, repeats allowed) as uint8 RGB arrays [H, W, 3],
    decoded in order.

    Frames are counted as decoded from the start (the header's count may be off by a few in
    damaged files); a stream that ends before the last index, or data that does not decode,
    is corrupt_video."""
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return []
    container, name = _open(ref, name)
    frames: dict[int, np.ndarray] = {}
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: decoding is most of the cost
        try:
            for k, frame in enumerate(container.decode(stream)):
                if k in wanted:
                    frames[k] = frame.to_ndarray(format="rgb24")
                if k >= wanted[-1]:
                    break
        except Exception as e:
            raise VideoLoadError("corrupt_video", name, f"frame {len(frames)} of "
                                 f"{len(wanted)} wanted does not decode "
                                 f"({type(e).__name__}: {e})") from e
    if len(frames) < len(wanted):
        raise VideoLoadError("corrupt_video", name, f"decoded {len(frames)} of the "
                             f"{len(wanted)} frames wanted: the stream ends early")
    return [frames[int(i)] for i in indices]


def write_video(path_or_buffer, frames: Sequence[np.ndarray], fps: int,
                codec: str = "mpeg4") -> None:
    """Encodes uint8 RGB frames [H, W, 3] (even sides) as an MP4: the synthetic data set's
    videos and the tests'. mpeg4 is in every PyAV wheel and fast to encode."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(path_or_buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: shapes keep their colours
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
