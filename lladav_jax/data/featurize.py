"""RawSample -> Example | Skip: validate, load images or a video, apply the chat template, fit
the length.

Two steps, so that a process can plan its batches from every sample but decode only the images
of its own rows (`data/pipeline.py`): `Featurizer.measure` does all but the pixel work (image
sizes come from the headers) and gives the final tokens; `Featurizer.add_pixels` decodes and
tiles the images. One code path makes the tokens, so a measured length is the featurized one.

Bad data never raises here: it becomes a `Skip` with a reason from `SKIP_REASONS` and a detail
naming the file or field at fault. Only programming and configuration errors raise.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from lladav_jax.data.example import SKIP_REASONS, Example, Measured, RawSample, Skip
from lladav_jax.data.image import process_frames, process_image
from lladav_jax.data.image_file import MAX_PIXELS, ImageLoadError, image_size, load_image
from lladav_jax.data.layout import image_mode, num_tiles, num_visual_tokens, video_tokens
from lladav_jax.data.template import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_TAG,
    ROLES,
    TEMPLATES,
    encode_conversation,
    fit_answer,
    move_image_tag_first,
)
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.data.video import VideoInfo, VideoLoadError, probe, read_frames, video_frames

OVERLONG = ("drop", "truncate")


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


def _unsafe_detail(name: str, folder: str = "image") -> str:
    return f"{name}: leaves the {folder} folder (not opened)"


def _video_ref(raw: Mapping) -> tuple[Any, str] | None:
    """(video, name) of a video sample (`videos`, else the `video` field as a path), or None."""
    listed, refs = raw.get("video"), raw.get("videos")
    if refs is None:
        if listed is None:
            return None
        refs = [listed]
    if not isinstance(refs, list | tuple) or len(refs) != 1:
        raise _Skipped("malformed", f"'video' is one video, got {refs!r:.80}")
    ref = refs[0]
    if isinstance(ref, str | os.PathLike):
        return ref, os.fspath(ref)
    if isinstance(ref, bytes | bytearray | memoryview):
        return ref, listed if isinstance(listed, str) else "video"
    raise _Skipped("malformed", f"'video' is a {type(ref).__name__}, not bytes or a path")


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


def sample_window(sample_id: str, largest: int) -> int:
    """A sample's answer window, 2..largest positions after the assistant header (the blank line
    and at least one answer token), log-uniform (every scale as often: windows that cut the
    answer, that just hold it, and that leave most of it to EOS) and fixed by a hash of the
    sample's id: the same in every epoch, process and measure/featurize pass."""
    u = zlib.crc32(sample_id.encode()) / 2**32
    return max(2, min(largest, round(2 * (largest / 2) ** u)))


