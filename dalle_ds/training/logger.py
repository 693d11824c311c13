"""One metrics logger for every trainer: the same stdout line, metrics.jsonl and TensorBoard.

    log = MetricsLogger.from_config(cfg.run.dir, cfg.logging)      # rank 0 writes; other ranks no-op
    log.log(step, {"loss": 3.2, "lr": 3e-4})                         # split "train"
    log.log(step, {"psnr": 31.0}, split="eval")
    log.close()

One name per metric everywhere, one prefix convention, the split:
- stdout (rank 0, through ``print0``, or above the progress bar): ``train step 10: loss=3.2 lr=0.0003
  elapsed=0:01:02 eta=1:43:00``; floats with 4 significant digits (whole numbers from 1e4 to 1e7), per-rank
  lists (``memory_mb``) as their maximum; elapsed and ETA once the loop has started (``start_progress``);
- ``<run_dir>/metrics.jsonl`` (split train) or ``<run_dir>/eval.jsonl`` (split eval): one JSON row
  per call, ``{"step": 10, "loss": 3.2, ...}`` with the bare names (the file is the split);
- TensorBoard ``<run_dir>/tb``: scalars tagged ``train/loss``, ``eval/psnr``; per-rank lists as
  ``train/memory_mb/rank0``...; images as ``train/<name>``.
- Weights & Biases (``logging.wandb``, optional: ``pip install wandb``; ``WANDB_MODE=offline`` logs without
  a network): the TensorBoard tags, run ``logging.wandb_project`` / ``logging.wandb_name`` in ``<run_dir>/wandb``.
A tqdm bar (rank 0, stderr) only where it can be seen: ``logging.progress_bar`` "auto" (the default) shows
one when stderr is a terminal and never under SLURM or with output to a file; true forces it, false turns it off.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from dalle_ds.parallel.dist import get_rank, print0

SPLITS = {"train": "metrics.jsonl", "eval": "eval.jsonl"}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl / eval.jsonl written by :class:`MetricsLogger`; a missing file is
    empty and a line still being written (not yet valid JSON) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def format_value(v: Any) -> str:
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.0f}" if 1e4 <= abs(v) < 1e7 else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
        return format_value(float(max(v)))
    return str(v)


def format_duration(seconds: float) -> str:
    """``3725.0`` -> ``1:02:05``; days as ``2d3:04:05``."""
    s = int(max(0.0, seconds) + 0.5)
    d, s = divmod(s, 86400)
    return (f"{d}d" if d else "") + f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def want_bar(progress_bar: bool | str, stream: Any = None) -> bool:
    """``logging.progress_bar``: true, false, or "auto" = only when ``stream`` (stderr) is a terminal."""
    if progress_bar == "auto":
        stream = sys.stderr if stream is None else stream
        return bool(getattr(stream, "isatty", lambda: False)())
    return bool(progress_bar)


def format_line(split: str, step: int, values: Mapping[str, Any], keys: list[str] | None = None) -> str:
    """``<split> step <step>: k=v k=v`` over ``keys`` (default: every value), in that order."""
    shown = [k for k in (keys if keys is not None else values) if k in values]
    return f"{split} step {step}: " + " ".join(f"{k}={format_value(values[k])}" for k in shown)


def _scalars(split: str, values: Mapping[str, Any]) -> list[tuple[str, float]]:
    out = []
    for k, v in values.items():
        if isinstance(v, (list, tuple)):
            out += [(f"{split}/{k}/rank{r}", float(x)) for r, x in enumerate(v) if isinstance(x, (int, float))]
        elif isinstance(v, (int, float)) and k != "step":
            out.append((f"{split}/{k}", float(v)))
    return out


class MetricsLogger:
    """Rank-0 metrics sink. ``run_dir=None``: stdout (and the bar) only."""

    def __init__(self, run_dir: str | Path | None, *, tensorboard: bool = True, progress_bar: bool | str = False,
                 echo_keys: list[str] | None = None, wandb: dict[str, Any] | None = None):
        self.main = get_rank() == 0
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress_bar, self.echo_keys = want_bar(progress_bar), echo_keys
        self.writer, self.bar, self._files, self.wandb = None, None, {}, None
        self._clock: tuple[float, int, int] | None = None  # (start time, first step, total) of start_progress
        if self.main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
        if self.main and wandb is not None:
            self.wandb = start_wandb(self.run_dir, **wandb)

    @classmethod
    def from_config(cls, run_dir: str | Path, cfg: Any, echo_keys: list[str] | None = None,
                    run_config: Any = None) -> "MetricsLogger":
        """From ``cfg.logging`` (tensorboard, progress_bar, wandb + project/name; ``run_config`` goes to W&B)."""
        wandb = None
        if getattr(cfg, "wandb", False):
            wandb = {"project": cfg.wandb_project, "name": cfg.wandb_name or Path(run_dir).resolve().name,
                     "config": run_config.to_dict() if hasattr(run_config, "to_dict") else run_config}
        return cls(run_dir, tensorboard=cfg.tensorboard, progress_bar=cfg.progress_bar, echo_keys=echo_keys,
                   wandb=wandb)

    def start_progress(self, total: int, initial: int, desc: str) -> None:
        """The loop starts: elapsed and ETA count from here (and the bar, when there is one)."""
        if self._clock is None:
            self._clock = (time.perf_counter(), initial, total)
        if self.main and self.progress_bar and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, values: Mapping[str, Any], split: str = "train", echo: bool = True) -> None:
        """Every rank may call it; rank 0 writes the row, its scalars and (``echo``) the line."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: one of {sorted(SPLITS)}")
        if not self.main:
            return
        if self.run_dir is not None:
            self._file(split).write(json.dumps({"step": step, **values}) + "\n")
            self._file(split).flush()
        scalars = _scalars(split, values)
        if self.writer is not None:
            for tag, v in scalars:
                self.writer.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)
        if self.bar is not None and "loss" in values and split == "train":
            self.bar.set_postfix(loss=format_value(values["loss"]))
        if echo:
            line = format_line(split, step, values, self.echo_keys if split == "train" else None)
            self.echo(line + (self._timing(step) if split == "train" else ""))

    def _timing(self, step: int) -> str:
        """`` elapsed=H:MM:SS eta=H:MM:SS`` from the loop's start (ETA once a step is done)."""
        if self._clock is None:
            return ""
        t0, first, total = self._clock
        elapsed = time.perf_counter() - t0
        done = step - first
        out = f" elapsed={format_duration(elapsed)}"
        if done > 0 and total >= step:
            out += f" eta={format_duration(elapsed / done * (total - step))}"
        return out

    def echo(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print0(line)

    def image(self, name: str, image: Any, step: int, split: str = "train") -> None:
        if self.main and self.writer is not None:
            self.writer.add_image(f"{split}/{name}", image, step)
        if self.main and self.wandb is not None:
            import wandb

            array = image.detach().cpu().permute(1, 2, 0).numpy() if hasattr(image, "permute") else image  # (H, W, C)
            self.wandb.log({f"{split}/{name}": wandb.Image(array)}, step=step)

    def _file(self, split: str):
        if split not in self._files:
            self._files[split] = open(self.run_dir / SPLITS[split], "a")
        return self._files[split]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def start_wandb(run_dir: Path | None, project: str, name: str | None = None, config: Any = None):
    """A W&B run (rank 0) writing under ``<run_dir>/wandb``; a clear error when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        from dalle_ds.config import ConfigError

        raise ConfigError("logging.wandb=true: the wandb package is not installed (pip install wandb==0.31.0, "
                          "or logging.wandb=false)") from None
    kwargs: dict[str, Any] = {"project": project, "name": name, "config": config}
    if run_dir is not None:
        kwargs["dir"] = str(run_dir)
    return wandb.init(**kwargs)
