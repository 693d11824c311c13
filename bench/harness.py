"""Benchmark recording: every result carries the machine, the date and the command that made it.

    with Recorder("matmul_peak") as rec:
        rec.add("fp32_gflops", 158.3, unit="GFLOP/s", shape=[2048, 2048])

writes ``bench/results/<name>-<hostname-hash>-<date>.json`` and prints the figures.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from dalle_ds.training.flops import figure, latest  # noqa: F401 - MFU look-ups live in the library now

RESULTS_DIR = Path(__file__).parent / "results"


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        info["deepspeed"] = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def timeit(fn, warmup: int = 2, repeat: int = 5, sync=None) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class Recorder:
    def __init__(self, name: str, results_dir: Path | str = RESULTS_DIR):
        self.name = name
        self.results_dir = Path(results_dir)
        self.figures: list[dict[str, Any]] = []

    def add(self, metric: str, value: float, unit: str = "", **details: Any) -> None:
        row = {"metric": metric, "value": value, "unit": unit, **details}
        self.figures.append(row)
        extra = " ".join(f"{k}={v}" for k, v in details.items())
        print(f"{self.name}: {metric} = {value:.4g} {unit} {extra}".rstrip(), flush=True)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.save()

    def save(self) -> Path:
        now = _dt.datetime.now(_dt.timezone.utc)
        machine = machine_info()
        tag = hashlib.sha1(f"{machine['cpu']}{machine['gpu']}".encode()).hexdigest()[:6]
        record = {
            "benchmark": self.name,
            "date": now.isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "machine": machine,
            "figures": self.figures,
        }
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.name}-{'gpu' if machine['gpu'] else 'cpu'}-{tag}-{now:%Y%m%d}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"recorded {path}", flush=True)
        return path
