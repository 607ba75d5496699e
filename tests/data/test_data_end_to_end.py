"""The data pipeline end to end through the real featurizer (tiny model, demo tokenizer).

Synthetic / LLaVA JSON / ArrayRecord sources -> `make_dataset` -> batches: exact resume with
worker processes, the three sources giving identical batches, bad JSONL entries counted.
"""

import collections
import json

import ml_collections
import numpy as np
import pytest

from lladav_jax.data import pipeline
from lladav_jax.data.demo_tokenizer import load_demo_tokenizer
from lladav_jax.data.example import BATCH_KEYS, SKIP_REASONS, Skip
from lladav_jax.data.featurize import Featurizer
from lladav_jax.data.sources.array_record import ArrayRecordSource, pack
from lladav_jax.data.sources.llava_json import LlavaJsonSource
from lladav_jax.data.synthetic import SyntheticSource, write_llava_json
from lladav_jax.models import variants

TOKENIZER = load_demo_tokenizer()
SEQ_LEN = 256  # synthetic samples are 128-159 tokens with the tiny model: 1-2 per packed row


def tiny(**image) -> ml_collections.ConfigDict:
    cfg = variants.model_config("tiny")
    cfg.image.update(image)
    return cfg


def settings(**kw) -> ml_collections.ConfigDict:
    base = dict(seq_len=SEQ_LEN, batch_size=2, seed=3, num_epochs=1, window=10, pack=True,
                group_by_length=False, num_workers=0, max_skip_fraction=0.5,
                min_seen_for_abort=1)  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


def dataset(source, cfg, rows=None, **kw):
    featurize = Featurizer(cfg, TOKENIZER, seq_len=SEQ_LEN)
    return pipeline.make_dataset(source, featurize, cfg, settings(**kw), pad_id=TOKENIZER.pad_id,
                                 rows=rows)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for n, (x, y) in enumerate(zip(a, b)):
        assert set(x) == set(y), n
        assert x["skips"] == y["skips"] and x["local_skips"] == y["local_skips"], n
        for k in x:
            if k not in ("skips", "local_skips"):
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {n}: {k}")


def total_skips(batches) -> collections.Counter:
    out = collections.Counter()
    for b in batches:
        out.update({r: int(v) for r, v in b["skips"].items()})
    return out


@pytest.mark.slow
def test_restore_mid_run_with_workers_gives_the_uninterrupted_batches():
    # max_tiles 25 makes ~1 in 8 synthetic samples too_many_visual: skips ride along.
    cfg = tiny(max_tiles=25)
    source = SyntheticSource(40)
    kw = dict(num_epochs=2, num_workers=2)
    it = iter(dataset(source, cfg, **kw))
    head = [next(it) for _ in range(17)]  # into the second epoch (about 30 batches in all)
    state = it.get_state()
    tail = list(it)  # the uninterrupted run goes on
    it.close()
    assert tail and state["loaded"] and state["next"] > 0  # cut inside a window
    state = json.loads(json.dumps(state))  # what a checkpoint stores: plain JSON
    resumed = iter(dataset(source, cfg, **kw))
    resumed.set_state(state)
    assert_same(list(resumed), tail)
    resumed.close()
    # The skips travel with the batches, and workers change nothing.
    skips = total_skips(head + tail)
    assert skips["too_many_visual"] > 0 and sum(skips.values()) == skips["too_many_visual"]
    assert sum(int(b["num_samples"]) for b in head + tail) + skips["too_many_visual"] == 80
    assert_same(head + tail, list(dataset(source, cfg, num_epochs=2)))


