"""The trainer skeleton: steps, step timing, checkpoints, the signal stop, run markers, exit codes.

    loop = TrainLoop(cfg.optim.max_steps, log, ckpt=ckpt, run_dir=cfg.run.dir, desc="train")
    loop.resume(cfg.checkpoint.resume)               # clears COMPLETED/REQUEUE, restores `latest`
    for step in loop:                                # step = updates done once this body has run (1-based)
        ...one update...; log.log(step, values)
    return loop.exit_code                            # 0, or EXIT_CHECKPOINTED (75)

After each body the loop advances the progress bar and calls ``ckpt.should_save(step)`` (collective:
every rank, every step); a SIGTERM/SIGUSR1 on any rank makes every rank save at that step, then
rank 0 writes ``<run_dir>/REQUEUE`` and the loop ends with ``exit_code = EXIT_CHECKPOINTED``, which
slurm/lib.sh reads as "checkpointed: requeue and resume". Reaching ``max_steps`` saves the last
step (unless just saved), writes ``<run_dir>/COMPLETED`` and sets ``exit_code = 0``. Either way
the loop closes the logger (files, TensorBoard, bar) when it ends. Without a
checkpointer (the CLIP helper) the loop only counts, times and shows progress.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

from dalle_ds.parallel.checkpoint import EXIT_CHECKPOINTED, Checkpointer, clear_run_markers, write_run_marker
from dalle_ds.training.logger import MetricsLogger

EXIT_COMPLETED = 0
__all__ = ["EXIT_CHECKPOINTED", "EXIT_COMPLETED", "StepTimer", "TrainLoop"]


class StepTimer:
    """Wall time of the steps since the last ``window()`` and since the start."""

    def __init__(self) -> None:
        self.start = self._t0 = time.perf_counter()
        self._steps = 0

    def tick(self) -> None:
        self._steps += 1

    def window(self) -> tuple[int, float]:
        """(steps, seconds) since the previous call (or the start); starts a new window."""
        now = time.perf_counter()
        out = (self._steps, now - self._t0)
        self._t0, self._steps = now, 0
        return out

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start


class TrainLoop:
    """Iterate the updates of a run; owns the checkpoint cadence, the signal stop and the markers."""

    def __init__(self, max_steps: int, log: MetricsLogger, *, ckpt: Checkpointer | None = None,
                 run_dir: str | Path | None = None, desc: str = "train"):
        if ckpt is not None and run_dir is None:
            raise ValueError("TrainLoop: a checkpointer needs run_dir (the markers go there)")
        self.max_steps, self.log, self.ckpt, self.desc = max_steps, log, ckpt, desc
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.step = 0
        self.exit_code: int | None = None  # set when the iteration ends
        self.timer = StepTimer()
        self._on_save: list[Callable[[int], None]] = []

    def on_save(self, fn: Callable[[int], None]) -> None:
        """``fn(step)`` on every rank after each checkpoint (e.g. refresh an export)."""
        self._on_save.append(fn)

    def resume(self, enabled: bool = True) -> dict[str, Any] | None:
        """Clear the previous run's markers; restore ``latest`` when ``enabled``. Returns its state."""
        if self.run_dir is not None:
            clear_run_markers(self.run_dir)
        state = self.ckpt.resume() if (self.ckpt is not None and enabled) else None
        self.step = state["step"] if state else 0
        return state

    def save(self) -> None:
        self.ckpt.save(self.step)
        for fn in self._on_save:
            fn(self.step)

    def __iter__(self) -> Iterator[int]:
        self.log.start_progress(self.max_steps, self.step, self.desc)
        self.timer = StepTimer()
        while self.step < self.max_steps:
            self.timer.tick()
            yield self.step + 1
            self.step += 1
            self.log.advance()
            if self.ckpt is not None and self.ckpt.should_save(self.step):
                self.save()
            if self.ckpt is not None and self.ckpt.stop_requested:
                self._finish("REQUEUE", EXIT_CHECKPOINTED)
                return
        if self.ckpt is not None and self.ckpt.last_saved_step != self.step:
            self.save()
        self._finish("COMPLETED", EXIT_COMPLETED)

    def _finish(self, marker: str, code: int) -> None:
        if self.run_dir is not None:
            write_run_marker(self.run_dir, marker, self.step)
        self.exit_code = code
        self.log.close()
