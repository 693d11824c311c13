"""shard_corpus throughput: images/s with 1 and 2 worker processes on 256-512 px JPEG inputs.

    PYTHONPATH=. python bench/shard_corpus.py [--images 1000] [--image-size 384]

Generates a folder corpus of JPEGs (random sizes, sides in [256, 512], aspect within [1/2, 2],
smooth random content), then times data_prep/shard_corpus.py end to end (listing, decode,
filters, pixel hash, resize to the shorter side, JPEG encode, tar writing, manifest) into a
local folder, alternating worker counts for ``--repeats`` rounds, and records with
bench.harness.Recorder the best and median wall-clock images/s per worker count, and the CPU
milliseconds per image spent in the main process and in the workers (getrusage). The CPU
figures say what the wall figures cannot on a shared machine: the main process's share of the
work bounds the speed-up from more workers (Amdahl), whatever the machine's load.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Recorder  # noqa: E402
from data_prep import shard_corpus  # noqa: E402


def make_inputs(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(x) for x in rng.integers(256, 513, size=2))
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        sub = folder / f"{i // 250:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        im.save(sub / f"{i:06d}.jpg", quality=90)
        (sub / f"{i:06d}.txt").write_text(f"a smooth random picture number {i}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        corpus = Path(tmp) / "corpus"
        make_inputs(corpus, args.images)
        runs: dict[int, list[tuple[float, float, float, int]]] = {k: [] for k in args.workers}
        for rep in range(args.repeats):
            for k in args.workers:
                out = Path(tmp) / f"out-{k}-{rep}"
                self0, kids0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                m = shard_corpus.main(["--input", str(corpus), "--output", str(out), "--workers", str(k),
                                       "--samples-per-shard", "250", "--image-size", str(args.image_size),
                                       "--no-progress"])
                seconds = time.perf_counter() - t0
                runs[k].append((seconds, _cpu(resource.RUSAGE_SELF) - self0,
                                _cpu(resource.RUSAGE_CHILDREN) - kids0, m["inputs"]))
        with Recorder("shard_corpus") as rec:
            best = {}
            for k, rows in runs.items():
                n = rows[0][3]
                rates = [n / r[0] for r in rows]
                best[k] = max(rates)
                common = dict(workers=k, inputs=n, image_size=args.image_size, input_sides="256-512",
                              repeats=len(rows), load_avg_1min=round(os.getloadavg()[0], 2))
                rec.add(f"images_per_s_workers{k}", best[k], unit="img/s", median=round(statistics.median(rates), 1),
                        **common)
                rec.add(f"main_cpu_ms_per_image_workers{k}", 1000 * min(r[1] for r in rows) / n, unit="ms", **common)
                rec.add(f"worker_cpu_ms_per_image_workers{k}", 1000 * min(r[2] for r in rows) / n, unit="ms",
                        **common)
            if 1 in best:
                for k in best:
                    if k != 1:
                        rec.add(f"speedup_workers{k}_vs_1", best[k] / best[1], unit="x")


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