class Featurizer:
    """RawSample -> Example | Skip for one model config, tokenizer and template.

    overlong: 'drop' skips a sample longer than `seq_len` (too_long); 'truncate' cuts it after
    the last assistant turn that fits (never inside an answer or an image), and skips it only if
    not even the first answer fits.
    answer_window > 0: the last answer is fitted to the sample's window (`sample_window`: 2 to
    answer_window, log-uniform): followed by EOS targets up to it, as far as `seq_len` allows,
    or cut at it (`template.fit_answer`); 0: as it is (the official recipe).
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
        answer_window: int = 0,
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
        if answer_window < 0:
            raise ValueError(f"answer_window must be >= 0 (0: no EOS padding), "
                             f"got {answer_window}")
        self.answer_window = int(answer_window)

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
            if measured.video is not None:
                return Example(measured.sample_id, measured.tokens, measured.targets,
                               measured.turn_ids, (self._frames(measured, raw),),
                               measured.image_starts)
            refs, names = _image_refs(raw)
            mode = image_mode(len(refs), self.cfg)  # of the whole sample, truncated or not
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
                image = process_image(pil, self.cfg, mode)
                if image.layout.num_tokens != count:  # the host count must match the layout
                    raise RuntimeError(f"{name}: layout has {image.layout.num_tokens} tokens, "
                                       f"expected {count}")  # fmt: skip
                images.append(image)
        except _Skipped as s:
            return Skip(s.reason, measured.sample_id, s.detail)
        return Example(measured.sample_id, measured.tokens, measured.targets,
                       measured.turn_ids, tuple(images), measured.image_starts)

    def _frames(self, measured: Measured, raw: RawSample):
        """The video's chosen frames, decoded and tiled (a Skip raised as _Skipped)."""
        ref, name = _video_ref(raw)
        try:
            frames = read_frames(ref, video_frames(measured.video, self.cfg), name=name)
        except VideoLoadError as e:
            raise _Skipped(e.reason, str(e)) from e
        video = process_frames(frames, self.cfg)
        if video.layout.num_tokens != measured.image_tokens[0]:
            raise RuntimeError(f"{name}: layout has {video.layout.num_tokens} tokens, expected "
                               f"{measured.image_tokens[0]}")
        return video

    def _video_info(self, raw: Mapping, ref, name: str) -> VideoInfo:
        """The video's header: the source's `_video_info`, else read from the file."""
        if _marked(raw, "_unsafe_videos"):  # checked first: never opened, nor packed
            raise _Skipped("unsafe_path", _unsafe_detail(name, "video"))
        if _marked(raw, "_missing_videos"):
            raise _Skipped("missing_video", f"{name}: missing when the records were packed")
        given = raw.get("_video_info")
        if given is not None:
            try:
                frames, fps, width, height = given
                info = VideoInfo(int(frames), float(fps), int(width), int(height))
            except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
                info = None
            # As `probe` checks the header: a rate and size the frame choice can use.
            if info is None or info.frames < 0 or not (math.isfinite(info.fps) and info.fps > 0
                                                       and info.width > 0 and info.height > 0):
                raise _Skipped("malformed", f"'_video_info' is not [frames, fps, width, "
                                            f"height]: {given!r:.80}")
            if info.frames == 0:
                raise _Skipped("empty_video", f"{name}: no frames (its '_video_info')")
            return info
        try:
            return probe(ref, name=name)
        except VideoLoadError as e:
            raise _Skipped(e.reason, str(e)) from e

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
        video = _video_ref(raw)
        if video is not None and refs:
            raise _Skipped("malformed", "a sample holds images or a video, not both")
        n_tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
        if n_tags != (1 if video else len(refs)):
            listed = f" ({', '.join(names)})" if names else ""
            what = f"a video ({video[1]})" if video else f"{len(refs)} images{listed}"
            raise _Skipped("image_tag_mismatch", f"{n_tags} {IMAGE_TAG} tags but {what}")
        info = None
        if video is not None:  # the video is one visual input: its frames are its tiles
            info = self._video_info(raw, *video)
            n_frames = len(video_frames(info, self.cfg))
            sizes, names = [(info.width, info.height)], [video[1]]
            counts, tiles = [video_tokens(n_frames, self.cfg)], [n_frames]
        else:
            sizes = self._sizes(raw, refs, names)
            mode = image_mode(len(sizes), self.cfg)
            counts = [num_visual_tokens(*size, self.cfg, mode=mode) for size in sizes]
            tiles = [num_tiles(*size, self.cfg, mode) for size in sizes]
        enc = encode_conversation(self.template, self.tokenizer, turns, counts, system=self.system)
        tokens, targets, turn_ids, starts = enc.tokens, enc.targets, enc.turn_ids, enc.image_starts
        if len(tokens) > self.seq_len:
            fits = [c for c in enc.cut_points if c <= self.seq_len]
            if self.overlong == "drop" or not fits:
                why = "" if self.overlong == "drop" else " (the first answer does not fit)"
                raise _Skipped("too_long", f"{len(tokens)} tokens > seq_len {self.seq_len}{why}")
            cut = max(fits)  # the end of an assistant turn: no answer, no image is split
            tokens, targets, turn_ids = tokens[:cut], targets[:cut], turn_ids[:cut]
            starts = tuple(s for s in starts if s < cut)
            kept = len(starts)
            sizes, counts, tiles, names = sizes[:kept], counts[:kept], tiles[:kept], names[:kept]
        if self.answer_window:
            tokens, targets, turn_ids = fit_answer(
                tokens, targets, turn_ids, self.tokenizer.eos_id, self.tokenizer.end_header_id,
                sample_window(sample_id, self.answer_window), self.seq_len)
        turns_used = int(turn_ids.max(initial=0)) + 1
        max_turns = getattr(self.cfg, "max_turns", None)
        if getattr(self.cfg, "attention_mask", "") == "conversation" and turns_used > max_turns:
            raise _Skipped("too_many_turns", f"{turns_used} dialogue turns > model.max_turns "
                                             f"{max_turns} (attention_mask=conversation)")
        if sum(tiles) > self.cfg.image.max_tiles or sum(counts) > self.cfg.image.max_visual_tokens:
            raise _Skipped(
                "too_many_visual",
                f"{sum(tiles)} tiles / {sum(counts)} visual tokens > max_tiles "
                f"{self.cfg.image.max_tiles} / max_visual_tokens "
                f"{self.cfg.image.max_visual_tokens} ({', '.join(names)})",
            )
        return Measured(sample_id, tokens, targets, turn_ids, tuple(starts), tuple(sizes),
                        tuple(counts), tuple(tiles), info if starts else None)
