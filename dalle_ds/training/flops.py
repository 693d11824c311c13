"""FLOP counts and the MFU denominator: useful model FLOPs over the peak of the machine the run is on.

    meter = Throughput.for_prior(cfg.model, tokens_per_step, precision_mode, world_size, local_world_size)
    meter.rates(steps=10, seconds=4.2)   # tokens_per_s, flops_per_s, step_time_s, mfu (when a peak is known)

The peak, per device:
- GPU: the datasheet's dense tensor-core peak for the dtype, by device name (:data:`GPU_PEAK_TFLOPS`:
  V100 125 fp16 / 15.7 fp32, A100 312 bf16, H100/H200 989 bf16, ...); a GPU not in the table falls
  back to a recorded ``bench/results/matmul_peak-gpu-*.json`` figure, else no MFU;
- CPU: the figure ``python -m bench.matmul_peak`` recorded for this CPU model (``machine.cpu`` of a
  ``bench/results/matmul_peak-cpu-*.json`` equal to /proc/cpuinfo's model name; ``fp32_gflops`` /
  ``bf16_gflops``), one per node; otherwise a ~1 s matmul probe at start, run by every rank at once
  with its own threads and summed over the ranks (what the ranks of a node get together).
The library only reads those files; it imports nothing from ``bench`` (``bench.harness`` imports
``latest``/``figure`` from here).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle_ds.config import ModelConfig

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
PEAK_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp16_block": "fp16", "fp16_block16": "fp16", "fp32": "fp32"}  # precision mode -> matmul dtype
# Datasheet dense peaks (TFLOP/s; no sparsity; fp32 = plain FP32, not TF32), SXM parts unless named.
# The first name contained in torch.cuda.get_device_name() wins, so the specific names come first.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("V100S", {"fp16": 130.0, "fp32": 16.4}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]
PROBE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def latest(name: str, device: str = "cpu", results_dir: Path | str = RESULTS_DIR,
           cpu_model: str | None = None) -> dict[str, Any] | None:
    """The newest recorded result of a benchmark (for MFU denominators); with ``cpu_model`` only
    those recorded on that CPU model."""
    paths = sorted(Path(results_dir).glob(f"{name}-{device}-*.json"))
    for path in reversed(paths):
        record = json.loads(path.read_text())
        if cpu_model is None or (record.get("machine") or {}).get("cpu") == cpu_model:
            return record
    return None


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


def cpu_model() -> str:
    """/proc/cpuinfo's model name (what bench/harness.py records as ``machine.cpu``)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_datasheet_peak(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` for ``dtype``, or None when not in the table."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None


def probe_matmul(dtype: str = "fp32", seconds: float = 1.0, n: int = 1024) -> float:
    """FLOP/s of square ``n`` matmuls on this process's CPU threads, best of the repeats in ~``seconds``."""
    a = torch.randn(n, n).to(PROBE_DTYPES[dtype])
    b = torch.randn(n, n).to(PROBE_DTYPES[dtype])
    torch.mm(a, b)  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / max(time.perf_counter() - t0, 1e-9))
    return best


def peak_flops(dtype: str, cuda: bool | None = None, results_dir: Path | str = RESULTS_DIR,
               device_name: str | None = None, cpu: str | None = None) -> float | None:
    """Peak FLOP/s of one device (CPU: the whole machine) from the datasheet table (GPU) or a figure
    recorded on this CPU model / GPU; None when neither is known (then :func:`mfu_denominator` probes)."""
    if dtype not in PEAK_DTYPE.values():
        raise ValueError(f"dtype={dtype!r}: one of {sorted(set(PEAK_DTYPE.values()))}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        name = device_name if device_name is not None else torch.cuda.get_device_name()
        sheet = gpu_datasheet_peak(name, dtype)
        if sheet is not None:
            return sheet
        gflops = figure(latest("matmul_peak", "gpu", results_dir), f"cuda_{dtype}_gflops")
    else:
        record = latest("matmul_peak", "cpu", results_dir, cpu_model=cpu if cpu is not None else cpu_model())
        gflops = figure(record, f"{dtype}_gflops")
    return None if gflops is None else gflops * 1e9


def mfu_denominator(precision_mode: str, world_size: int, local_world_size: int, cuda: bool | None = None,
                    results_dir: Path | str = RESULTS_DIR, device_name: str | None = None, cpu: str | None = None,
                    probe: bool = True, probe_seconds: float = 1.0) -> float | None:
    """Peak FLOP/s of all the devices a run uses: one per rank on GPUs; on CPUs one machine per node,
    recorded for this CPU model or else probed by every rank at once (collective when distributed)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    dtype = PEAK_DTYPE[precision_mode]
    peak = peak_flops(dtype, cuda, results_dir, device_name, cpu)
    if peak is not None:
        return peak * (world_size if cuda else max(1, world_size // max(1, local_world_size)))
    if cuda or not probe:
        return None
    import torch.distributed as torch_dist

    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        from dalle_ds.parallel.dist import all_reduce_values, barrier

        barrier()  # every rank probes at once: together they measure what they share
        return all_reduce_values([probe_matmul(dtype, probe_seconds)])[0]
    return probe_matmul(dtype, probe_seconds) * world_size


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
