"""Offline tokenization throughput: dVAE encode images/s (tiny preset and paper-size encoder) and the
whole data_prep/tokenize_images.py pipeline (JPEG decode, centre crop, encode, tar writing) on the tiny one.

    python -m bench.tokenize_images [--paper_batch 1] [--paper_repeat 2] [--device cpu|cuda]

Encode rate: median of ``repeat`` timed calls of the tool's own ``BatchEncoder`` (uint8 -> float,
encoder logits, argmax, uint16 codes) on random images, weights randomly initialised (speed does
not depend on the values). Pipeline rate: samples / wall time of ``tokenize_images.main`` over
generated JPEG shards (start-up and dVAE loading included). The machine is shared: figures are
noisy; the load average at the start is recorded with them.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import Recorder, timeit
from dalle_ds.config import DVAEConfig, load_config
from dalle_ds.models.dvae import DiscreteVAE, save_dvae
from data_prep import tokenize_images as tok


def encode_rate(cfg: DVAEConfig, size: int, batch: int, repeat: int, device: torch.device,
                precision: str = "fp32") -> float:
    torch.manual_seed(0)
    vae = DiscreteVAE(cfg).to(device).eval()
    encoder = tok.BatchEncoder(vae, device, precision)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return batch / timeit(lambda: encoder(images), warmup=1, repeat=repeat, sync=sync)


def write_jpeg_shards(folder: Path, shards: int, per_shard: int, side: int) -> None:
    """Smooth random images (gradients + noise, like photos compress) stored as JPEG at ``side`` px."""
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for i in range(per_shard):
                base = np.stack([np.sin(6 * xx * rng.random() + yy * 4 * rng.random() + c) for c in range(3)], -1)
                arr = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                w.write({"__key__": f"{s:03d}{i:05d}", "jpg": buf.getvalue(), "txt": b"a generated picture",
                         "json": b"{}"})


def pipeline_rate(cfg: DVAEConfig, size: int, shards: int, per_shard: int, batch: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpeg_shards(root / "shards", shards, per_shard, side=int(size * 1.5))
        torch.manual_seed(0)
        save_dvae(DiscreteVAE(cfg), str(root / "export"), extra={"image_size": size})
        t0 = time.perf_counter()
        result = tok.main(["--dvae", str(root / "export"), "--input", str(root / "shards"), "--output",
                           str(root / "tokens"), "--batch-size", str(batch), "--no-progress"])
        return result["images"] / (time.perf_counter() - t0), result["images"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny_batch", type=int, default=64)
    ap.add_argument("--paper_batch", type=int, default=1)
    ap.add_argument("--paper_repeat", type=int, default=2)
    ap.add_argument("--pipeline_shards", type=int, default=4)
    ap.add_argument("--pipeline_per_shard", type=int, default=256)
    args = ap.parse_args()
    device = torch.device(args.device)
    tiny = load_config("tiny")
    tiny_cfg, tiny_size = tiny.dvae, tiny.data.image_size
    paper_cfg = load_config("paper").dvae
    load = os.getloadavg()[0]
    with Recorder("tokenize_images") as rec:
        common = {"device": str(device), "threads": torch.get_num_threads(), "load_avg_1m": round(load, 1)}
        rate = encode_rate(tiny_cfg, tiny_size, args.tiny_batch, 5, device)
        rec.add("encode_tiny_images_per_s", rate, "img/s", image_size=tiny_size, batch=args.tiny_batch,
                grid=tiny_size // tiny_cfg.downsample, codebook=tiny_cfg.codebook_size, **common)
        rate = encode_rate(paper_cfg, 256, args.paper_batch, args.paper_repeat, device)
        rec.add("encode_paper_images_per_s", rate, "img/s", image_size=256, batch=args.paper_batch,
                grid=256 // paper_cfg.downsample, codebook=paper_cfg.codebook_size, n_hid=paper_cfg.n_hid, **common)
        if device.type == "cuda":
            for precision in ("bf16", "fp16"):
                rate = encode_rate(paper_cfg, 256, 64, 5, device, precision)
                rec.add(f"encode_paper_images_per_s_{precision}", rate, "img/s", image_size=256, batch=64, **common)
        rate, n = pipeline_rate(tiny_cfg, tiny_size, args.pipeline_shards, args.pipeline_per_shard, args.tiny_batch)
        rec.add("pipeline_tiny_images_per_s", rate, "img/s", image_size=tiny_size, images=n,
                source_side=int(tiny_size * 1.5), note="whole tokenize_images.main incl. start-up", **common)


if __name__ == "__main__":
    main()
