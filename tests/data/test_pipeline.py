"""The Grain pipeline: exact resume with workers, rows split over processes, packing, skips."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lladav_jax.data import pipeline
from lladav_jax.data.example import Example, Measured, Skip
from lladav_jax.data.image import process_image
from lladav_jax.models import lladav, variants

CFG = variants.model_config("tiny")


class FakeFeaturizer:
    """Sample i -> i in the first token, a length from i; every 7th is a corrupt image (found
    by the measure), and the ids in `bad_pixels` fail only when their pixels are added."""

    def __init__(self, bad_pixels=()):
        self.bad_pixels = frozenset(bad_pixels)

    def measure(self, raw: dict):
        i = raw["id"]
        if i % 7 == 3:
            return Skip("corrupt_image", str(i), f"img{i}.png")
        n = 5 + (i * 37) % 40
        tokens = np.full(n, 10, np.int32)
        tokens[0] = 100 + i
        return Measured(str(i), tokens, np.arange(n) % 2 == 0, np.zeros(n, np.int32))

    def add_pixels(self, measured: Measured, raw: dict):
        if raw["id"] in self.bad_pixels:
            return Skip("corrupt_image", measured.sample_id, "truncated")
        return Example(measured.sample_id, measured.tokens, measured.targets,
                       measured.turn_ids)


def settings(**kw) -> ml_collections.ConfigDict:
    base = dict(seq_len=64, batch_size=4, seed=1, num_epochs=1, window=16, pack=True,
                group_by_length=True, num_workers=0, max_skip_fraction=0.5,
                min_seen_for_abort=10)
    return ml_collections.ConfigDict({**base, **kw})


def run(n: int = 100, rows=None, bad_pixels=(), **kw):
    src = [{"id": i} for i in range(n)]
    return pipeline.make_dataset(src, FakeFeaturizer(bad_pixels), CFG, settings(**kw), pad_id=0,
                                 rows=rows)


def sample_ids(batches) -> list[int]:
    ids = []
    for b in batches:
        starts = (b["positions"] == 0) & (b["segment_ids"] > 0)
        ids += [int(t) - 100 for t in b["tokens"][starts]]
    return ids


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            if k in ("skips", "local_skips"):
                assert x[k] == y[k]
            else:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.slow
def test_restore_gives_the_uninterrupted_batches_with_workers():
    kw = dict(num_epochs=2, rows=[1, 3], bad_pixels={5, 40})  # a process's rows, local skips
    whole_it = iter(run(num_workers=2, **kw))
    whole = list(whole_it)
    it = iter(run(num_workers=2, **kw))
    head = [next(it) for _ in range(7)]
    state = it.get_state()
    it.close()
    resumed = iter(run(num_workers=2, **kw))
    resumed.set_state(state)
    assert_same(head + list(resumed), whole)
    assert resumed.featurized == whole_it.featurized  # the count resumes too
    # Workers change nothing about the batches, and a state restores under another count.
    assert_same(list(run(num_workers=0, **kw)), whole)
    other = iter(run(num_workers=0, **kw))
    other.set_state(state)
    assert_same(head + list(other), whole)


# Reads batches through a worker process, then ends as a program may: "close" closes the
# iterator and returns still holding batches (the trainer at its end or on SIGTERM), "keep"
# keeps the iterator, unclosed, until the interpreter exits (a script's or notebook's global).
AT_EXIT = """
import sys

import ml_collections
import numpy as np

from lladav_jax.data import pipeline
from lladav_jax.data.example import Example, Measured
from lladav_jax.models import variants

KEPT = []


class Featurizer:
    def measure(self, raw):
        n = 5 + raw["id"] % 40
        return Measured(str(raw["id"]), np.full(n, 10, np.int32), np.ones(n, bool),
                        np.zeros(n, np.int32))

    def add_pixels(self, measured, raw):
        return Example(measured.sample_id, measured.tokens, measured.targets,
                       measured.turn_ids)


