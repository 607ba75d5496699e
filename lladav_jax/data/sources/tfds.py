"""A TFDS dataset of LLaVA-format samples that builds and reads without TensorFlow.

TFDS (4.9) needs TensorFlow only for `tf.data` reading and for some feature codecs
(`tfds.features.Image` decodes with TF). Building a `GeneratorBasedBuilder` serializes examples
with TFDS's own `tf.Example` protos, and `file_format="array_record"` plus `tfds.data_source`
(or `builder_from_directory(...).as_data_source()`) read them back with `array_record` alone.
So the features here are only TF-free ones: `Text` and `Tensor(dtype=object)` (raw bytes).

Features of each example:
  `id`: Text; `sample`: Text, the sample's JSON (its LLaVA fields, `_missing_images` /
  `_unsafe_images` / `_error` when set; not `images`); `images`: Sequence of encoded image bytes
  in `<image>` order, where a file missing at build time holds its path (UTF-8) and is listed in
  `_missing_images`, and a path outside the image folder holds that path (never read) and is
  listed in `_unsafe_images`; `videos`: the same for a video sample's one video (empty
  otherwise; datasets built before videos existed lack the feature).
Shuffling is disabled, so example i of the split is sample i of the input.

Layout: `<out>/llava/<config>/<version>/` (the config is named after the data file).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lladav_jax.data.example import RawSample
from lladav_jax.data.sources.array_record import PackStats, loaded_samples

NAME = "llava"
VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class LlavaConfig(tfds.core.BuilderConfig):
    """Either a LLaVA `.json`/`.jsonl` + image folder, or `samples`: a callable giving RawSamples.

    (A callable, so that building twice iterates twice.) Image paths in the samples are read into
    bytes at build time; samples already holding bytes are stored as they are.
    """

    data_path: str | None = None
    image_folder: str | None = None
    video_folder: str | None = None
    samples: Callable[[], Iterable[RawSample]] | None = None


class Llava(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """LLaVA-format data as TFDS array_record files (registered under no name: read by path)."""

    name = NAME
    VERSION = tfds.core.Version(VERSION)

    # TFDS looks up a packaged builder's file through `importlib_resources`, which it declares
    # only for Python < 3.9 (tensorflow/datasets#11212; absent here): give the plain path, TFDS's
    # own fallback.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not `dataset_info_from_configs`, which looks for metadata files beside
        # this module's source).
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA-format image conversations (lladav-jax).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "sample": tfds.features.Text(),
                    "images": tfds.features.Sequence(
                        tfds.features.Tensor(shape=(), dtype=np.object_)
                    ),
                    "videos": tfds.features.Sequence(
                        tfds.features.Tensor(shape=(), dtype=np.object_)
                    ),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        if cfg.samples is not None:
            samples = cfg.samples()
        else:
            from lladav_jax.data.sources.llava_json import LlavaJsonSource

            samples = LlavaJsonSource(cfg.data_path, cfg.image_folder, cfg.video_folder)
        self.stats = PackStats()
        for i, sample in enumerate(loaded_samples(samples)):
            features = to_features(sample)
            size = sum(map(len, features["images"] + features["videos"]))
            self.stats.add(sample, len(features["sample"]) + size)
            yield i, features


def _encoded(files) -> list[bytes]:
    return [f.encode() if isinstance(f, str) else f for f in files]


def _decoded(files, sample: RawSample, marks: tuple[str, str]) -> list[bytes | str]:
    out = [bytes(f) for f in files]
    for k in {*sample.get(marks[0], ()), *sample.get(marks[1], ())}:
        out[k] = out[k].decode()  # a path, not the file's bytes
    return out


def to_features(sample: RawSample) -> dict[str, Any]:
    fields = {k: v for k, v in sample.items() if k not in ("images", "videos")}
    return {
        "id": str(sample.get("id", "")),
        "sample": json.dumps(fields, ensure_ascii=False),
        "images": _encoded(sample.get("images", ())),
        "videos": _encoded(sample.get("videos", ())),
    }


def from_features(example: dict[str, Any]) -> RawSample:
    sample = json.loads(example["sample"])
    sample["images"] = _decoded(example["images"], sample, ("_missing_images", "_unsafe_images"))
    videos = example.get("videos")
    if videos is not None and len(videos):
        sample["videos"] = _decoded(videos, sample, ("_missing_videos", "_unsafe_videos"))
    return sample


def config_name(data_path: str | os.PathLike) -> str:
    """`/data/llava_v1_5_mix665k.json` -> `llava_v1_5_mix665k` (a valid TFDS config name)."""
    stem = os.path.basename(os.fspath(data_path)).split(".")[0]
    return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "default"


def build_tfds(
    out_dir: str | os.PathLike,
    data_path: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    samples: Callable[[], Iterable[RawSample]] | None = None,
    name: str | None = None,
    video_folder: str | os.PathLike | None = None,
) -> str:
    """Builds the dataset; returns its `<out>/llava/<name>/<version>` directory (absolute).

    A dataset already built there is reused as it is (TFDS never overwrites): delete it, or give
    another `name`, after changing the data.

    Give `data_path` (+ `image_folder`, `video_folder`) or `samples`; `name` (the config)
    defaults to the data file's stem, or `default`.
    """
    if (data_path is None) == (samples is None):
        raise ValueError("build_tfds: give either data_path or samples")
    if data_path is not None:
        data_path = os.path.abspath(os.fspath(data_path))
        if not os.path.exists(data_path):
            raise FileNotFoundError(f"build_tfds: no data file {data_path}")
    config = LlavaConfig(
        name=name or (config_name(data_path) if data_path else "default"),
        version=VERSION,
        description=f"from {data_path}" if data_path else "from samples",
        data_path=data_path,
        image_folder=None if image_folder is None else os.path.abspath(os.fspath(image_folder)),
        video_folder=None if video_folder is None else os.path.abspath(os.fspath(video_folder)),
        samples=samples,
    )
    out_dir = os.path.abspath(os.fspath(out_dir))
    builder = Llava(config=config, data_dir=out_dir, file_format="array_record")
    with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keep out/ clean
        builder.download_and_prepare(download_dir=downloads)
    if stats := getattr(builder, "stats", None):  # absent when an existing build was reused
        print(f"built {builder.data_dir}: {stats.summary()}")
    return os.fspath(builder.data_dir)


def dataset_dir(path: str | os.PathLike) -> str:
    """The directory holding `dataset_info.json`: `path` itself or the one dataset below it."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    found = []
    for depth in range(1, 4):  # <name>/<config>/<version> at most
        pattern = os.path.join(path, *["*"] * depth, "dataset_info.json")
        found += [os.path.dirname(p) for p in glob.glob(pattern)]
    # Several versions of one config: take the newest.
    groups = {os.path.dirname(d) for d in found}
    if len(groups) != 1:
        detail = ", ".join(sorted(found)) or "none"
        raise FileNotFoundError(f"expected one TFDS dataset under {path}, found: {detail}")
    return max(found, key=lambda d: tfds.core.Version(os.path.basename(d)))


