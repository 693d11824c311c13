"""Checkpoints: DeepSpeed's shards plus the project's state, an atomic ``latest``, keep the last K.

    ckpt = Checkpointer.from_config(engine, cfg.run.dir, cfg.checkpoint)   # root: <run.dir>/checkpoints
    # or Checkpointer(engine, root, every_steps, keep_last, signals=(SIGTERM, SIGUSR1))
    ckpt.register_stateful("schedule", sched)      # anything with state_dict / load_state_dict
    ckpt.register_stateful("data", loader)         # per-rank objects are saved per rank
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

    step_00000200/                DeepSpeed's tag folder (model/optimizer shards per rank)
    step_00000200/project/rank_00000.pt   this rank's state: step, world_size, RNG (python, numpy,
                                           torch, cuda), ``client_state`` passed to ``save``, and
                                           every registered object's state_dict under its name
    latest                        "step_00000200", written (tmp + rename) by rank 0 only after
                                  every rank has finished writing (a barrier), so a crash
                                  mid-save leaves the previous checkpoint the one resumed.

DeepSpeed is called with ``save_latest=False``: its own ``latest`` file would move before the
project state exists. Signals only set a flag; at the step boundary ``should_save`` all-reduces
it, so every rank checkpoints at the same step even when the signal reached one rank only.
Checkpoints need a file system every rank sees (as DeepSpeed's do). ``resume`` refuses a
checkpoint written by another number of ranks (data positions and RNG states are per rank) and
loads DeepSpeed's optimizer states but not its LR scheduler (the schedule is a registered object).

Export: ``export(root, out_dir, model_config, tag=None)`` writes ``model.safetensors`` (consolidated
fp32 from checkpoint ``tag``, default the latest, via DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
in :mod:`dalle_ds.parallel.deepspeed_internals`; no huggingface_hub needed) and ``config.json``;
``load_export(out_dir)`` reads both back.
"""

from __future__ import annotations

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
from dalle_ds.parallel.dist import barrier, comm_device, get_rank, print0

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


class Checkpointer:
    """Saves and resumes one run's checkpoints under ``root`` (see the module docstring): every
    ``every_steps`` steps, keeping the last ``keep_last``; ``signals`` only set a stop flag."""

    def __init__(self, engine: Any, root: str | Path, every_steps: int, keep_last: int,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.engine, self.root = engine, Path(root)
        self.every_steps, self.keep_last = every_steps, keep_last
        self._stateful: dict[str, Stateful] = {}
        self._signal: int = 0
        self.stop_requested = False
        self.last_saved_step: int | None = None
        for sig in signals:
            signal.signal(sig, self._on_signal)

    @classmethod
    def from_config(cls, engine: Any, run_dir: str | Path, cfg: Any) -> "Checkpointer":
        return cls(engine, Path(run_dir) / "checkpoints", cfg.every_steps, cfg.keep_last)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum  # acted on at the next step boundary (should_save)

    def register_stateful(self, name: str, obj: Stateful) -> None:
        """Save ``obj.state_dict()`` with every checkpoint (per rank); restore it on resume."""
        if name in self._stateful or name in ("rng", "step", "client"):
            raise ValueError(f"register_stateful: name {name!r} is already taken")
        self._stateful[name] = obj

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
        """Collective. Writes DeepSpeed's shards and this rank's project state, then ``latest``."""
        tag = tag_for(step)
        folder = self.root / tag
        if get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # left by a crash mid-save (never the one `latest` names)
                if read_latest(self.root) == tag:
                    raise FileExistsError(f"{folder}: already the latest checkpoint")
                shutil.rmtree(folder)
        barrier()
        self.engine.ds.save_checkpoint(str(self.root), tag=tag, client_state={"step": step},
                                       save_latest=False)
        state = {"step": step, "world_size": _world(), "rng": rng_state(), "client": client_state or {},
                 **{name: obj.state_dict() for name, obj in self._stateful.items()}}
        project = folder / "project"
        project.mkdir(parents=True, exist_ok=True)
        path = project / f"rank_{get_rank():05d}.pt"
        torch.save(state, path.with_suffix(".pt.tmp"))
        path.with_suffix(".pt.tmp").replace(path)
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
        path = self.root / tag / "project" / f"rank_{get_rank():05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; was {self.root / tag} written by {_world()} ranks?")
        state = torch.load(path, weights_only=False)
        if state["world_size"] != _world():
            raise ValueError(f"{path}: saved by {state['world_size']} ranks, resuming with {_world()}: "
                             f"the data position and RNG states are per rank")
        load_path, _ = self.engine.ds.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"{self.root / tag}: DeepSpeed found no checkpoint there")
        for name, obj in self._stateful.items():
            if name not in state:
                raise KeyError(f"{path}: no state for {name!r} (has {sorted(state)})")
            obj.load_state_dict(state[name])
        set_rng_state(state["rng"])
        self.last_saved_step = state["step"]
        print0(f"checkpoint: resumed from {self.root / tag} at step {state['step']}")
        return state


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
