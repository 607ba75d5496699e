"""Video decoding throughput of one process: what a data worker spends on a video sample.

    python benchmarks/video_decode.py [--seconds 60] [--fps 30] [--size 640x360]
        [--codecs mpeg4 libx264] [--variants 8b tiny] [--repeats 5] [--keep DIR]

Writes synthetic MP4s first (untimed; `lladav_jax.data.video.write_video`): `--seconds` of
`--size` frames at `--fps`, one per codec (mpeg4 is in every PyAV build; libx264 where the
build has it), showing moving shapes over a moving gradient with a little noise (not static,
not pure noise). Then times, per leg (codec x model variant), what `Featurizer` does for a video
sample: `probe` (the header), `frame_indices` under the variant's `video` config (about 1 frame
a second, at most `max_frames`, spread evenly when more), `read_frames` (PyAV decodes every
frame from the start to the last chosen one, converting only the chosen ones to RGB) and
`process_frames` (each chosen frame resized to one tile, bicubic, and normalised: 384 px for
8b, 56 px for tiny).

Legs are interleaved (A B C D, A B C D, ...) `--repeats` times so that other jobs on a shared
machine slow each alike. Printed per leg: the median and spread (min-max) of wall seconds per
video, split into probe / decode / tile, frames decoded per second (the frames up to the last
chosen one, all of which the decoder runs through) and chosen frames tiled per second (the
frames the model sees). One process, PyAV's frame threads on (`thread_type="AUTO"`, as in
`read_frames`): on N cores a decode uses up to N threads, so a data worker per core gets less.
About 1 minute on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import numpy as np


class SyntheticFrames(Sequence):
    """Frames of moving coloured rectangles over a drifting gradient, plus mild noise; each
    drawn when asked for (a minute of 640x360 frames would be 1.2 GB held at once)."""

    def __init__(self, seconds: float, fps: int, width: int, height: int, seed: int = 0):
        self.n, self.width, self.height = int(seconds * fps), width, height
        rng = np.random.default_rng(seed)
        self.shapes = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-6, 6),
                        rng.uniform(-4, 4), int(rng.integers(20, 120)),
                        int(rng.integers(20, 90)), rng.integers(0, 256, 3))
                       for _ in range(6)]
        self.noise = rng.normal(0, 4, (8, height, width, 1)).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.n:
            raise IndexError(k)
        x, y = np.arange(self.width, dtype=np.float32), np.arange(self.height, dtype=np.float32)
        base = (np.sin((x + 3 * k) / 57.0)[None, :] + np.cos((y - 2 * k) / 41.0)[:, None]) * 50
        frame = np.repeat(base[..., None] + 128, 3, axis=2)
        frame[..., 1] = 255 - frame[..., 1]
        for x0, y0, vx, vy, w, h, colour in self.shapes:
            cx, cy = int(x0 + vx * k) % self.width, int(y0 + vy * k) % self.height
            frame[cy:cy + h, cx:cx + w] = colour
        frame += self.noise[k % len(self.noise)]
        return np.clip(frame, 0, 255).astype(np.uint8)


def one_video(path: str, cfg) -> dict[str, float]:
    """probe + frame choice + read_frames + process_frames of one video: seconds and counts."""
    from lladav_jax.data.image import process_frames
    from lladav_jax.data.video import frame_indices, probe, read_frames

    t0 = time.perf_counter()
    info = probe(path)
    chosen = frame_indices(info.frames, info.fps, cfg.video.fps, cfg.video.max_frames)
    t1 = time.perf_counter()
    frames = read_frames(path, chosen)
    t2 = time.perf_counter()
    tiles = process_frames(frames, cfg)
    t3 = time.perf_counter()
    assert tiles.tiles.shape[0] == len(chosen)
    return dict(total=t3 - t0, probe=t1 - t0, decode=t2 - t1, tile=t3 - t2,
                decoded=chosen[-1] + 1, chosen=len(chosen))


def spread(values: list[float], fmt: str = ".3f") -> str:
    return (f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT, even sides")
    parser.add_argument("--codecs", nargs="+", default=["mpeg4", "libx264"])
    parser.add_argument("--variants", nargs="+", default=["8b", "tiny"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", default=None, help="write the videos here (default: a "
                        "temporary folder, removed at the end)")
    args = parser.parse_args()

    import av

    from lladav_jax.data.video import write_video
    from lladav_jax.models.variants import model_config

    width, height = (int(v) for v in args.size.lower().split("x"))
    codecs = [c for c in args.codecs if c in av.codecs_available]
    for c in sorted(set(args.codecs) - set(codecs)):
        print(f"{c}: not in this PyAV build, left out")
    cfgs = {name: model_config(name) for name in args.variants}
    print(f"PyAV {av.__version__}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; {args.seconds:g} s of {width}x{height} at {args.fps} fps; "
          + "; ".join(f"{n}: {c.vision.image_size} px tiles, video max_frames "
                      f"{c.video.max_frames}, fps {c.video.fps:g}" for n, c in cfgs.items()),
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        paths = {}
        for codec in codecs:
            paths[codec] = os.path.join(folder, f"synthetic_{codec}.mp4")
            start = time.perf_counter()
            frames = SyntheticFrames(args.seconds, args.fps, width, height)
            write_video(paths[codec], frames, args.fps, codec=codec)
            print(f"wrote {paths[codec]}: {os.path.getsize(paths[codec]) / 1e6:.1f} MB in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        legs = [(codec, name) for codec in codecs for name in cfgs]
        for codec, name in legs:  # warm-up: imports, the decoder's first open
            one_video(paths[codec], cfgs[name])
        runs = {leg: [] for leg in legs}
        for _ in range(args.repeats):
            for codec, name in legs:
                runs[(codec, name)].append(one_video(paths[codec], cfgs[name]))

    print(f"\nper video, median (min-max) of {args.repeats} interleaved runs:")
    print(f"{'codec':8} {'variant':7} {'decoded':>7} {'chosen':>6}  {'seconds':>19}  "
          f"{'probe s':>19}  {'decode s':>19}  {'tile s':>19}  {'frames decoded/s':>22}  "
          f"{'chosen tiled/s':>19}")
    for (codec, name), rs in runs.items():
        decoded, chosen = rs[0]["decoded"], rs[0]["chosen"]
        col = lambda key: spread([r[key] for r in rs])  # noqa: B023 (used at once)
        print(f"{codec:8} {name:7} {decoded:7d} {chosen:6d}  {col('total'):>19}  "
              f"{col('probe'):>19}  {col('decode'):>19}  {col('tile'):>19}  "
              f"{spread([decoded / r['total'] for r in rs], '.0f'):>22}  "
              f"{spread([chosen / r['total'] for r in rs], '.1f'):>19}")


if __name__ == "__main__":
    main()
