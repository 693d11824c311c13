"""Checkpoints: DeepSpeed's shards plus the project's state, an atomic ``latest``, keep the last K.

    ckpt = Checkpointer.from_config(engine, cfg.run.dir, cfg.checkpoint, node_groups=hierarchy.groups)
    # or Checkpointer(engine, root, every_steps, keep_last, signals=(SIGTERM, SIGUSR1), node_groups=None)
    ckpt.register_stateful("schedule", sched, scope="replicated")   # state_dict / load_state_dict
    ckpt.register_stateful("data", loader, scope="redistributed")   # + load_rank_states (see scopes)
    ckpt.register_stateful("powersgd", hierarchy.checkpoint_state(), scope="node_replica")
    state = ckpt.resume()                          # the saved state dict, or None with no ``latest``
    step = state["step"] if state else 0
    for ...:
        ...
        if ckpt.should_save(step):                 # collective: every_steps, or a signal on any rank
            ckpt.save(step)                        # collective; returns the tag folder
        if ckpt.stop_requested:                    # SIGTERM / SIGUSR1: saved above, now leave
            write_run_marker(cfg.run.dir, "REQUEUE", step)
            sys.exit(EXIT_CHECKPOINTED)
    write_run_marker(cfg.run.dir, "COMPLETED", step)   # clear_run_markers(run_dir) when a run starts

Layout of ``root``::

    step_00000200/                DeepSpeed's tag folder: model/optimizer shards, one file pair per
                                  partition (zero_pp_rank_<i>_mp_rank_00_{model,optim}_states.pt)
    step_00000200/project/layout.json        world size, node size, number of nodes (rank 0)
    step_00000200/project/rank_00000.pt      this rank's state: step, world_size, RNG (python, numpy,
                                             torch, cuda), ``client_state`` passed to ``save``, and
                                             the state_dict of every "rank" / "replicated" object
    step_00000200/project/all_ranks.pt       every rank's state of the "redistributed" objects (rank 0)
    step_00000200/project/node_rank_00000.pt the "node_replica" objects of node-local rank i (node 0)
    latest                        "step_00000200", written (tmp + rename) by rank 0 only after
                                  every rank has finished writing (a barrier), so a crash
                                  mid-save leaves the previous checkpoint the one resumed.

One copy of the model state (#15). With hierarchical ZeRO (``node_groups``: ZeRO-3 partitions
parameters inside each node, nodes are replicas) DeepSpeed would key its files by the global
rank: every node wrote the same optimizer state again (about 19 TB per checkpoint for the 12B
model on 128 nodes), and the files claimed ``world_size`` partitions of a ``node_size`` split,
which ``zero_to_fp32`` (export) cannot read. Here DeepSpeed saves and loads as if the first node
were the whole data-parallel world (:func:`dalle_ds.parallel.deepspeed_internals.node_local_checkpoint`):
only node 0's ranks write, file ``i`` holds node-local partition ``i``, and the checkpoint is a
flat ZeRO-3 checkpoint of ``node_size`` ranks, the same bytes as a flat ZeRO-3 checkpoint of the
model (tests/test_checkpoint_hierarchical.py measures it) and exported by the same code. Every
node loads it (rank ``i`` of each node reads file ``i``), so a run resumes on any number of nodes
of the same size; another node size (another partition) is refused with both sizes named. Flat
runs (no ``node_groups``) keep DeepSpeed's layout, and resume on the same number of ranks only.

Scopes of registered state (``register_stateful(name, obj, scope)``), and what happens when the
number of ranks changes between save and resume:

- ``rank`` (default): this rank's own state, saved per rank; another world size is refused,
  naming the object (e.g. the dVAE trainer's loader, whose position is per rank).
- ``replicated``: the same on every rank (LR schedule, block scales): saved per rank; on another
  world size rank ``r`` restores it from rank ``r mod old_world``. RNG states are restored this way
  too (every rank seeds alike; the streams of a resized run are not those of an unresized one).
- ``redistributed``: per-rank state another world size can re-split: every rank's state is
  gathered into ``all_ranks.pt`` and every rank gets the whole list, ``obj.load_rank_states(states)``
  (old rank order), e.g. :class:`dalle_ds.data.virtual_ranks.VirtualRankLoader`, whose data
  position stays exactly-once on any world size that divides its number of virtual ranks.
- ``node_replica``: ``obj.state_dict()`` is collective and returns the same state on every node for
  a node-local rank; only node 0's ranks write it. PowerSGD's error buffers differ across nodes,
  but the averaged update depends only on their mean over nodes (the 16-bit payload's rounding
  aside), so :meth:`dalle_ds.parallel.hierarchy.Hierarchy.checkpoint_state` saves that mean, one
  copy, and every node resumes with it, on any number of nodes: the next updates are the ones the
  uninterrupted run makes. Per-rank buffers would have cost N copies of 4 B per compressed
  parameter: for the paper preset 3.53 GB per GPU, 28 GB per node, 3.6 TB per checkpoint on 128
  nodes. The one copy costs 28 GB (against ~148 GB for one copy of the model state) and one cross-node
  all-reduce per buffer at each checkpoint. Buffers that cannot be re-split (another node size,
  a run with one node, which does not compress) are reset with a logged warning.

DeepSpeed is called with ``save_latest=False``: its own ``latest`` file would move before the
project state exists. Signals only set a flag; at the step boundary ``should_save`` all-reduces
it, so every rank checkpoints at the same step even when the signal reached one rank only.
Checkpoints need a file system every rank sees (as DeepSpeed's do). ``resume`` loads DeepSpeed's
optimizer states but not its LR scheduler (the schedule is a registered object). Project files
are read with ``map_location="cpu"``; objects copy what they need onto their own devices.

Export: ``export(root, out_dir, model_config, tag=None)`` writes ``model.safetensors`` (consolidated
fp32 from checkpoint ``tag``, default the latest, via DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
in :mod:`dalle_ds.parallel.deepspeed_internals`; no huggingface_hub needed) and ``config.json``;
``load_export(out_dir)`` reads both back. Flat and hierarchical checkpoints export alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist

from dalle_ds.parallel import deepspeed_internals as ds_internals
from dalle_ds.parallel.dist import all_gather_objects, barrier, comm_device, get_rank, print0

EXIT_CHECKPOINTED = 75  # EX_TEMPFAIL: stopped by a signal after a complete checkpoint; requeue me
TAG_RE = re.compile(r"^step_(\d{8,})$")
RUN_MARKERS = ("COMPLETED", "REQUEUE")  # read by slurm/lib.sh to decide: done, or requeue and resume
ENTRY_PREFIX = "model."  # dalle_ds.parallel.engine.EntryPoint names parameters model.*


def write_run_marker(run_dir: str | Path, name: str, step: int) -> None:
    """Rank 0 leaves ``<run_dir>/COMPLETED`` (training finished) or ``<run_dir>/REQUEUE`` (stopped by a
    signal after a complete checkpoint). A new run clears both; the SLURM scripts act on them."""
    if name not in RUN_MARKERS:
        raise ValueError(f"marker={name!r}: must be one of {RUN_MARKERS}")
    if get_rank() == 0:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for other in RUN_MARKERS:
            (run_dir / other).unlink(missing_ok=True)
        (run_dir / name).write_text(f"{step}\n")
    barrier()


def clear_run_markers(run_dir: str | Path) -> None:
    if get_rank() == 0:
        for name in RUN_MARKERS:
            (Path(run_dir) / name).unlink(missing_ok=True)
    barrier()


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _world() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_latest(root: str | Path) -> str | None:
    """The tag in ``root/latest`` whose folder exists, or None."""
    path = Path(root) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not TAG_RE.match(tag) or not (Path(root) / tag).is_dir():
        raise FileNotFoundError(f"{path}: names {tag!r}, which is not a checkpoint folder in {root}")
    return tag


SCOPES = ("rank", "replicated", "redistributed", "node_replica")
LAYOUT = "layout.json"


class Checkpointer:
    """Saves and resumes one run's checkpoints under ``root`` (see the module docstring): every
    ``every_steps`` steps, keeping the last ``keep_last``; ``signals`` only set a stop flag.
    ``node_groups`` (hierarchical ZeRO): the model state is written once, by the first node."""

    def __init__(self, engine: Any, root: str | Path, every_steps: int, keep_last: int,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1), node_groups: Any = None):
        self.engine, self.root = engine, Path(root)
        self.every_steps, self.keep_last = every_steps, keep_last
        self.node_groups = node_groups
        self._stateful: dict[str, Stateful] = {}
        self._scopes: dict[str, str] = {}
        self._signal: int = 0
        self.stop_requested = False
        self.last_saved_step: int | None = None
        for sig in signals:
            signal.signal(sig, self._on_signal)

    @classmethod
    def from_config(cls, engine: Any, run_dir: str | Path, cfg: Any, node_groups: Any = None) -> "Checkpointer":
        return cls(engine, Path(run_dir) / "checkpoints", cfg.every_steps, cfg.keep_last, node_groups=node_groups)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum  # acted on at the next step boundary (should_save)

    def register_stateful(self, name: str, obj: Stateful, scope: str = "rank") -> None:
        """Save ``obj.state_dict()`` with every checkpoint; restore it on resume (``scope``: the
        module docstring)."""
        if name in self._stateful or name in ("rng", "step", "client", "world_size", "node_size"):
            raise ValueError(f"register_stateful: name {name!r} is already taken")
        if scope not in SCOPES:
            raise ValueError(f"register_stateful({name!r}): scope={scope!r}, expected one of {SCOPES}")
        if scope == "redistributed" and not hasattr(obj, "load_rank_states"):
            raise TypeError(f"register_stateful({name!r}, scope='redistributed'): {type(obj).__name__} has no "
                            "load_rank_states(states)")
        self._stateful[name] = obj
        self._scopes[name] = scope

    def _names(self, *scopes: str) -> list[str]:
        return [n for n, s in self._scopes.items() if s in scopes]

    # -- the layout
    @property
    def node_size(self) -> int:
        return self.node_groups.node_size if self.node_groups is not None else _world()

    def _node_local_rank(self) -> int:
        return get_rank() % self.node_size if self.node_groups is not None else get_rank()

    def _first_node(self) -> bool:
        return self.node_groups is None or self.node_groups.node_index == 0

    def _deepspeed(self, writes: bool = True):
        """DeepSpeed's save/load as one node's flat ZeRO-3 (hierarchical), or as it is (flat)."""
        if self.node_groups is None:
            return contextlib.nullcontext()
        return ds_internals.node_local_checkpoint(self.engine.ds, self.node_groups.intra, writes)

    # -- save
    def should_save(self, step: int) -> bool:
        """Collective (every rank must call it each step): due by cadence or by a signal anywhere."""
        flag = torch.tensor([self._signal], dtype=torch.int32, device=comm_device())
        if _world() > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        if int(flag.item()):
            self.stop_requested = True
            print0(f"checkpoint: signal {int(flag.item())} received, saving at step {step} and stopping")
        return self.stop_requested or (step > 0 and step % self.every_steps == 0)

    def save(self, step: int, client_state: dict[str, Any] | None = None) -> Path:
        """Collective. Writes DeepSpeed's shards and the project state, then ``latest``."""
        tag = tag_for(step)
        folder = self.root / tag
        if get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # left by a crash mid-save (never the one `latest` names)
                if read_latest(self.root) == tag:
                    raise FileExistsError(f"{folder}: already the latest checkpoint")
                shutil.rmtree(folder)
        barrier()
        with self._deepspeed(writes=self._first_node()):
            self.engine.ds.save_checkpoint(str(self.root), tag=tag, client_state={"step": step},
                                           save_latest=False)
        project = folder / "project"
        project.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "world_size": _world(), "node_size": self.node_size, "rng": rng_state(),
                 "client": client_state or {},
                 **{name: self._stateful[name].state_dict() for name in self._names("rank", "replicated")}}
        _save_atomic(state, project / f"rank_{get_rank():05d}.pt")
        # collectives, on every rank, in registration order
        gathered = {name: all_gather_objects(self._stateful[name].state_dict())
                    for name in self._names("redistributed")}
        node_state = {name: self._stateful[name].state_dict() for name in self._names("node_replica")}
        if node_state and self._first_node():
            _save_atomic(node_state, project / f"node_rank_{self._node_local_rank():05d}.pt")
        if get_rank() == 0:
            if gathered:
                _save_atomic(gathered, project / "all_ranks.pt")
            layout = {"world_size": _world(), "node_size": self.node_size, "num_nodes": _world() // self.node_size}
            _write_text_atomic(project / LAYOUT, json.dumps(layout) + "\n")
        self._commit(tag)
        self.last_saved_step = step
        return folder

    def _commit(self, tag: str) -> None:
        barrier()  # every rank has written its part
        if get_rank() == 0:
            _write_text_atomic(self.root / "latest", tag + "\n")
            self._prune(tag)
        barrier()
        print0(f"checkpoint: saved {self.root / tag}")

    def _prune(self, latest: str) -> None:
        latest_step = int(TAG_RE.match(latest).group(1))
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := TAG_RE.match(p.name)))
        complete = [s for s in steps if s <= latest_step]
        keep = set(complete[-self.keep_last:])
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / tag_for(s), ignore_errors=True)

    # -- resume
    def resume(self) -> dict[str, Any] | None:
        """Restore the checkpoint ``latest`` names (if any); returns its state (``step`` etc.)."""
        tag = read_latest(self.root)
        if tag is None:
            return None
        project = self.root / tag / "project"
        saved_world, saved_node = self._saved_layout(project)
        world, rank = _world(), get_rank()
        if saved_node != self.node_size:
            if self.node_groups is None and saved_world == saved_node:
                how = ("a flat ZeRO-3 checkpoint resumes on the same number of ranks only (hierarchical runs, "
                       "powersgd.hierarchical or powersgd.enabled, resume on any number of nodes of their size)")
            else:
                how = "resume with nodes of the saved size (powersgd.node_size)"
            raise ValueError(f"{project / LAYOUT}: the model state is partitioned over {saved_node} ranks "
                             f"({saved_world} ranks saved it); this run partitions over {self.node_size}: {how}")
        if saved_world != world:
            refused = self._names("rank")
            if refused:
                raise ValueError(f"{project}: saved by {saved_world} ranks, resuming with {world}: the state of "
                                 f"{refused} is per rank and cannot be re-split (register it with another scope)")
            print0(f"checkpoint: WARNING {self.root / tag} was saved by {saved_world} ranks "
                   f"({_nodes(saved_world // saved_node)} of {saved_node}), resuming on {world} "
                   f"({_nodes(world // self.node_size)}); RNG streams are taken from rank r mod {saved_world}")
        path = project / f"rank_{rank % saved_world:05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; was {self.root / tag} written by {saved_world} ranks?")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["world_size"] != saved_world:
            raise ValueError(f"{path}: saved by {state['world_size']} ranks, but {project / LAYOUT} says {saved_world}")
        with self._deepspeed():
            load_path, _ = self.engine.ds.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"{self.root / tag}: DeepSpeed found no checkpoint there")
        for name in self._names("rank", "replicated"):
            if name not in state:
                raise KeyError(f"{path}: no state for {name!r} (has {sorted(state)})")
            self._stateful[name].load_state_dict(state[name])
        if self._names("redistributed"):
            all_path = project / "all_ranks.pt"
            gathered = torch.load(all_path, map_location="cpu", weights_only=False)
            for name in self._names("redistributed"):
                if name not in gathered or len(gathered[name]) != saved_world:
                    raise KeyError(f"{all_path}: no state of {saved_world} ranks for {name!r} (has {sorted(gathered)})")
                self._stateful[name].load_rank_states(gathered[name])
        if self._names("node_replica"):
            node_path = project / f"node_rank_{self._node_local_rank():05d}.pt"
            node_state = torch.load(node_path, map_location="cpu", weights_only=False)
            for name in self._names("node_replica"):
                if name not in node_state:
                    raise KeyError(f"{node_path}: no state for {name!r} (has {sorted(node_state)})")
                self._stateful[name].load_state_dict(node_state[name])
        set_rng_state(state["rng"])
        self.last_saved_step = state["step"]
        print0(f"checkpoint: resumed from {self.root / tag} at step {state['step']}")
        return state

    def _saved_layout(self, project: Path) -> tuple[int, int]:
        """(world size, node size) of the checkpoint; one written before layout.json is flat ZeRO-3."""
        path = project / LAYOUT
        if not path.is_file():
            old = project / f"rank_{get_rank():05d}.pt"
            if not old.is_file():
                raise FileNotFoundError(f"{path}: missing, and so is {old}")
            world = torch.load(old, map_location="cpu", weights_only=False)["world_size"]
            return world, world
        try:
            layout = json.loads(path.read_text())
            return int(layout["world_size"]), int(layout["node_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a checkpoint layout ({e!r})") from None


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)




