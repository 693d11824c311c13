"""A resumed shard loader seeks to its shard and byte offset instead of re-reading what it consumed
(#19 item 5): real tar shards on disk and on the real S3 server (tests/s3_server.py); the batches
after a resume equal an uninterrupted loader's, exactly once per epoch."""

from __future__ import annotations

import json

import pytest
import torch

from dalle_ds.data import loaders, storage
from dalle_ds.data.loaders import ImageShardLoader, epoch_order, shard_samples, slot_plan
from tests.test_data import write_image_shards

COUNTS = [12, 11, 13, 12, 10, 12]  # 70 samples in 6 uneven shards
KW = dict(batch_size=4, mode="eval", size=16, seed=3, shuffle_buffer=5, infinite=True)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("seek")
    return d, write_image_shards(d, COUNTS, seed=4)


@pytest.fixture
def s3_shards(s3_server, shard_dir):
    d, keys = shard_dir
    prefix = s3_server.prefix()
    for p in sorted(d.glob("*.tar")):
        storage.upload_file(p, prefix + p.name)
    return prefix, keys


def _record_opens(monkeypatch) -> list[tuple[str, int]]:
    opens: list[tuple[str, int]] = []
    real = loaders.shard_samples

    def recording(url: str, start: int = 0):
        opens.append((url.rsplit("/", 1)[-1], start))
        return real(url, start)
    monkeypatch.setattr(loaders, "shard_samples", recording)
    return opens


def test_shard_samples_resume_at_a_reported_offset(shard_dir, s3_shards):
    d, _ = shard_dir
    prefix, _ = s3_shards
    for url in (str(d / "shard-000002.tar"), prefix + "shard-000002.tar"):
        full = list(shard_samples(url))
        assert [s["__key__"] for _, s in full] == [f"s02i{i:03d}" for i in range(13)]
        assert full[0][0] == 0 and all(a < b for (a, _), (b, _) in zip(full, full[1:]))
        at, _ = full[7]
        tail = list(shard_samples(url, at))  # local: a seek; S3: a ranged GET from that byte
        assert [(a, s["__key__"], s["jpg"]) for a, s in tail] == [(a, s["__key__"], s["jpg"]) for a, s in full[7:]]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resumed_loader_seeks_and_yields_the_same_batches(shard_dir, s3_shards, monkeypatch, where):
    d, keys = shard_dir
    spec = str(d) if where == "local" else s3_shards[0]
    n, cut = 30, 11  # 120 samples: past the epoch boundary (70); the cut is mid-epoch, mid-shard
    full = [b for _, b in zip(range(n), ImageShardLoader(spec, **KW))]
    first_epoch = [k for b in full for k in b["keys"]][:70]
    assert sorted(first_epoch) == sorted(keys)  # exactly once per epoch, block shuffle or not
    first = ImageShardLoader(spec, **KW)
    for _ in zip(range(cut), first):
        pass
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold plain data
    entry, index, byte, block = state["seeks"][0]
    assert state["workers"] == [[0, 44]] and byte > 0 and block == 43 // KW["shuffle_buffer"]

    opens = _record_opens(monkeypatch)
    resumed = ImageShardLoader(spec, **KW)
    resumed.load_state_dict(state)
    rest = [b for _, b in zip(range(n - cut), resumed)]
    for want, got in zip(full[cut:], rest):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["images"], want["images"])
    # the consumed shards of epoch 0 were never opened; the current one was opened at the block's byte
    order = epoch_order(len(COUNTS), KW["seed"], 0, True)
    plan = [f"shard-{shard:06d}.tar" for shard, _, _ in slot_plan(len(COUNTS), 1, 0, order)]
    assert opens[0] == (plan[entry], byte)
    epoch0 = opens[: len(plan) - entry]
    assert [name for name, _ in epoch0] == plan[entry:] and all(start == 0 for _, start in epoch0[1:])


def test_a_state_without_seeks_still_resumes_exactly(shard_dir, monkeypatch):
    """States saved before seeking existed re-read their epoch up to the position (and agree)."""
    d, _ = shard_dir
    full = [b["keys"] for _, b in zip(range(16), ImageShardLoader(str(d), **KW))]
    first = ImageShardLoader(str(d), **KW)
    for _ in zip(range(6), first):
        pass
    state = first.state_dict()
    del state["seeks"]
    opens = _record_opens(monkeypatch)
    resumed = ImageShardLoader(str(d), **KW)
    resumed.load_state_dict(state)
    assert [b["keys"] for _, b in zip(range(10), resumed)] == full[6:]
    assert opens[0][1] == 0  # from the epoch's first shard


@pytest.mark.parametrize("rank", [0, 2])
def test_seek_with_slots_sharing_a_shard(tmp_path, rank):
    """Fewer shards than slots: slots sharing a shard keep every k-th sample; the seek keeps the
    sample index, so the stride stays aligned after a resume."""
    write_image_shards(tmp_path, [21, 17], seed=6)
    kw = {**KW, "world_size": 3, "rank": rank, "shuffle_buffer": 4, "batch_size": 3}
    full = [b["keys"] for _, b in zip(range(12), ImageShardLoader(str(tmp_path), **kw))]
    first = ImageShardLoader(str(tmp_path), **kw)
    for _ in zip(range(2), first):
        pass
    state = first.state_dict()
    assert state["seeks"][0][2] > 0
    resumed = ImageShardLoader(str(tmp_path), **kw)
    resumed.load_state_dict(state)
    assert [b["keys"] for _, b in zip(range(10), resumed)] == full[2:]


def test_finite_loader_resumed_at_its_end_yields_nothing_and_a_wrong_position_is_refused(shard_dir):
    d, _ = shard_dir
    kw = {**KW, "infinite": False, "batch_size": 10}
    first = ImageShardLoader(str(d), **kw)
    it = iter(first)
    for _ in range(7):  # 70 samples: the whole pass, before the iterator notices its end
        next(it)
    state = first.state_dict()
    assert state["workers"] == [[0, 70]]
    resumed = ImageShardLoader(str(d), **kw)
    resumed.load_state_dict(state)
    assert list(resumed) == []
    state["workers"] = [[0, 80]]
    bad = ImageShardLoader(str(d), **kw)
    bad.load_state_dict(state)
    with pytest.raises(ValueError, match="in block 15 of 5 samples, but its seek is for block 13"):
        list(bad)
    del state["seeks"]  # no seek: the epoch is re-read and found too short
    bad.load_state_dict(state)
    with pytest.raises(ValueError, match="position 80 of slot 0 is past the end of its epoch 0"):
        list(bad)
