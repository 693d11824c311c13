"""Every collective gets its tensors on the backend's device (NCCL: CUDA only) (#14).

CPU hosts cannot run NCCL, so three checks stand in for it here:
- unit tests of ``dist.comm_device``/``device_index`` with a faked backend and GPU count;
- a static scan: raw ``torch.distributed`` collectives appear only in ``parallel/dist.py`` and in
  a short allow-list of functions that build or move their tensors with ``comm_device``/``to_comm``;
- 2 gloo ranks run every helper-using call site with the collectives wrapped by an assertion
  that each tensor is on ``comm_device(group)``.
The same code runs under NCCL in ``tests/test_gpu.py`` (``pytest -m gpu``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dalle_ds.parallel import dist
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce",
               "gather", "scatter"}
# (file, function) allowed to call a raw collective: each must place its tensor with comm_device/to_comm
ALLOWED = {("dalle_ds/parallel/powersgd.py", "_all_reduce"),
           ("dalle_ds/parallel/block_scaling.py", "check_overflow"),
           ("dalle_ds/parallel/checkpoint.py", "should_save")}


def _raw_collective_calls(path: Path):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in {"dist", "torch_dist", "distributed"}):
                yield fn, node


def test_no_raw_collectives_outside_the_device_helpers():
    bad, unplaced = [], []
    for folder in ("dalle_ds", "data_prep"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "dalle_ds/parallel/dist.py":
                continue
            for fn, call in _raw_collective_calls(path):
                if (rel, fn.name) not in ALLOWED:
                    bad.append(f"{rel}:{call.lineno} {fn.name}() calls {call.func.attr}")
                elif not any(s in ast.unparse(fn) for s in ("comm_device", "to_comm")):
                    unplaced.append(f"{rel}:{call.lineno} {fn.name}()")
    assert not bad, ("raw collectives outside dalle_ds/parallel/dist.py (use dist.any_rank / all_reduce_ / "
                     "all_reduce_values / all_gather_values, which put tensors on comm_device):\n" + "\n".join(bad))
    assert not unplaced, "allowed collective sites that never use comm_device/to_comm:\n" + "\n".join(unplaced)


def test_allow_list_is_current():
    found = set()
    for rel, name in ALLOWED:
        found |= {(rel, fn.name) for fn, _ in _raw_collective_calls(ROOT / rel) if fn.name == name}
    assert found == ALLOWED, f"allow-list entries with no collective left: {sorted(ALLOWED - found)}"


# ---------------------------------------------------------------- comm_device / device_index


@pytest.mark.parametrize("local_rank,count,expected", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (9, 8, 1), (2, 0, -1)])
def test_device_index_is_local_rank_mod_count(monkeypatch, local_rank, count, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert dist.device_index(local_rank) == expected


@pytest.mark.parametrize("backend,local_rank,count,expected", [
    ("nccl", "3", 8, "cuda:3"),
    ("nccl", "3", 1, "cuda:0"),          # one GPU bound per task (srun --gpus-per-task=1)
    ("nccl", "6", 4, "cuda:2"),
    ("cpu:gloo,cuda:nccl", "1", 2, "cuda:1"),
    ("gloo", "3", 8, "cpu"),             # gloo on a GPU machine: CPU tensors
    ("mpi", "0", 0, "cpu"),
])
def test_comm_device_follows_the_backend(monkeypatch, backend, local_rank, count, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.torch_dist, "get_backend", lambda group=None: backend)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert dist.comm_device() == torch.device(expected)


def test_comm_device_without_a_process_group_is_the_cpu(monkeypatch):
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: False)
    assert dist.comm_device() == torch.device("cpu")


def test_nccl_without_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.torch_dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dist.comm_device()


@pytest.mark.parametrize("count,expected", [(2, "cuda:1"), (0, "cpu")])
def test_default_device(monkeypatch, count, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.default_device() == torch.device(expected)


def test_tokenize_images_picks_local_rank_mod_count(monkeypatch):
    import data_prep.tokenize_images as ti

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ti.pick_device("auto", 3) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert ti.pick_device("auto", 3) == torch.device("cpu")


# ---------------------------------------------------------------- 2 gloo ranks, collectives asserted


def _checked_collectives():
    """Wrap torch.distributed's collectives: every tensor must be on comm_device(group)."""
    import torch.distributed as td

    seen = []

    def wrap(name):
        inner = getattr(td, name)

        def checked(*args, **kwargs):
            group = kwargs.get("group")
            want = dist.comm_device(group)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            for t in tensors:
                assert t.device == want, f"{name}: tensor on {t.device}, backend {dist.backend_of(group)} needs {want}"
            seen.append(name)
            return inner(*args, **kwargs)
        setattr(td, name, checked)

    for name in ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast"):
        if hasattr(td, name):
            wrap(name)
    return seen


def _call_sites(tmp: str):
    from dalle_ds import train
    from dalle_ds.parallel import engine
    from dalle_ds.parallel.checkpoint import Checkpointer
    from dalle_ds.train_dvae import RunningStats

    info = dist.init_distributed()
    seen = _checked_collectives()
    out = {"any": engine._any_rank(info.rank == 1), "none": engine._any_rank(False),
           "mean": train.mean_over_ranks([float(info.rank), 1.0]),
           "memory_ranks": len(train.memory_per_rank(info))}
    stats = RunningStats(8)
    stats.add(1.0 + info.rank, 0.5, 0.1, 0.0, 0.01, torch.tensor([info.rank, 7]))
    out["dvae_loss"] = stats.reduce()["loss"]
    ckpt = Checkpointer.__new__(Checkpointer)  # should_save only reads these
    ckpt._signal, ckpt.stop_requested, ckpt.every_steps = (15 if info.rank == 0 else 0), False, 10
    out["signal_everywhere"] = ckpt.should_save(3) and ckpt.stop_requested
    out["seen"] = sorted(set(seen))
    dist.barrier()
    return out


def test_call_sites_hand_collectives_tensors_on_the_backend_device(tmp_path):
    out = run_ranks(_call_sites, 2, args=(str(tmp_path),), timeout_s=240)
    for r in out:
        assert r["any"] is True and r["none"] is False
        assert r["mean"] == [0.5, 1.0]
        assert r["memory_ranks"] == 2
        assert r["dvae_loss"] == pytest.approx(1.5)
        assert r["signal_everywhere"] is True
        assert {"all_reduce"} <= set(r["seen"])