def test_synthetic_json_and_array_record_sources_give_identical_batches(tmp_path):
    n = 24
    synthetic = SyntheticSource(n)
    json_path = write_llava_json(tmp_path / "train.json", tmp_path / "images", n)
    from_json = LlavaJsonSource(json_path, tmp_path / "images")
    pack(json_path, tmp_path / "images", tmp_path / "records", num_shards=3)
    from_records = ArrayRecordSource(tmp_path / "records")
    # The assumption behind comparing batches: index i is the same sample in all three
    # (same length, same id, same conversation, same image bytes), shards read in order.
    assert len(synthetic) == len(from_json) == len(from_records) == n
    for i in range(n):
        a, b, c = synthetic[i], from_json[i], from_records[i]
        assert a["id"] == b["id"] == c["id"], i
        assert a["conversations"] == b["conversations"] == c["conversations"], i
        with open(b["images"][0], "rb") as f:
            assert a["images"] == [f.read()] == c["images"], i
    cfg = tiny()
    want = list(dataset(synthetic, cfg, num_epochs=2))
    assert sum(int(b["num_samples"]) for b in want) == 2 * n
    assert_same(list(dataset(from_json, cfg, num_epochs=2)), want)
    assert_same(list(dataset(from_records, cfg, num_epochs=2)), want)


def segments(batches) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """(tokens, targets) of every packed sample in the batches."""
    out = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][row]
            for s in range(1, int(seg.max()) + 1):
                at = seg == s
                out.append((tuple(b["tokens"][row][at].tolist()),
                            tuple(b["targets"][row][at].tolist())))  # fmt: skip
    return out


@pytest.fixture
def dirty_jsonl(tmp_path):
    """12 good synthetic samples as JSONL, with 4 bad lines in between."""
    images = tmp_path / "images"
    path = write_llava_json(tmp_path / "d.jsonl", images, 12)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    turns = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]
    bad = [
        json.dumps({"id": "bad-missing", "image": "nope.png",
                    "conversations": turns("<image>\nWhere?")}),
        json.dumps({"id": "bad-corrupt", "image": "corrupt.png",
                    "conversations": turns("<image>\nWhat color?")}),
        '{"id": "bad-line", "conversations": [',  # cut off: not JSON
        json.dumps({"id": "bad-tags", "image": "synthetic-train-0-0000000.png",
                    "conversations": turns("<image>\n<image>\nTwice?")}),
    ]  # fmt: skip
    with open(path) as f:
        lines = f.read().splitlines()
    for k, line in enumerate(bad):
        lines.insert(3 * k + 1, line)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return LlavaJsonSource(path, images)


BAD_REASONS = ("missing_image", "corrupt_image", "malformed", "image_tag_mismatch")


def test_bad_jsonl_entries_are_skipped_and_counted(dirty_jsonl):
    cfg = tiny()
    assert len(dirty_jsonl) == 16
    batches = list(dataset(dirty_jsonl, cfg, window=16))
    skips = total_skips(batches)
    assert skips == {r: int(r in BAD_REASONS) for r in SKIP_REASONS}
    # The good samples all arrive, exactly as featurized alone.
    featurize = Featurizer(cfg, TOKENIZER, seq_len=SEQ_LEN)
    good = [featurize(s) for s in SyntheticSource(12)]
    assert not any(isinstance(e, Skip) for e in good)
    want = [(tuple(e.tokens.tolist()), tuple(e.targets.tolist())) for e in good]
    assert sorted(segments(batches)) == sorted(want)
    assert sum(int(b["num_samples"]) for b in batches) == 12
    # 4 of 16 skipped > 10%: the run aborts, naming every reason and the files at fault.
    with pytest.raises(pipeline.DataQualityError) as e:
        list(dataset(dirty_jsonl, cfg, window=16, max_skip_fraction=0.1))
    message = str(e.value)
    assert "4 of 16 samples skipped" in message
    for reason in BAD_REASONS:
        assert f"{reason} 1" in message
    assert "nope.png" in message and "corrupt.png" in message


