"""Images as tensors <-> PIL: grids of samples with white gutters, loading a prompt image."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def grid_image(images: torch.Tensor, cols: int | None = None, pad: int = 2) -> Image.Image:
    """(B, 3, H, W) in [0, 1] -> one image, ``cols`` per row (default ~square), white gutters."""
    b, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return to_pil(grid)


def save_grid(images: torch.Tensor, path: str | Path, cols: int | None = None) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, cols).save(path)
    return Path(path)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [0, 1] (centre crop, bicubic resize)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float().div(255).unsqueeze(0)
