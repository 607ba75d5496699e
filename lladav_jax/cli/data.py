"""lladav-data: turn a LLaVA JSON + image (and video) folder into ArrayRecord shards or a TFDS
dataset.

  lladav-data pack-arrayrecord --data_path D.json --image_folder IMGS [--video_folder VIDS] \
      --out DIR --num_shards N
  lladav-data build-tfds --data_path D.json --image_folder IMGS [--video_folder VIDS] --out DIR
      [--name NAME]
  lladav-data digits --out DIR     # a small real VQA set (scikit-learn's digits; data/digits.py)
  lladav-data lmms-task --data ROWS.jsonl --out DIR [--name NAME] [--preset P] [--metric M]
      # lladav-eval rows as a local lmms-eval task (inference/lmms_task.py)

(also `python -m lladav_jax.cli.data ...`). Both print the counts of samples, images, missing
images and malformed samples; neither drops a sample (bad ones are marked for the featurizer).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lladav_jax.cli import errors
from lladav_jax.inference.scoring import METRICS, PRESETS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_path", "--data-path", required=True, help="LLaVA .json or .jsonl")
    p.add_argument(
        "--image_folder",
        "--image-folder",
        default=None,
        help="folder the `image` paths are relative to (default: the data file's)",
    )
    p.add_argument("--video_folder", "--video-folder", default=None,
                   help="folder the `video` paths are relative to (default: the data file's)")
    p.add_argument("--out", required=True, help="output directory")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lladav-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack-arrayrecord", help="pack samples + image bytes into shards")
    _common(pack)
    pack.add_argument("--num_shards", "--num-shards", type=int, default=16)
    pack.add_argument(
        "--num_threads", "--num-threads", type=int, default=8, help="threads reading image files"
    )
    tf = sub.add_parser("build-tfds", help="build a TFDS dataset (array_record, no TensorFlow)")
    _common(tf)
    tf.add_argument("--name", default=None, help="TFDS config name (default: the file's stem)")
    digits = sub.add_parser("digits", help="write scikit-learn's handwritten digits as a VQA "
                            "set: images/, train.json, test.json, test.jsonl (lladav-eval rows)")
    digits.add_argument("--out", required=True, help="output directory")
    task = sub.add_parser("lmms-task", help="write lladav-eval rows as a local lmms-eval task: "
                          "NAME.yaml and NAME.jsonl, for --tasks NAME --include_path DIR")
    task.add_argument("--data", required=True, help="lladav-eval rows (JSONL)")
    task.add_argument("--out", required=True, help="output directory")
    task.add_argument("--name", default=None, help="task name (default: the data file's stem)")
    task.add_argument("--preset", choices=sorted(PRESETS),
                      help="lladav-eval's preset: generation settings, prompt and metric")
    task.add_argument("--metric", choices=METRICS,
                      help="for questions without choices (default: the preset's, else exact)")
    errors.add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0, 1 for an error the message names (`errors.run`)."""
    return errors.run("lladav-data", lambda: _main(argv), argv)


def _main(argv: Sequence[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.command == "lmms-task":
        from lladav_jax.inference.lmms_task import write_task

        path = write_task(args.data, args.out, args.name, args.preset, args.metric)
        print(f"run it with: python -m lmms_eval --model lladav --model_args pretrained=DIR "
              f"--tasks {path.stem} --include_path {path.parent}")
        return 0
    if args.command == "digits":
        from lladav_jax.data.digits import write_digits

        counts = write_digits(args.out)
        print(f"{counts['train']} training and {counts['test']} test samples in {args.out}")
        return 0
    errors.require_positive(p, args, ("num_shards", "num_threads"))
    if args.command == "pack-arrayrecord":
        from lladav_jax.data.sources.array_record import pack

        pack(args.data_path, args.image_folder, args.out, args.num_shards, args.num_threads,
             args.video_folder)
    else:
        from lladav_jax.data.sources.tfds import build_tfds

        path = build_tfds(args.out, args.data_path, args.image_folder, name=args.name,
                          video_folder=args.video_folder)
        print(f"read it with: TfdsSource({path!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
