"""Resuming on another world size without reading a sample twice or losing one (#15 item 5), in one
process: dalle_ds/data/virtual_ranks.py over real token shards, 4 ranks -> 2 -> 4 against an
uninterrupted 4-rank run; PowerSGD's load copies into the buffers it has (device and dtype kept);
the checkpoint scopes refuse what cannot be re-split."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.test_train_prior import make_token_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    make_token_corpus(folder, shards=4, per_shard=16)
    return folder


def _loaders(corpus, world: int, virtual: int | None = None):
    from dalle_ds.data.loaders import TokenShardLoader
    from dalle_ds.data.tokenizer import TextTokenizer
    from dalle_ds.data.virtual_ranks import VirtualRankLoader

    tok = TextTokenizer.from_file(str(corpus / "tokenizer.json"), 32, 512)
    urls = [str(corpus / f"shard-{i:06d}.tar") for i in range(4)]

    def make(rank, world_size):
        return TokenShardLoader(urls, 2, tokenizer=tok, grid=16, codebook_size=512, rank=rank, world_size=world_size,
                                seed=5, shuffle_buffer=8)

    return [VirtualRankLoader(make, r, world, virtual) for r in range(world)]


def _take(loaders, micro_per_rank: int) -> list[str]:
    """One 'update': every rank draws its micro-batches (keys, in rank order)."""
    keys = []
    for loader in loaders:
        it = iter(loader)
        for _ in range(micro_per_rank):
            keys += list(next(it)["keys"])
    return keys


def test_data_position_is_exactly_once_across_4_2_4_ranks(corpus):
    # uninterrupted: 4 ranks x 1 micro-batch x 2 samples per update, 12 updates = 96 samples > one epoch (64)
    ref = _loaders(corpus, 4)
    ref_updates = [_take(ref, 1) for _ in range(12)]
    # resized: 4 updates on 4 ranks, 4 on 2 ranks (2 micro-batches each: the global batch holds), 4 on 4 again
    a = _loaders(corpus, 4)
    updates = [_take(a, 1) for _ in range(4)]
    states = [x.state_dict() for x in a]
    b = _loaders(corpus, 2)
    for x in b:
        x.load_rank_states(states)
    assert [x.mine for x in b] == [[0, 1], [2, 3]] and b[0].virtual_ranks == 4
    updates += [_take(b, 2) for _ in range(4)]
    states = [x.state_dict() for x in b]
    c = _loaders(corpus, 4)
    for x in c:
        x.load_rank_states(states)
    updates += [_take(c, 1) for _ in range(4)]
    # every update holds the same samples as the uninterrupted run's (order within an update aside)
    for i, (got, want) in enumerate(zip(updates, ref_updates)):
        assert Counter(got) == Counter(want), i
    # and one epoch (the first 64 samples) holds every sample once
    first_epoch = [k for u in updates[:8] for k in u]
    assert len(first_epoch) == len(set(first_epoch)) == 64


def test_growing_beyond_the_first_world_size_is_refused(corpus):
    states = [x.state_dict() for x in _loaders(corpus, 2)]
    bigger = _loaders(corpus, 4)
    with pytest.raises(ValueError, match="2 virtual ranks.*4 ranks"):
        bigger[0].load_rank_states(states)


def test_powersgd_load_copies_into_existing_buffers_whatever_their_dtype():
    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.parallel.powersgd import PowerSGD

    psgd = PowerSGD(PowerSGDConfig(enabled=True, rank=2), None, num_nodes=2)
    kept = psgd.errors["w"] = torch.zeros(3, 4, dtype=torch.bfloat16)  # e.g. a buffer placed elsewhere
    saved = {"mode": "powersgd", "rank": 2, "num_nodes": 4,  # another node count: the mean applies anywhere
             "errors": {"w": torch.arange(12.0).view(3, 4), "new": torch.ones(2, 5)},
             "qs": {"fixed:4x2": torch.randn(4, 2)}}
    psgd.load_state_dict(saved)
    assert psgd.errors["w"] is kept and kept.dtype == torch.bfloat16  # copied in, no second buffer
    assert torch.equal(kept.float(), saved["errors"]["w"])
    assert torch.equal(psgd.errors["new"], saved["errors"]["new"])  # not yet allocated: placed at first use
    assert torch.equal(psgd.qs["fixed:4x2"], saved["qs"]["fixed:4x2"])
    with pytest.raises(ValueError, match=r"'w': saved \(2, 2\).*\(3, 4\)"):
        psgd.load_state_dict({**saved, "errors": {"w": torch.zeros(2, 2)}})
    with pytest.raises(ValueError, match="rank=3"):
        psgd.load_state_dict({**saved, "rank": 3})


def test_register_stateful_scopes():
    from dalle_ds.parallel.checkpoint import Checkpointer

    ck = Checkpointer.__new__(Checkpointer)
    ck._stateful, ck._scopes = {}, {}
    with pytest.raises(ValueError, match="scope='everywhere'"):
        ck.register_stateful("x", object(), scope="everywhere")
    with pytest.raises(TypeError, match="load_rank_states"):
        ck.register_stateful("x", object(), scope="redistributed")


def _fake_checkpoint(root, layout: dict) -> None:
    import json

    project = root / "step_00000004" / "project"
    project.mkdir(parents=True)
    (project / "layout.json").write_text(json.dumps(layout))
    (root / "latest").write_text("step_00000004\n")


def test_resume_refuses_another_partition_and_per_rank_state_on_another_world(tmp_path):
    from dalle_ds.parallel.checkpoint import Checkpointer

    class Position:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    # one process (world 1, flat): a checkpoint partitioned over 2 ranks cannot load here
    _fake_checkpoint(tmp_path / "a", {"world_size": 2, "node_size": 2, "num_nodes": 1})
    ck = Checkpointer(None, tmp_path / "a", every_steps=1, keep_last=1, signals=())
    with pytest.raises(ValueError, match=r"layout.json: the model state is partitioned over 2 ranks .*flat ZeRO-3"):
        ck.resume()
    # same partition (1 rank per node), other world size: per-rank state is refused, by name
    _fake_checkpoint(tmp_path / "b", {"world_size": 3, "node_size": 1, "num_nodes": 3})
    ck = Checkpointer(None, tmp_path / "b", every_steps=1, keep_last=1, signals=())
    ck.register_stateful("position", Position())
    with pytest.raises(ValueError, match=r"saved by 3 ranks, resuming with 1: the state of \['position'\] is per rank"):
        ck.resume()
