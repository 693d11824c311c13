import torch
import torch.distributed as dist

from dalle_ds.parallel import dist as ddist
from tests.multirank import RankFailed, run_ranks


def _allreduce_and_groups(node_size):
    info = ddist.init_distributed()
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    groups = ddist.build_node_groups(node_size)
    intra = torch.tensor([float(info.rank)])
    dist.all_reduce(intra, group=groups.intra)
    cross = torch.tensor([float(info.rank)])
    dist.all_reduce(cross, group=groups.cross)
    return dict(total=t.item(), intra=intra.item(), cross=cross.item(), node=groups.node_index,
                intra_ranks=groups.intra_ranks, cross_ranks=groups.cross_ranks,
                local=(info.local_rank, info.local_world_size))


def test_two_rank_allreduce():
    out = run_ranks(_allreduce_and_groups, 2, args=(0,))
    assert [o["total"] for o in out] == [3.0, 3.0]
    assert [o["intra_ranks"] for o in out] == [(0, 1), (0, 1)]


def test_four_ranks_as_two_fake_nodes():
    out = run_ranks(_allreduce_and_groups, 4, args=(0,), node_size=2)
    assert all(o["total"] == 10.0 for o in out)
    assert [o["node"] for o in out] == [0, 0, 1, 1]
    assert [o["intra"] for o in out] == [1.0, 1.0, 5.0, 5.0]  # 0+1, 2+3
    assert [o["cross"] for o in out] == [2.0, 4.0, 2.0, 4.0]  # 0+2, 1+3
    assert [o["cross_ranks"] for o in out] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [o["local"] for o in out] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def _raise_on_rank_one():
    info = ddist.init_distributed()
    if info.rank == 1:
        raise ValueError("boom on rank one")
    return info.rank


def test_rank_failure_is_reported():
    try:
        run_ranks(_raise_on_rank_one, 2, timeout_s=60)
    except RankFailed as e:
        assert "boom on rank one" in str(e) and "rank 1" in str(e)
    else:
        raise AssertionError("expected RankFailed")


def test_env_from_slurm_maps_variables():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "77", "MASTER_ADDR": "10.0.0.5"}
    out = ddist.env_from_slurm(env)
    assert out == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "20077"}


def test_node_layout_rejects_bad_size():
    assert ddist.node_rank_layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    try:
        ddist.node_rank_layout(6, 4)
    except ValueError as e:
        assert "node_size=4" in str(e)
    else:
        raise AssertionError