def main(how):
    data = ml_collections.ConfigDict(dict(
        seq_len=64, batch_size=4, seed=1, num_epochs=1, window=64, pack=True,
        group_by_length=False, num_workers=1, max_skip_fraction=0.5, min_seen_for_abort=10))
    it = iter(pipeline.make_dataset([{"id": i} for i in range(256)], Featurizer(),
                                    variants.model_config("tiny"), data, pad_id=0))
    held = [next(it) for _ in range(20)]
    if how == "close":
        it.close()
    else:
        KEPT.append(it)
    return held


if __name__ == "__main__":
    main(sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["close", "keep"])
def test_worker_shared_memory_is_released_by_exit(tmp_path, how):
    """Batches from worker processes arrive in shared memory; none of it may outlive the
    program: Python's resource tracker would report it at exit ("There appear to be N leaked
    shared_memory objects to clean up at shutdown"; before the fix, 30-50 in "close")."""
    script = tmp_path / "at_exit.py"
    script.write_text(AT_EXIT)
    p = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "leaked" not in p.stderr, p.stderr[-3000:]
    assert "Exception ignored" not in p.stderr, p.stderr[-3000:]  # Grain's, at teardown


@pytest.mark.parametrize("pack", [True, False])
def test_rows_split_over_processes_make_the_one_process_batches(pack):
    """Each 'process' gets its rows of every batch, featurizing only their samples; put
    together they are the one-process batches, with the same global counts and skips."""
    whole_it = iter(run(pack=pack, bad_pixels={5, 40}))
    whole = list(whole_it)
    splits = {2: [[0, 1], [2, 3]], 4: [[0], [1], [2], [3]]}
    for n, parts in splits.items():
        its = [iter(run(pack=pack, rows=rows, bad_pixels={5, 40})) for rows in parts]
        got = [list(it) for it in its]
        assert all(len(g) == len(whole) for g in got)
        for b, pieces in zip(whole, zip(*got)):
            for k in b:
                if k in ("skips", "local_skips"):
                    continue
                if k.startswith("num_"):
                    assert all(p[k] == b[k] for p in pieces), k
                else:
                    np.testing.assert_array_equal(np.concatenate([p[k] for p in pieces]), b[k])
            assert all(p["skips"] == b["skips"] for p in pieces)  # the plan's: global
        local = [sum(bt["local_skips"]["corrupt_image"] for bt in g) for g in got]
        assert sum(local) == 2 == sum(b["local_skips"]["corrupt_image"] for b in whole)
        featurized = [it.featurized for it in its]
        assert sum(featurized) == whole_it.featurized == 86  # every kept sample, once
        # An equal share of rows: at most 1/n of the samples plus a window's worth.
        assert max(featurized) <= 86 / n + settings().window, featurized


def test_pixel_failures_are_padding_where_planned():
    """A sample whose pixels fail keeps its planned place as padding, counted as a local skip;
    the other samples of its row stay where the plan put them."""
    good, bad = list(run()), list(run(bad_pixels={5}))
    assert sum(b["local_skips"]["corrupt_image"] for b in bad) == 1
    assert sample_ids(bad) == [i for i in sample_ids(good) if i != 5]
    holes = 0
    for g, b in zip(good, bad):
        assert g["num_samples"] == b["num_samples"] and g["num_tokens"] == b["num_tokens"]
        hole = (g["segment_ids"] > 0) & (b["segment_ids"] == 0)
        holes += int(hole.sum())
        assert not (b["targets"] & hole).any()
        for k in ("tokens", "targets", "positions", "segment_ids"):
            np.testing.assert_array_equal(np.where(hole, 0, g[k]), np.where(hole, 0, b[k]), k)
    assert holes == 5 + (5 * 37) % 40  # exactly sample 5's tokens


