"""shard_corpus peak memory against corpus size: peak RSS at 10k, 100k, 1M tiny samples.

    PYTHONPATH=. python bench/shard_memory.py [--samples 10000 100000 1000000] [--before-root /tmp/dalle-old]

Builds img2dataset-like input tars once (10,000 samples each; 8x8 PPM images of random pixels,
so every image is distinct; every 20th sample repeats an earlier sample's pixels -> ``duplicate``,
every 20th (offset 10) has a one-word caption -> ``caption_too_short``), then runs
``data_prep/shard_corpus.py --workers 1`` over the first N/10,000 tars in a fresh process per
run and records that process's peak RSS (``ru_maxrss``) and wall time, and along the way its peak RSS
so far (``VmHWM``) after every finished 10,000-sample shard (the curve within one run). ``--before-root`` names a
checkout of an older version (e.g. ``git archive <commit> | tar -x -C /tmp/dalle-old``) run the
same way, so "before" and "after" share one record. The issue's target: flat within 20% from
100k to 1M samples.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import Recorder  # noqa: E402

PER_TAR = 10_000
DRIVER = """
import json, resource, runpy, sys, time
t0 = time.perf_counter()
sys.argv = ["data_prep/shard_corpus.py", *sys.argv[1:]]
try:
    runpy.run_path("data_prep/shard_corpus.py", run_name="__main__")
except SystemExit as e:
    if e.code not in (None, 0):
        raise
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0,
                               "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def make_tar(path: Path, part: int) -> None:
    rng = np.random.default_rng(part)
    pixels = rng.integers(0, 256, size=(PER_TAR, 8 * 8 * 3), dtype=np.uint8)
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(PER_TAR):
            n = part * PER_TAR + i
            px = pixels[i - 7] if i % 20 == 7 and i >= 7 else pixels[i]  # a duplicate of an earlier sample
            caption = "one" if i % 20 == 17 else f"synthetic sample number {n}"
            for ext, data in (("ppm", b"P6 8 8 255\n" + px.tobytes()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{n:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)


def run(root: Path, tars: list[Path], out: Path, stop_at: float | None = None) -> dict:
    """One shard_corpus process over ``tars``: its peak RSS and wall time, plus ``along``: its peak RSS
    so far (/proc VmHWM, what ru_maxrss reports at exit) each time another 10,000-sample shard is
    finished, so one large run also shows the curve (and a run stopped early still says something)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", DRIVER, "--input", *map(str, tars), "--output", str(out), "--workers", "1",
           "--samples-per-shard", "10000", "--image-size", "8", "--min-size", "8", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    along: list[dict] = []
    output: dict[str, str] = {}
    stopped = False
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        def drain() -> None:
            output["stdout"], output["stderr"] = proc.communicate()

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        while reader.is_alive():
            if stop_at is not None and time.time() > stop_at and proc.poll() is None:
                proc.terminate()  # out of time: what ``along`` holds is the result
                stopped = True
            progress = out / "_progress"
            shards = len(list(progress.glob("shard-*.tar.json"))) if progress.is_dir() else 0
            hwm = _vm_hwm_kib(proc.pid)
            if hwm and shards and (not along or along[-1]["shards"] < shards):
                along.append({"shards": shards, "peak_rss_mb": round(hwm / 1024, 1)})
            reader.join(timeout=1.0)
    stdout, stderr = output["stdout"], output["stderr"]
    if stopped:
        shutil.rmtree(out, ignore_errors=True)
        return {"stopped": True, "along": along}
    if proc.returncode != 0:
        raise RuntimeError(f"{root}: shard_corpus failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    result = json.loads(stdout.rsplit("RESULT ", 1)[1])
    manifest = json.loads((out / "manifest.json").read_text())
    result.update(samples=manifest["samples"], inputs=manifest["inputs"],
                  dropped=sum(manifest["dropped"].values()), along=along)
    shutil.rmtree(out, ignore_errors=True)
    return result


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--before-root", type=Path, default=None, help="checkout of the version to compare against")
    p.add_argument("--before-samples", type=int, nargs="+", default=None,
                   help="sizes to run the --before-root version at (default: --samples)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-shard-memory"))
    p.add_argument("--record-suffix", default="", help="appended to the record's name (e.g. _1m for a separate run)")
    p.add_argument("--stop-after-s", type=float, default=None,
                   help="stop the runs this many seconds after the start and record how far the last one got "
                        "(its peak RSS after each finished shard) instead of its final peak")
    args = p.parse_args()
    inputs = args.workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    n_tars = max(-(-n // PER_TAR) for n in args.samples)
    for part in range(n_tars):
        if not (inputs / f"part-{part:05d}.tar").exists():
            make_tar(inputs / f"part-{part:05d}.tar", part)
    roots = {"after": REPO} | ({"before": args.before_root.resolve()} if args.before_root else {})
    stop_at = time.time() + args.stop_after_s if args.stop_after_s else None
    with Recorder("shard_memory" + args.record_suffix) as rec:
        for n in args.samples:
            if stop_at is not None and time.time() > stop_at:
                break
            tars = [inputs / f"part-{k:05d}.tar" for k in range(-(-n // PER_TAR))]
            for label, root in roots.items():
                if label == "before" and args.before_samples is not None and n not in args.before_samples:
                    continue
                r = run(root, tars, args.workdir / f"out-{label}", stop_at)
                if r.get("stopped"):
                    last = r["along"][-1] if r["along"] else {"shards": 0, "peak_rss_mb": float("nan")}
                    rec.add(f"peak_rss_mb_{label}_{n}_stopped_after_{last['shards'] * 10000}_kept",
                            last["peak_rss_mb"], unit="MiB", stopped_after_s=args.stop_after_s, root=str(root),
                            image="8x8 ppm in tars", workers=1, load_avg_1min=round(os.getloadavg()[0], 2),
                            along=r["along"])
                    break
                rec.add(f"peak_rss_mb_{label}_{n}", r["peak_rss_kb"] / 1024, unit="MiB", seconds=round(r["seconds"], 1),
                        inputs=r["inputs"], kept=r["samples"], dropped=r["dropped"], root=str(root),
                        image="8x8 ppm in tars", workers=1, load_avg_1min=round(os.getloadavg()[0], 2),
                        along=r["along"])
        for label in roots:
            big = [f for f in rec.figures if f["metric"].startswith(f"peak_rss_mb_{label}_") and "inputs" in f]
            if len(big) >= 2:
                rec.add(f"rss_growth_{label}_{big[-2]['inputs']}_to_{big[-1]['inputs']}",
                        big[-1]["value"] / big[-2]["value"], unit="x")


if __name__ == "__main__":
    main()
