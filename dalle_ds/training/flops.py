"""FLOP counts and the MFU denominator: useful model FLOPs over the recorded matmul peak.

    meter = Throughput.for_prior(cfg.model, tokens_per_step, precision_mode, world_size, local_world_size)
    meter.rates(steps=10, seconds=4.2)   # tokens_per_s, flops_per_s, step_time_s, mfu (when a peak is recorded)

The peak comes from ``python -m bench.matmul_peak``, which records ``bench/results/matmul_peak-<device>-*.json``
(``fp32_gflops``/``bf16_gflops`` for the CPU, ``cuda_<dtype>_gflops`` for a GPU). The library only
reads those files; it imports nothing from ``bench`` (``bench.harness`` imports ``latest``/``figure`` from here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle_ds.config import ModelConfig

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
PEAK_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp16_block": "fp16", "fp16_block16": "fp16", "fp32": "fp32"}  # precision mode -> matmul dtype


def latest(name: str, device: str = "cpu", results_dir: Path | str = RESULTS_DIR) -> dict[str, Any] | None:
    """The newest recorded result of a benchmark (for MFU denominators)."""
    paths = sorted(Path(results_dir).glob(f"{name}-{device}-*.json"))
    return json.loads(paths[-1].read_text()) if paths else None


def figure(record: dict[str, Any] | None, metric: str) -> float | None:
    if not record:
        return None
    for row in record["figures"]:
        if row["metric"] == metric:
            return float(row["value"])
    return None


def prior_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token of the prior (matmuls, attention over the allowed pairs only)."""
    from dalle_ds.models.prior import Prior

    return Prior.flops_per_sequence(m) / m.seq_len


def peak_flops(dtype: str, cuda: bool | None = None, results_dir: Path | str = RESULTS_DIR) -> float | None:
    """Recorded matmul peak of one device (CPU: the whole machine) in FLOP/s, or None when not recorded."""
    if dtype not in PEAK_DTYPE.values():
        raise ValueError(f"dtype={dtype!r}: one of {sorted(set(PEAK_DTYPE.values()))}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    record = latest("matmul_peak", "gpu" if cuda else "cpu", results_dir)
    gflops = figure(record, f"cuda_{dtype}_gflops" if cuda else f"{dtype}_gflops")
    return None if gflops is None else gflops * 1e9


def mfu_denominator(precision_mode: str, world_size: int, local_world_size: int, cuda: bool | None = None,
                    results_dir: Path | str = RESULTS_DIR) -> float | None:
    """Peak FLOP/s of all the devices a run uses: one per rank on GPUs; on CPUs one machine per node."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    peak = peak_flops(PEAK_DTYPE[precision_mode], cuda, results_dir)
    devices = world_size if cuda else max(1, world_size // max(1, local_world_size))
    return None if peak is None else peak * devices


@dataclass(frozen=True)
class Throughput:
    """Rates of a logging window from its step count and seconds."""

    tokens_per_step: int
    flops_per_token: float
    peak_total: float | None  # mfu_denominator(); None: no mfu

    @classmethod
    def for_prior(cls, m: ModelConfig, tokens_per_step: int, precision_mode: str, world_size: int,
                  local_world_size: int) -> "Throughput":
        return cls(tokens_per_step, prior_flops_per_token(m),
                   mfu_denominator(precision_mode, world_size, local_world_size))

    def rates(self, steps: int, seconds: float) -> dict[str, float]:
        tokens_s = self.tokens_per_step * steps / max(seconds, 1e-12)
        out = {"tokens_per_s": tokens_s, "flops_per_s": tokens_s * self.flops_per_token,
               "step_time_s": seconds / max(steps, 1)}
        if self.peak_total:
            out["mfu"] = out["flops_per_s"] / self.peak_total
        return out
