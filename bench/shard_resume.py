"""shard_corpus resume cost: wall time of a resume at 90% done against a full run.

    PYTHONPATH=. python bench/shard_resume.py [--tars 3] [--fraction 0.9]

Inputs: the img2dataset-like tars of bench/shard_memory.py (10,000 tiny 8x8 samples each, made
if missing). A full run is timed; a second job over the same inputs is stopped (as Ctrl-C would)
after ``--fraction`` of the inputs, then its resume is timed. A resume starts at the tar holding
the next sample (the progress record's cursor), so it costs what is left plus the start-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import Recorder  # noqa: E402
from bench.shard_memory import PER_TAR, make_tar  # noqa: E402
from data_prep import shard_corpus  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tars", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.9)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-shard-memory"))
    args = p.parse_args()
    inputs = args.workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    tars = [inputs / f"part-{k:05d}.tar" for k in range(args.tars)]
    for k, t in enumerate(tars):
        if not t.exists():
            make_tar(t, k)
    common = ["--input", *map(str, tars), "--workers", "1", "--samples-per-shard", "1000", "--image-size", "8",
              "--min-size", "8", "--no-progress"]
    full_out, res_out = args.workdir / "resume-full", args.workdir / "resume-cut"
    for d in (full_out, res_out):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    full = shard_corpus.main([*common, "--output", str(full_out)])
    full_s = time.perf_counter() - t0
    stop_at = int(args.fraction * len(tars) * PER_TAR)
    real_run = shard_corpus._run

    def stopping(*a, **kw):
        for k, outcome in enumerate(real_run(*a, **kw)):
            if k == stop_at:
                raise KeyboardInterrupt
            yield outcome
    shard_corpus._run = stopping
    try:
        shard_corpus.main([*common, "--output", str(res_out)])
    except KeyboardInterrupt:
        pass
    finally:
        shard_corpus._run = real_run
    t0 = time.perf_counter()
    resumed = shard_corpus.main([*common, "--output", str(res_out)])
    resume_s = time.perf_counter() - t0
    assert resumed == full, "the resumed output differs from the full run's"
    with Recorder("shard_resume") as rec:
        info = dict(inputs=full["inputs"], stopped_at=stop_at, image="8x8 ppm in tars", workers=1,
                    load_avg_1min=round(os.getloadavg()[0], 2))
        rec.add("full_run_s", full_s, unit="s", **info)
        rec.add(f"resume_at_{int(100 * args.fraction)}pct_s", resume_s, unit="s", **info)
        rec.add("resume_over_full", resume_s / full_s, unit="x", ideal=round(1 - args.fraction, 3))
    for d in (full_out, res_out):
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