class TfdsSource:
    """Random access to a TFDS split of LLaVA-format data, without TensorFlow.

    `name_or_dir`: a built dataset's directory (the version directory, or any directory with
    exactly one dataset below it, e.g. `build-tfds`'s `--out`), or a TFDS name such as
    `llava/mydata` looked up in `data_dir`. Yields RawSamples with image bytes.
    """

    def __init__(
        self,
        name_or_dir: str | os.PathLike,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
    ):
        self.split = split
        where = os.fspath(name_or_dir)
        if os.path.isdir(where):
            self.builder_dir, self.tfds_name = dataset_dir(where), None
        else:
            self.builder_dir, self.tfds_name = None, where
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.name = self.tfds_name or os.path.relpath(
            self.builder_dir, os.path.dirname(os.path.dirname(os.path.dirname(self.builder_dir)))
        )
        self._length = len(self._open())

    def _open(self):
        if getattr(self, "_ds", None) is None:
            if self.builder_dir is not None:
                builder = tfds.builder_from_directory(self.builder_dir)
                self._ds = builder.as_data_source(split=self.split)
            else:
                self._ds = tfds.data_source(
                    self.tfds_name, split=self.split, data_dir=self.data_dir
                )
        return self._ds

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> RawSample:
        return from_features(self._open()[int(index)])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}  # reopened lazily in each worker

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r})"
