"""Loader throughput: samples/s of ImageShardLoader (64 and 256 px) and TokenShardLoader, 0/1/2 workers.

    DS_ACCELERATOR=cpu PYTHONPATH=. .venv/bin/python bench/loader.py [--batches 16 --repeats 3]

Synthetic shards in a temp folder, shaped like shard_corpus.py output: JPEG (quality 90) with the
shorter side 384 px for the 256 px run (room for the 12/8 random resize) and 96 px for the 64 px
run; token shards with a 32x32 grid of uint16 codes and a BPE tokenizer (vocab 1024) trained
here on the captions. Steady state: the first batches (worker start-up) are not timed. Each figure
is the median over fresh loaders, with the best run, the 1-minute load average and the main
process's CPU time per sample (with 0 workers, the loader's whole cost on one core).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from bench.harness import Recorder
from dalle_ds.data.loaders import ImageShardLoader, TokenShardLoader

WORDS = "a red blue green small large circle square triangle star photo of the on with and drawing".split()


def _image(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A smooth image with some edges (JPEG size/decode cost closer to photos than pure noise)."""
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img).copy()
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    arr[y: y + h // 3, x: x + w // 3] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))


def write_image_shards(folder: Path, short_side: int, shards: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for i in range(per_shard):
                long_side = int(short_side * rng.uniform(1.0, 1.5))
                h, w_ = (short_side, long_side) if i % 2 else (long_side, short_side)
                w.write({"__key__": f"{s:04d}{i:05d}", "jpg": _image(rng, h, w_),
                         "txt": _caption(rng).encode(), "json": b"{}"})


def write_token_shards(folder: Path, grid: int, shards: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"tokens-{s:06d}.tar")) as w:
            for i in range(per_shard):
                codes = rng.integers(0, 8192, grid * grid).astype("<u2")
                w.write({"__key__": f"{s:04d}{i:05d}", "codes": codes.tobytes(),
                         "txt": _caption(rng).encode(), "json": b"{}"})


def make_tokenizer(text_len: int):
    """A real TextTokenizer (vocab 1024), trained on the captions as train_text_tokenizer.py does."""
    from data_prep.train_text_tokenizer import build
    from dalle_ds.data.tokenizer import TextTokenizer

    tok, trainer = build(vocab_size=1024)
    rng = np.random.default_rng(1)
    tok.train_from_iterator([_caption(rng) for _ in range(2000)], trainer)
    return TextTokenizer(tok, text_len, name="bench-bpe-1024")


def measure(make_loader, warmup: int, batches: int, repeats: int) -> dict[str, float]:
    """Wall-clock samples/s (median and best of ``repeats`` fresh loaders) and the main process's
    CPU ms per sample (all of the work when num_workers=0; robust to other users of the cores)."""
    rates, cpu_ms = [], []
    for _ in range(repeats):
        it = iter(make_loader())
        for _ in range(warmup):
            next(it)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        for _ in range(batches):
            n += len(next(it)["keys"])
        rates.append(n / (time.perf_counter() - t0))
        cpu_ms.append(1e3 * (time.process_time() - c0) / n)
        it.close()
    return {"median": statistics.median(rates), "best": max(rates), "main_cpu_ms": statistics.median(cpu_ms)}


def record(rec: Recorder, metric: str, m: dict[str, float], **details) -> None:
    rec.add(metric, m["median"], "samples/s", best=round(m["best"], 1),
            main_cpu_ms_per_sample=round(m["main_cpu_ms"], 3), loadavg_1m=round(os.getloadavg()[0], 1), **details)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=16, help="timed batches per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="fresh loaders per configuration (median, best)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="0,1,2")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp, Recorder("loader") as rec:
        tmp = Path(tmp)
        write_image_shards(tmp / "img384", 384, shards=4, per_shard=100)
        write_image_shards(tmp / "img96", 96, shards=4, per_shard=200)
        write_token_shards(tmp / "tok", 32, shards=4, per_shard=500)
        tokenizer = make_tokenizer(text_len=256)
        common = dict(warmup=3, batches=args.batches, repeats=args.repeats)
        for nw in workers:
            for size, src, mode in ((64, "img96", "dvae"), (256, "img384", "dvae"), (256, "img384", "prior")):
                make = functools.partial(ImageShardLoader, str(tmp / src), args.batch_size, mode=mode, size=size,
                                         num_workers=nw, shuffle_buffer=100, seed=0)
                record(rec, f"image_{mode}_{size}px_samples_per_s", measure(make, **common), workers=nw,
                       batch_size=args.batch_size, source_short_side=int(src[3:]))
            make = functools.partial(TokenShardLoader, str(tmp / "tok"), args.batch_size, tokenizer=tokenizer, grid=32,
                                     codebook_size=8192, bpe_dropout=0.1, num_workers=nw, shuffle_buffer=100)
            record(rec, "token_samples_per_s", measure(make, **{**common, "batches": 4 * args.batches}), workers=nw,
                   batch_size=args.batch_size, grid=32, text_len=256, bpe_dropout=0.1)
        print(json.dumps({"shards_in": str(tmp)}))


if __name__ == "__main__":
    main()