# ---------------------------------------------------------------- export


def consolidated_state_dict(root: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 full parameters from a ZeRO checkpoint (offline, one process), wrapper prefix removed."""
    tag = tag or read_latest(root)
    if tag is None:
        raise FileNotFoundError(f"{root}: no 'latest' file; pass a tag")
    state = ds_internals.fp32_state_dict_from_zero_checkpoint(str(root), tag)
    if state and all(k.startswith(ENTRY_PREFIX) for k in state):
        state = {k[len(ENTRY_PREFIX):]: v for k, v in state.items()}
    return state


def export(root: str | Path, out_dir: str | Path, model_config: dict[str, Any], tag: str | None = None) -> Path:
    """``out_dir/model.safetensors`` + ``out_dir/config.json`` from checkpoint ``tag`` (default latest)."""
    from safetensors.torch import save_file

    state = consolidated_state_dict(root, tag)
    seen: dict[int, str] = {}
    tensors = {}
    for k, v in state.items():  # tied weights share storage; safetensors wants distinct tensors
        v = v.detach().float().contiguous()
        tensors[k] = v.clone() if v.data_ptr() in seen else v
        seen[v.data_ptr()] = k
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"source": str(Path(root) / (tag or read_latest(root)))})
    _write_text_atomic(out / "config.json", json.dumps(model_config, indent=2) + "\n")
    return out


def load_export(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    out = Path(out_dir)
    for name in ("model.safetensors", "config.json"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name}: missing (write it with `python -m dalle_ds.export RUN_DIR OUT_DIR`)")
    return load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())
