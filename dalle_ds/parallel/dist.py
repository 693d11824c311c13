"""Distributed set-up from torchrun, the deepspeed launcher or SLURM, plus node-local groups.

DeepSpeed reads no SLURM variables, so under ``srun`` we map the step's SLURM variables to
RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE (:func:`slurm_ranks`, the one place that mapping
lives) and derive MASTER_ADDR from the job's first node before ``init_process_group``.
:func:`launch_info` gives the same ranks without a process group (offline jobs whose processes
never talk); :func:`slurm_array_part` maps a job-array element to its part. Fake nodes on one
machine are supported by giving ``node_size``; node groups that would span machines (ranks placed
cyclically) are an error (:func:`check_node_placement`, from every rank's host gathered at start).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "torchrun" (also the deepspeed launcher), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, resolved to its NodeAddr (fake nodes do not resolve)."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True).stdout.split()
        host = hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        host = re.split(r"[,\[]", nodelist)[0]  # "node[01-04]" -> "node"; best effort without scontrol
        bracket = re.search(r"\[(\d+)", nodelist)
        if bracket and nodelist.startswith(host + "["):
            host += bracket.group(1)
    try:
        out = subprocess.run(["scontrol", "show", "node", host], check=True, capture_output=True,
                             text=True).stdout
        addr = re.search(r"NodeAddr=(\S+)", out)
        if addr:
            return addr.group(1)
    except (OSError, subprocess.CalledProcessError):
        pass
    return host


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed tasks-per-node list, one entry per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"tasks per node {spec!r}: expected a list like '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_ranks(environ: Mapping[str, str]) -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) of an ``srun`` task, from its SLURM variables.

    The step's values, not the job's: ``srun -n2`` inside a 4-task allocation is a world of 2.
    World size: SLURM_STEP_NUM_TASKS (else SLURM_NTASKS, which srun also sets to the step's count).
    Local world size: this node's entry (SLURM_NODEID) of SLURM_STEP_TASKS_PER_NODE (else
    SLURM_TASKS_PER_NODE), so uneven layouts (``2,1``) are right on every node; without either,
    world size / number of nodes. (SLURM_JOB_NUM_NODES and SLURM_NTASKS_PER_NODE describe the
    allocation and are wrong for a step on fewer nodes or tasks.)
    """
    env = environ
    try:
        rank = int(env["SLURM_PROCID"])
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    except KeyError as e:
        raise ValueError(f"SLURM: {e.args[0]} is not set (run under srun)") from None
    local = int(env.get("SLURM_LOCALID", "0"))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts, node = expand_tasks_per_node(per_node), int(env.get("SLURM_NODEID", "0"))
        if not 0 <= node < len(counts):
            raise ValueError(f"SLURM_NODEID={node}: outside the {len(counts)} nodes of tasks per node {per_node!r}")
        local_world = counts[node]
    else:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        local_world = max(1, world // nodes)
    return rank, world, local, local_world


def launch_info(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Who this process is, from the launcher's variables alone: reads ``environ`` (default
    os.environ), writes nothing, starts no process group (offline jobs whose ranks never talk use
    this directly). torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE; srun: :func:`slurm_ranks`; otherwise one process."""
    env = os.environ if environ is None else environ
    launcher = detect_launcher(env)
    if launcher == "torchrun":
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world))
    elif launcher == "slurm":
        rank, world, local, local_world = slurm_ranks(env)
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    if not (0 <= rank < world and 0 <= local < local_world):
        raise ValueError(f"{launcher}: rank {rank} of {world}, local rank {local} of {local_world}: "
                         f"need 0 <= rank < world size and 0 <= local rank < local world size")
    return DistInfo(rank, world, local, local_world, launcher)


def slurm_array_part(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(index, count) of this SLURM job-array element, or None outside an array.

    Array ids may start above 0 and step (``--array=1-7:2`` -> ids 1, 3, 5, 7 -> parts 0..3).
    An id list that is not one arithmetic range (``--array=2,5,11``) cannot be mapped from the
    environment alone: that is an error (pass the part explicitly) rather than a wrong split.
    """
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    lo, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0) or 0), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    hi = int(env.get("SLURM_ARRAY_TASK_MAX", lo + (count - 1) * step) or 0)
    index, off = divmod(task - lo, step)
    if off or (hi - lo) // step + 1 != count or not 0 <= index < count:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task} (min {lo}, max {hi}, step {step}) of "
                         f"SLURM_ARRAY_TASK_COUNT={count}: the array ids are not one range min..max:step; "
                         f"give the part explicitly")
    return index, count


def env_from_slurm(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables implied by SLURM's (:func:`slurm_ranks`), without touching os.environ."""
    env = os.environ if environ is None else environ
    rank, world, local, local_world = slurm_ranks(env)
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(local_world)}
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or _first_slurm_host(
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + job % 20000)
    return out