def test_epochs_are_reshuffled_and_complete():
    # Windows of 10 divide the epoch of 100: no window spans two epochs.
    batches = list(run(num_epochs=2, pack=False, group_by_length=False, window=10))
    ids = sample_ids(batches)
    kept = sorted(i for i in range(100) if i % 7 != 3)
    assert sorted(ids) == sorted(kept * 2)
    first, second = ids[: len(kept)], ids[len(kept):]
    assert sorted(first) == kept and first != second


def test_skips_are_counted_and_abort_names_the_reasons():
    batches = list(run())
    assert sum(int(b["skips"]["corrupt_image"]) for b in batches) == 14
    assert sum(int(b["num_samples"]) for b in batches) == 86
    named = r"corrupt_image \d+; e.g. \d+ \(corrupt_image: img\d+.png\)"
    with pytest.raises(pipeline.DataQualityError, match=named):
        list(run(max_skip_fraction=0.05))


def test_pixel_failures_count_towards_the_abort():
    bad = set(range(0, 100, 3))  # a third of the samples: 29 of them kept by the measure
    with pytest.raises(pipeline.DataQualityError, match="corrupt_image"):
        list(run(bad_pixels=bad, max_skip_fraction=0.3))
    # A process of two estimates the share from the samples it featurized.
    with pytest.raises(pipeline.DataQualityError, match="corrupt_image"):
        list(run(bad_pixels=bad, rows=[0, 1], max_skip_fraction=0.3))
    assert len(list(run(bad_pixels=bad, rows=[0, 1], max_skip_fraction=0.5))) > 0


def test_packing_and_grouping_cut_padding():
    fraction = lambda **kw: pipeline.padding_fraction(list(run(window=50, **kw)))
    plain = fraction(pack=False, group_by_length=False)
    grouped = fraction(pack=False, group_by_length=True)
    packed = fraction(pack=True, group_by_length=False)
    assert packed < 0.3 * plain
    assert grouped < 0.8 * plain
    lengths = {b["tokens"].shape[1] for b in run(window=50, pack=False, group_by_length=True)}
    assert lengths <= {16, 32, 64} and len(lengths) > 1  # a few fixed shapes
    b = next(iter(run(pack=True)))
    assert b["segment_ids"].max() > 1  # several samples in a row
    row = b["segment_ids"][0]
    for seg in range(1, row.max() + 1):
        assert b["positions"][0][row == seg][0] == 0  # positions restart per sample


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def image_example(name: str, size: tuple[int, int], text: int, seed: int) -> Example:
    img = process_image(picture(*size, seed), CFG)
    rng = np.random.default_rng(seed)
    v = img.layout.num_tokens
    tokens = np.concatenate([rng.integers(3, 500, 2), np.zeros(v), rng.integers(3, 500, text)])
    return Example(name, tokens.astype(np.int32), np.ones(len(tokens), bool),
                   np.zeros(len(tokens), np.int32), (img,), (2,))


@pytest.mark.slow
def test_packed_samples_give_the_logits_of_each_sample_alone():
    examples = [image_example("a", (90, 60), 7, 1), image_example("b", (56, 56), 4, 2),
                image_example("c", (40, 120), 9, 3)]
    seq_len = sum(len(e) for e in examples) + 5
    packed = pipeline.collate([pipeline.Row(tuple(examples))], 1, seq_len, CFG, pad_id=0)
    model = lladav.create(CFG, seed=4)
    forward = nnx.jit(lambda m, b: m(**b))
    model_inputs = lambda b: {k: v for k, v in b.items() if k != "targets"}
    got = np.asarray(forward(model, model_inputs(packed)))[0]
    at = 0
    for ex in examples:
        alone = pipeline.collate([pipeline.Row((ex,))], 1, len(ex), CFG, pad_id=0)
        want = np.asarray(forward(model, model_inputs(alone)))[0]
        np.testing.assert_allclose(got[at : at + len(ex)], want, atol=2e-5, rtol=0)
        at += len(ex)
    assert (packed["segment_ids"][0, at:] == 0).all()
