"""Evaluate a dVAE export on held-out image shards: PSNR, SSIM, MSE, codebook usage, a grid PNG.

    python -m dalle_ds.eval_dvae --checkpoint runs/tiny/export --shards 'data/heldout/shard-{000000..000000}.tar'

Reconstructions go through the tokens the prior will see: argmax codes (no Gumbel noise), then
the decoder's mu, unmapped to [0, 1]. Images are centre-cropped ("eval" augmentation) to the
size the export was trained at (``--image_size``, default: the export's ``data.image_size``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle_ds.dvae import DiscreteVAE, load_dvae  # noqa: E402


def reconstruction_grid(images: torch.Tensor, recon: torch.Tensor, n: int = 8) -> torch.Tensor:
    """(B, C, H, W) pairs -> one (C, 2H, n*W) image: inputs on top, reconstructions below."""
    images, recon = images[:n].float().cpu(), recon[:n].float().cpu()
    rows = [torch.cat(list(x), dim=-1) for x in (images, recon)]  # each (C, H, n*W)
    return torch.cat(rows, dim=-2).clamp(0, 1)  # (C, 2H, n*W)


def save_png(grid: torch.Tensor, path: str) -> None:
    from PIL import Image

    arr = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # (H, W, C)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)


@torch.no_grad()
def evaluate(vae: DiscreteVAE, batches, max_images: int | None = None, grid_path: str | None = None) -> dict:
    """Metrics over ``batches`` of {"images": (B, C, H, W) in [0, 1]}; the first batch makes the grid."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    was_training = vae.training
    vae.eval()
    # this rank's images only: torchmetrics would otherwise all-gather across ranks when torch.distributed
    # is initialised, and the trainer evaluates on rank 0 alone (a deadlock)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False)
    counts = torch.zeros(vae.cfg.codebook_size, dtype=torch.long)
    sq_err, n_values, n_images, grid = 0.0, 0, 0, None
    for batch in batches:
        images = batch["images"]
        if max_images is not None:
            images = images[: max_images - n_images]
        if len(images) == 0:
            break
        codes = vae.encode(images)  # (B, h, w)
        recon = vae.decode(codes)  # (B, C, H, W)
        counts += torch.bincount(codes.reshape(-1), minlength=vae.cfg.codebook_size)
        sq_err += float(((recon - images.float()) ** 2).sum())
        n_values += images.numel()
        ssim.update(recon, images.float())
        if grid is None:
            grid = reconstruction_grid(images, recon)
        n_images += len(images)
        if max_images is not None and n_images >= max_images:
            break
    vae.train(was_training)
    if n_images == 0:
        raise ValueError("evaluate: the shards gave no images")
    mse = sq_err / n_values
    p = counts.double() / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    if grid_path:
        save_png(grid, grid_path)
    return {"images": n_images, "mse": mse, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "ssim": float(ssim.compute()), "perplexity": math.exp(entropy),
            "codes_used": int((counts > 0).sum()), "codes_used_fraction": float((counts > 0).sum()) / len(counts),
            "grid": grid}


def main(argv: list[str] | None = None) -> dict:
    from dalle_ds.data import ImageShardLoader

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="dVAE export folder (model.safetensors + config.json)")
    ap.add_argument("--shards", required=True, help="held-out image shards (paths, braces, globs, s3://)")
    ap.add_argument("--image_size", type=int, default=None, help="default: the export's data.image_size")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_images", type=int, default=None)
    ap.add_argument("--grid", default=None, help="PNG path (default: CHECKPOINT/eval_grid.png)")
    ap.add_argument("--json", default=None, help="also write the metrics here")
    args = ap.parse_args(argv)

    vae = load_dvae(args.checkpoint)
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        meta = json.load(f)
    size = args.image_size or meta.get("image_size")
    if size is None:
        raise SystemExit(f"{args.checkpoint}/config.json has no image_size: pass --image_size")
    loader = ImageShardLoader(args.shards, args.batch_size, mode="eval", size=size, rank=0, world_size=1,
                              shuffle=False, infinite=False)
    grid_path = args.grid or os.path.join(args.checkpoint, "eval_grid.png")
    metrics = evaluate(vae, loader, args.max_images, grid_path)
    metrics.pop("grid")
    print(f"images {metrics['images']}  PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}  "
          f"MSE {metrics['mse']:.6f}  codes used {metrics['codes_used']}/{vae.cfg.codebook_size} "
          f"({100 * metrics['codes_used_fraction']:.1f}%)  perplexity {metrics['perplexity']:.1f}")
    print(f"grid: {grid_path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main()