def detect_launcher(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return "slurm"
    return "single"


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) from whatever launched us.

    Single-process runs also get a 1-rank process group so DeepSpeed code paths stay identical.
    """
    info = launch_info()
    if info.launcher == "slurm":
        os.environ.update(env_from_slurm())
    elif info.launcher == "single":
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if "nccl" in backend:
        idx = device_index(info.local_rank)
        if idx < 0:
            raise RuntimeError(f"backend {backend!r} needs a CUDA device; torch sees none")
        if idx != info.local_rank:  # one GPU bound per task: DeepSpeed uses LOCAL_RANK as the CUDA index
            os.environ[LAUNCHER_LOCAL_RANK_ENV] = str(info.local_rank)
            os.environ["LOCAL_RANK"] = str(idx)
            print0(f"dist: local rank {info.local_rank} sees {torch.cuda.device_count()} GPU(s): using cuda:{idx} "
                   f"(LOCAL_RANK set to {idx} for DeepSpeed)")
        torch.cuda.set_device(idx)
        kwargs["device_id"] = torch.device("cuda", idx)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                      timeout=timedelta(seconds=timeout_s), **kwargs)
    return info


# ---------------------------------------------------------------- devices of collectives
# NCCL takes CUDA tensors only, gloo CPU tensors (it also takes CUDA ones for some ops, slowly).
# Every collective in the project goes through these helpers, so the tensor handed to the backend is
# always on the backend's device (tests/test_device_discipline.py forbids raw collectives elsewhere).

LAUNCHER_LOCAL_RANK_ENV = "DALLE_DS_LAUNCHER_LOCAL_RANK"  # the launcher's LOCAL_RANK when we rewrote it


def device_index(local_rank: int) -> int:
    """The CUDA device of a process with this local rank: ``local_rank % device_count`` (sites
    that bind one GPU per task show each process one device, index 0); -1 without CUDA."""
    n = torch.cuda.device_count()
    return local_rank % n if n else -1


def backend_of(group: torch_dist.ProcessGroup | None = None) -> str:
    """The backend name of ``group`` (default group); "gloo" before any process group exists."""
    return str(torch_dist.get_backend(group)) if torch_dist.is_initialized() else "gloo"


def comm_device(group: torch_dist.ProcessGroup | None = None) -> torch.device:
    """The device a tensor must be on for a collective over ``group``: ``cuda:<LOCAL_RANK % count>``
    under NCCL (also for a combined "cpu:gloo,cuda:nccl" backend), the CPU otherwise (gloo, mpi)."""
    if "nccl" in backend_of(group):
        idx = device_index(int(os.environ.get("LOCAL_RANK", "0")))
        if idx < 0:
            raise RuntimeError("comm_device: the backend is NCCL but torch sees no CUDA device")
        return torch.device("cuda", idx)
    return torch.device("cpu")


def default_device() -> torch.device:
    """Where this process computes: its GPU (``LOCAL_RANK % count``) when CUDA is there, else the CPU."""
    idx = device_index(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda", idx) if idx >= 0 else torch.device("cpu")


def to_comm(t: torch.Tensor, group: torch_dist.ProcessGroup | None = None) -> torch.Tensor:
    """``t`` on :func:`comm_device` (the same tensor when it already is)."""
    dev = comm_device(group)
    return t if t.device == dev else t.to(dev)


def _world(group: torch_dist.ProcessGroup | None = None) -> int:
    return torch_dist.get_world_size(group) if torch_dist.is_initialized() else 1


def all_reduce_(t: torch.Tensor, op: str = "sum", group: torch_dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce of ``t`` (``op``: sum/max/min), moved to the backend's device and back;
    returns the reduced tensor (``t`` itself when it already was on that device)."""
    if _world(group) == 1:
        return t
    ops = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
    c = to_comm(t, group)
    torch_dist.all_reduce(c, op=ops[op], group=group)
    if c is not t:
        t.copy_(c)
    return t


def all_reduce_values(values: list[float], op: str = "sum",
                      group: torch_dist.ProcessGroup | None = None) -> list[float]:
    """Python floats reduced over ``group`` (float64 on the backend's device)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device(group))
    return all_reduce_(t, op, group).tolist()


def any_rank(flag: bool, group: torch_dist.ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is true on any (int32 MAX all-reduce)."""
    if _world(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device(group))
    return bool(all_reduce_(t, "max", group).item())


def all_gather_values(values: list[float], group: torch_dist.ProcessGroup | None = None) -> list[list[float]]:
    """Every rank's ``values`` (same length everywhere), in rank order."""
    n = _world(group)
    if n == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=comm_device(group))
    out = torch.empty(n * mine.numel(), dtype=torch.float64, device=mine.device)
    gather = getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor  # torch >= 2.13
    gather(out, mine, group=group)
    return out.view(n, -1).tolist()


