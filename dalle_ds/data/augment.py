"""The paper's image preprocessing (Ramesh et al. 2021, Listings 1 and 2) with Pillow only.

    aug = Augment("dvae", size=256)            # Listing 1: training the dVAE
    x = aug(pil_image, random.Random(seed))    # uint8 tensor (3, 256, 256)

Modes:
- ``"dvae"``  (Listing 1): random square crop of side min(h, w); resize to t x t with t uniform in
  [9/8, 12/8]·size (capped at the crop side); random size x size crop; random horizontal flip.
- ``"prior"`` (Listing 2): near-centre square crop (offset uniform in [3/8, 5/8] of the slack);
  resize to t uniform in [1, 9/8]·size; random crop; never flips (images can contain text). Unlike
  the listing, t is not capped at the crop side: shards hold images at the training size, where the
  cap would make every augmented view the centre crop.
- ``"eval"``: the deterministic variant of "prior" used offline for tokenization and evaluation:
  exact centre square crop, resize to size.

Downscaling uses Pillow's BOX filter (area averaging, as the listings' ``AREA`` resize);
upscaling (only when the image is smaller than the target) uses BICUBIC. Random choices come
from the ``random.Random`` passed in, so a caller that seeds it per sample gets the same crop
after a resume, in any worker.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
from PIL import Image

Mode = Literal["dvae", "prior", "eval"]
MODES = ("dvae", "prior", "eval")


def _resize_square(img: Image.Image, t: int) -> Image.Image:
    if img.width == t:
        return img
    resample = Image.Resampling.BOX if t < img.width else Image.Resampling.BICUBIC
    return img.resize((t, t), resample)


def _random_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    x = rng.randint(0, img.width - size)
    y = rng.randint(0, img.height - size)
    return img.crop((x, y, x + size, y + size))


class Augment:
    """Callable: PIL image (any size, any mode) -> uint8 tensor (3, size, size)."""

    def __init__(self, mode: Mode, size: int):
        if mode not in MODES:
            raise ValueError(f"augmentation mode {mode!r}: must be one of {list(MODES)}")
        if size < 1:
            raise ValueError(f"augmentation size={size}: must be >= 1")
        self.mode, self.size = mode, size

    def __repr__(self) -> str:
        return f"Augment(mode={self.mode!r}, size={self.size})"

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        rng = rng or random.Random(0)
        img = self.square_crop(img, rng)
        img = _resize_square(img, self.resize_target(img.width, rng))
        if img.width > self.size:
            img = _random_crop(img, self.size, rng)
        if self.mode == "dvae" and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W)

    def square_crop(self, img: Image.Image, rng: random.Random) -> Image.Image:
        w, h = img.size
        s = min(w, h)
        if self.mode == "dvae":  # uniform over all positions
            x, y = rng.randint(0, w - s), rng.randint(0, h - s)
        elif self.mode == "prior":  # offset in [3/8, 5/8] of the slack (Listing 2)
            x, y = _near_centre(w - s, rng), _near_centre(h - s, rng)
        else:
            x, y = (w - s) // 2, (h - s) // 2
        return img.crop((x, y, x + s, y + s)) if (w, h) != (s, s) else img

    def resize_target(self, side: int, rng: random.Random) -> int:
        """Side t of the square resize; never below the output size (upscale small images)."""
        size = self.size
        if self.mode == "eval":
            return size
        if self.mode == "prior":
            # Not capped by the crop side: shards store images at the training size (no slack), and
            # capping would make every view the centre crop; a zoom of at most 9/8 upsamples mildly.
            return rng.randint(size, round(9 / 8 * size))
        lo = max(size, min(side, round(9 / 8 * size)))
        hi = max(lo, min(side, round(12 / 8 * size)))
        return rng.randint(lo, hi)


def _near_centre(slack: int, rng: random.Random) -> int:
    lo = 3 * slack // 8
    hi = max(lo + 1, 5 * slack // 8)  # exclusive upper bound, as tf.random.uniform's maxval
    return rng.randrange(lo, hi)
