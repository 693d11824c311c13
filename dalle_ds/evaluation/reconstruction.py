"""dVAE reconstruction quality: PSNR, SSIM, MSE, codebook usage and perplexity, a grid PNG.

Reconstructions go through the tokens the prior will see: argmax codes (no Gumbel noise), then
the decoder's mu, unmapped to [0, 1].
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.models.dvae_loss import histogram_usage, psnr


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
def evaluate_reconstruction(vae: DiscreteVAE, batches, max_images: int | None = None, grid_path: str | None = None) -> dict:
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
    perplexity, used_fraction = histogram_usage(counts)
    if grid_path:
        save_png(grid, grid_path)
    return {"images": n_images, "mse": mse, "psnr": psnr(mse), "ssim": float(ssim.compute()), "perplexity": perplexity,
            "codes_used": int((counts > 0).sum()), "codes_used_fraction": used_fraction, "grid": grid}
