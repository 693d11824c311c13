import pytest
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


# The variables a real srun step sets (recorded on the local SLURM cluster of tests/slurm_cluster.py):
# a 4-task, 2-node allocation running `srun -N2 -n3` (tasks 2 + 1: uneven) and `srun -N1 -n2`.
UNEVEN_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
               "SLURM_NTASKS": "3", "SLURM_NPROCS": "3", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "3",
               "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_TASKS_PER_NODE": "2,1"}
SMALL_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "1",
              "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2",
              "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_NODEID": "0"}


def _task(step, procid, localid, nodeid):
    return {**step, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid)}


def test_slurm_ranks_follow_the_step_not_the_allocation():
    # uneven step: node 0 runs ranks 0, 1; node 1 runs rank 2 alone (its local world is 1, not 3 // 2)
    got = [ddist.slurm_ranks(_task(UNEVEN_STEP, p, loc, node)) for p, loc, node in ((0, 0, 0), (1, 1, 0), (2, 0, 1))]
    assert got == [(0, 3, 0, 2), (1, 3, 1, 2), (2, 3, 0, 1)]
    # a step on one node of a two-node job: local world 2 (not NTASKS // SLURM_JOB_NUM_NODES = 1)
    assert [ddist.slurm_ranks(_task(SMALL_STEP, p, p, 0)) for p in (0, 1)] == [(0, 2, 0, 2), (1, 2, 1, 2)]
    # the step's task count wins over a job-level SLURM_NTASKS
    assert ddist.slurm_ranks({**_task(SMALL_STEP, 1, 1, 0), "SLURM_NTASKS": "4"})[1] == 2
    # without per-node counts: world size / step nodes
    bare = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2"}
    assert ddist.slurm_ranks(bare) == (3, 4, 1, 2)
    assert ddist.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_launch_info_is_one_mapping_for_every_launcher():
    info = ddist.launch_info(_task(UNEVEN_STEP, 2, 0, 1))
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (2, 3, 0, 1, "slurm")
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert ddist.launch_info({**torchrun, **_task(UNEVEN_STEP, 0, 0, 0)}) == ddist.DistInfo(5, 8, 1, 4, "torchrun")
    # a batch script (no SLURM_STEP_ID) is not a rank of anything: one process
    batch = {k: v for k, v in _task(UNEVEN_STEP, 0, 0, 0).items() if k != "SLURM_STEP_ID"}
    assert ddist.launch_info(batch) == ddist.DistInfo(0, 1, 0, 1, "single")
    with pytest.raises(ValueError, match="rank 3 of 3"):
        ddist.launch_info(_task(UNEVEN_STEP, 3, 0, 1))


def test_env_from_slurm_maps_variables():
    env = {**_task(SMALL_STEP, 1, 1, 0), "MASTER_ADDR": "10.0.0.5"}
    out = ddist.env_from_slurm(env)
    assert out == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "20077"}


def test_slurm_array_part():
    def array(task, lo, hi, step, count):
        return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(lo), "SLURM_ARRAY_TASK_MAX": str(hi),
                "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_TASK_COUNT": str(count)}

    assert ddist.slurm_array_part({}) is None
    assert [ddist.slurm_array_part(array(t, 0, 15, 1, 16)) for t in (0, 15)] == [(0, 16), (15, 16)]
    assert [ddist.slurm_array_part(array(t, 1, 7, 2, 4)) for t in (1, 3, 5, 7)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # --array=2,5,11 (what SLURM sets: min 2, max 11, step 1, count 3): not a range, refused
    for t in (2, 5, 11):
        with pytest.raises(ValueError, match="not one range"):
            ddist.slurm_array_part(array(t, 2, 11, 1, 3))


def test_node_layout_rejects_bad_size():
    assert ddist.node_rank_layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    try:
        ddist.node_rank_layout(6, 4)
    except ValueError as e:
        assert "node_size=4" in str(e)
    else:
        raise AssertionError


def _groups_on_hosts(hosts, node_size):
    import os

    os.environ[ddist.HOSTNAME_ENV] = hosts[int(os.environ["RANK"])]  # where this rank "runs"
    ddist.init_distributed()
    return ddist.build_node_groups(node_size).intra_ranks


def test_node_groups_checked_against_hosts():
    # blocks (A,A,B,B): each group of 2 on one host
    assert run_ranks(_groups_on_hosts, 4, args=(["A", "A", "B", "B"], 2), node_size=2, timeout_s=120) == \
        [(0, 1), (0, 1), (2, 3), (2, 3)]
    # cyclic placement (A,B,A,B): rank // 2 groups would span machines -> an error naming ranks and hosts
    with pytest.raises(RankFailed) as e:
        run_ranks(_groups_on_hosts, 4, args=(["A", "B", "A", "B"], 2), node_size=2, timeout_s=120)
    msg = str(e.value)
    assert "span machines" in msg and "rank 0 on A, rank 1 on B" in msg and "rank 2 on A, rank 3 on B" in msg
    assert "--distribution=block" in msg


def test_host_id_and_placement_check():
    assert ddist.host_id({ddist.HOSTNAME_ENV: "X"}) == "X"
    assert ddist.host_id({"SLURM_NODEID": "3"}).endswith("(SLURM node 3)")
    ddist.check_node_placement(["A"] * 4, 2)  # fake nodes on one machine are fine
    with pytest.raises(RuntimeError, match=r"node group 1: rank 2 on A, rank 3 on B"):
        ddist.check_node_placement(["A", "A", "A", "B"], 2)