def test_pixels_that_fail_after_a_good_header_are_padding_alike_for_1_and_2_processes():
    """A PNG cut in half: its header measures, its pixels do not decode. Its planned row stays
    padding and it counts as a local skip of the process holding that row; one process and
    two give the same global batches."""
    raws = [SyntheticSource(16)[i] for i in range(16)]
    png = raws[5]["images"][0]
    raws[5]["images"] = [png[: len(png) // 2]]
    kw = dict(batch_size=4, window=16, pack=False)
    whole = list(dataset(raws, tiny(), **kw))
    assert sum(b["local_skips"]["corrupt_image"] for b in whole) == 1
    assert sum(sum(b["skips"].values()) for b in whole) == 0  # the plan kept it
    assert sum(b["num_samples"] for b in whole) == 16
    filled = sum(int(b["segment_ids"].any(axis=1).sum()) for b in whole)
    assert filled == 15  # one planned row left all padding
    halves = [list(dataset(raws, tiny(), rows=rows, **kw)) for rows in ([0, 1], [2, 3])]
    for b, (x, y) in zip(whole, zip(*halves)):
        for k in set(BATCH_KEYS) & set(b):
            np.testing.assert_array_equal(np.concatenate([x[k], y[k]]), b[k], err_msg=k)
        assert x["num_samples"] == y["num_samples"] == b["num_samples"]
        assert x["skips"] == y["skips"] == b["skips"]
    local = [sum(b["local_skips"]["corrupt_image"] for b in h) for h in halves]
    assert sorted(local) == [0, 1]


def small_jsonl(tmp_path, good: int, missing: int, corrupt: int) -> LlavaJsonSource:
    """`good` synthetic samples, then samples whose image is missing or corrupt."""
    images = tmp_path / "images"
    path = write_llava_json(tmp_path / "small.jsonl", images, good) if good else None
    if path is None:
        images.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "small.jsonl"
        path.write_text("")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    bad = [{"id": f"bad-missing-{k}", "image": f"nope{k}.png", "conversations": turns}
           for k in range(missing)]
    bad += [{"id": f"bad-corrupt-{k}", "image": "corrupt.png", "conversations": turns}
            for k in range(corrupt)]
    with open(path, "a") as f:
        f.write("".join(json.dumps(b) + "\n" for b in bad))
    return LlavaJsonSource(path, images)


def test_data_that_ran_out_badly_is_an_error(tmp_path):
    """Every sample bad, fewer than min_seen_for_abort of them: the iterator just runs out;
    `check_complete` then finds the share final and raises, naming reasons and files."""
    source = small_jsonl(tmp_path, good=0, missing=2, corrupt=3)
    it = iter(dataset(source, tiny(), min_seen_for_abort=100))
    assert list(it) == []
    with pytest.raises(pipeline.DataQualityError) as e:
        it.check_complete()
    message = str(e.value)
    assert "5 of 5 samples skipped" in message and "no sample usable" in message
    assert "corrupt_image 3" in message and "missing_image 2" in message
    assert "nope0.png" in message and "corrupt.png" in message
    # The saved state of an iterator that ran out restores to one that stops at once, with
    # the tallies: no exception from `set_state` (saved as the loop saves it, at the end).
    state = it.get_state()
    resumed = iter(dataset(source, tiny(), min_seen_for_abort=100))
    resumed.set_state(state)
    with pytest.raises(StopIteration):
        next(resumed)
    with pytest.raises(StopIteration):
        next(resumed)
    with pytest.raises(pipeline.DataQualityError, match="5 of 5 samples skipped"):
        resumed.check_complete()
    # A state whose window in hand is past the end (saved so by earlier code) restores alike.
    again = iter(dataset(source, tiny(), min_seen_for_abort=100))
    again.set_state({**state, "window": state["window"] + 3, "loaded": True, "next": 2})
    with pytest.raises(StopIteration):
        next(again)


def test_check_complete_holds_the_whole_data_to_max_skip_fraction(tmp_path):
    source = small_jsonl(tmp_path, good=12, missing=1, corrupt=1)  # 2 of 14 skipped: 14%
    for limit, fails in ((0.2, False), (0.1, True)):
        it = iter(dataset(source, tiny(), window=14, max_skip_fraction=limit,
                          min_seen_for_abort=100))
        batches = list(it)
        assert sum(int(b["num_samples"]) for b in batches) == 12
        if fails:
            with pytest.raises(pipeline.DataQualityError,
                               match=r"2 of 14 samples skipped \(14.3% > max_skip_fraction "
                                     r"10.0%.*nope0.png"):
                it.check_complete()
        else:
            it.check_complete()
    # No sample at all is an error too.
    empty = iter(dataset(small_jsonl(tmp_path / "empty", 0, 0, 0), tiny()))
    assert list(empty) == []
    with pytest.raises(pipeline.DataQualityError, match="before any sample was seen"):
        empty.check_complete()
