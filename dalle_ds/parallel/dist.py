"""Distributed set-up from torchrun, the deepspeed launcher or SLURM, plus node-local groups.

DeepSpeed reads no SLURM variables, so under ``srun`` we map SLURM_PROCID/NTASKS/LOCALID to
RANK/WORLD_SIZE/LOCAL_RANK and derive MASTER_ADDR from the job's first node before
``init_process_group``. Fake nodes on one machine are supported by giving ``node_size``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
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


def env_from_slurm(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables implied by SLURM's, without touching os.environ."""
    env = os.environ if environ is None else environ
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # "2(x2)" -> "2"
    if per_node.isdigit():
        out["LOCAL_WORLD_SIZE"] = per_node
    elif env.get("SLURM_JOB_NUM_NODES", "").isdigit():
        out["LOCAL_WORLD_SIZE"] = str(int(env["SLURM_NTASKS"]) // int(env["SLURM_JOB_NUM_NODES"]))
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or _first_slurm_host(
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + job % 20000)
    return out


def detect_launcher(environ: dict[str, str] | None = None) -> str:
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
    launcher = detect_launcher()
    if launcher == "slurm":
        os.environ.update(env_from_slurm())
    elif launcher == "single":
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                      timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, local_world, launcher)


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


def build_node_groups(node_size: int = 0) -> NodeGroups:
    """Create the intra-node and cross-node groups (every rank must call this, same order).

    ``node_size=0`` takes the launcher's ranks per node (LOCAL_WORLD_SIZE); a smaller value
    makes fake nodes, e.g. 4 ranks on one machine as 2 nodes x 2.
    """
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    if node_size == 0:
        node_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    intra_layout, cross_layout = node_rank_layout(world, node_size)
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