def all_gather_objects(obj, group: torch_dist.ProcessGroup | None = None) -> list:
    """Every rank's small picklable ``obj``, in rank order (NCCL pickles through the current CUDA
    device, which ``init_distributed`` sets)."""
    world = _world(group)
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch_dist.all_gather_object(out, obj, group=group)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class NodeGroups:
    """``intra``: this rank's node (ZeRO partition group); ``cross``: same local index on every node."""

    node_size: int
    num_nodes: int
    node_index: int
    intra: torch_dist.ProcessGroup
    cross: torch_dist.ProcessGroup
    intra_ranks: tuple[int, ...]
    cross_ranks: tuple[int, ...]


def node_rank_layout(world_size: int, node_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rank lists of the node groups and the cross-node (replica) groups, launcher order."""
    if node_size < 1 or world_size % node_size:
        raise ValueError(f"node_size={node_size}: must be >= 1 and divide world_size={world_size}")
    nodes = world_size // node_size
    intra = [list(range(n * node_size, (n + 1) * node_size)) for n in range(nodes)]
    cross = [list(range(i, world_size, node_size)) for i in range(node_size)]
    return intra, cross


HOSTNAME_ENV = "DALLE_DS_HOSTNAME"  # overrides where this process says it runs (tests simulate placements)


def host_id(environ: Mapping[str, str] | None = None) -> str:
    """The machine this process runs on: ``DALLE_DS_HOSTNAME`` when set, else ``socket.gethostname()``,
    with SLURM's node index appended when SLURM_NODEID is set (``"n1 (SLURM node 0)"``)."""
    env = os.environ if environ is None else environ
    if env.get(HOSTNAME_ENV):
        return env[HOSTNAME_ENV]
    import socket

    host = socket.gethostname()
    return f"{host} (SLURM node {env['SLURM_NODEID']})" if env.get("SLURM_NODEID") else host


def check_node_placement(hosts: list[str], node_size: int) -> None:
    """Raise when a node group (``rank // node_size``) would hold ranks of more than one host.

    ``hosts[r]`` is rank r's :func:`host_id`. Groups smaller than a host (fake nodes) are fine."""
    intra, _ = node_rank_layout(len(hosts), node_size)
    bad = [ranks for ranks in intra if len({hosts[r] for r in ranks}) > 1]
    if bad:
        lines = [f"  node group {n}: " + ", ".join(f"rank {r} on {hosts[r]}" for r in ranks)
                 for n, ranks in enumerate(intra) if ranks in bad]
        raise RuntimeError(
            f"node groups of {node_size} consecutive ranks span machines ({len(bad)} of {len(intra)} groups):\n"
            + "\n".join(lines[:8]) + ("\n  ..." if len(lines) > 8 else "")
            + "\nintra-node groups are rank // node_size: place ranks in blocks, each node's ranks consecutive "
              "(SLURM: --distribution=block; torchrun/deepspeed: one launcher per node with --node_rank), "
              "or set node_size to the ranks per machine")


def build_node_groups(node_size: int = 0) -> NodeGroups:
    """Create the intra-node and cross-node groups (every rank must call this, same order).

    ``node_size=0`` takes the launcher's ranks per node (LOCAL_WORLD_SIZE); a smaller value
    makes fake nodes, e.g. 4 ranks on one machine as 2 nodes x 2. Every rank's :func:`host_id`
    is gathered first (one ``all_gather_object``) and a group that would span machines is an error
    (:func:`check_node_placement`), on every rank.
    """
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    if node_size == 0:
        node_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    intra_layout, cross_layout = node_rank_layout(world, node_size)
    check_node_placement(all_gather_objects(host_id()), node_size)
    mine_intra = mine_cross = None
    for ranks in intra_layout:
        group = torch_dist.new_group(ranks)
        if rank in ranks:
            mine_intra, intra_ranks = group, tuple(ranks)
    for ranks in cross_layout:
        group = torch_dist.new_group(ranks)
        if rank in ranks:
            mine_cross, cross_ranks = group, tuple(ranks)
    return NodeGroups(node_size, world // node_size, rank // node_size, mine_intra, mine_cross,
                      intra_ranks, cross_ranks)


def get_rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (the single place rank-0 output goes through)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if torch_dist.is_initialized():
        if "nccl" in backend_of():
            torch_dist.barrier(device_ids=[comm_device().index])
        else:
            torch_dist.barrier()


def destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


if __name__ == "__main__":  # `python -m dalle_ds.parallel.dist`: show what this process would see
    info = init_distributed()
    print(f"rank {info.rank}/{info.world_size} local {info.local_rank}/{info.local_world_size} "
          f"via {info.launcher} master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
          file=sys.stderr)
    destroy()
