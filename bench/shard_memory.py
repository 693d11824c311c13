"""shard_corpus peak memory against corpus size: peak RSS at 10k, 100k, 1M tiny samples.

    PYTHONPATH=. python bench/shard_memory.py [--samples 10000 100000 1000000] [--before-root /tmp/dalle-old]

Builds img2dataset-like input tars once (10,000 samples each; 8x8 PPM images of random pixels,
so every image is distinct; every 20th sample repeats an earlier sample's pixels -> ``duplicate``,
every 20th (offset 10) has a one-word caption -> ``caption_too_short``), then runs
``data_prep/shard_corpus.py --workers 1`` over the first N/10,000 tars in a fresh process per
run and records that process's peak RSS (``ru_maxrss``) and wall time. ``--before-root`` names a
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


def run(root: Path, tars: list[Path], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", DRIVER, "--input", *map(str, tars), "--output", str(out), "--workers", "1",
           "--samples-per-shard", "10000", "--image-size", "8", "--min-size", "8", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{root}: shard_corpus failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    manifest = json.loads((out / "manifest.json").read_text())
    result.update(samples=manifest["samples"], inputs=manifest["inputs"],
                  dropped=sum(manifest["dropped"].values()))
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--before-root", type=Path, default=None, help="checkout of the version to compare against")
    p.add_argument("--before-samples", type=int, nargs="+", default=None,
                   help="sizes to run the --before-root version at (default: --samples)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-shard-memory"))
    p.add_argument("--record-suffix", default="", help="appended to the record's name (e.g. _1m for a separate run)")
    args = p.parse_args()
    inputs = args.workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    n_tars = max(-(-n // PER_TAR) for n in args.samples)
    for part in range(n_tars):
        if not (inputs / f"part-{part:05d}.tar").exists():
            make_tar(inputs / f"part-{part:05d}.tar", part)
    roots = {"after": REPO} | ({"before": args.before_root.resolve()} if args.before_root else {})
    with Recorder("shard_memory" + args.record_suffix) as rec:
        for n in args.samples:
            tars = [inputs / f"part-{k:05d}.tar" for k in range(-(-n // PER_TAR))]
            for label, root in roots.items():
                if label == "before" and args.before_samples is not None and n not in args.before_samples:
                    continue
                r = run(root, tars, args.workdir / f"out-{label}")
                rec.add(f"peak_rss_mb_{label}_{n}", r["peak_rss_kb"] / 1024, unit="MiB", seconds=round(r["seconds"], 1),
                        inputs=r["inputs"], kept=r["samples"], dropped=r["dropped"], root=str(root),
                        image="8x8 ppm in tars", workers=1, load_avg_1min=round(os.getloadavg()[0], 2))
        for label in roots:
            big = [f for f in rec.figures if f["metric"].startswith(f"peak_rss_mb_{label}_")]
            if len(big) >= 2:
                rec.add(f"rss_growth_{label}_{big[-2]['inputs']}_to_{big[-1]['inputs']}",
                        big[-1]["value"] / big[-2]["value"], unit="x")


if __name__ == "__main__":
    main()
