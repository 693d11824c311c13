"""Image-generation metrics: FID and IS (torchmetrics, pluggable feature extractor), the paper's
Gaussian blur, and the extractors.

    ex = load_extractor(inception_weights="pt_inception.pt")   # or load_extractor(clip=scorer, labels=captions)
    fid(ex, real, fake)                 # Frechet distance between the extractor's features of two image sets
    inception_score(ex, fake)           # (mean, std) over splits, from the extractor's class probabilities
    gaussian_blur(images, radius=2)     # as in the paper: FID/IS after blurring both sets, radius 1..8

Images are float (B, 3, H, W) in [0, 1] everywhere.

Extractors (nothing is downloaded; ``name`` says which one produced a number):

- ``InceptionExtractor(file)``: a TorchScript Inception-v3 with the FID network's interface, e.g.
  NVlabs' / clean-fid's ``inception-2015-12-05.pt``: ``model(x, return_features=True)`` -> (B, 2048)
  pool features; ``model(x, no_output_bias=True)`` -> (B, 1008) class probabilities; ``x`` float
  (B, 3, H, W) in [0, 255] (the network resizes to 299 itself).
- ``ClipExtractor(scorer, labels)``: the CLIP image encoder (a Hugging Face CLIP folder or the
  project's own, dalle_ds/sampling/rerank.py). Features are the projected image embeddings; for IS the
  class probabilities are CLIP's zero-shot softmax over ``labels`` (by default the distinct
  reference captions). Numbers from different extractors are not comparable.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------- blur
def gaussian_blur(images: Tensor, radius: float) -> Tensor:
    """Separable Gaussian blur with standard deviation ``radius`` pixels (PIL's GaussianBlur convention),
    kernel half-width ceil(3 radius), edge pixels replicated. ``radius=0`` returns the input."""
    if radius < 0:
        raise ValueError(f"blur radius={radius}: must be >= 0")
    if radius == 0:
        return images
    half = max(1, math.ceil(3 * radius))
    x = torch.arange(-half, half + 1, dtype=torch.float32, device=images.device)
    k = torch.exp(-0.5 * (x / radius) ** 2)
    k = k / k.sum()
    b, c, h, w = images.shape
    y = images.float().reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))  # along W
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="replicate"), k.view(1, 1, -1, 1))  # along H
    return y.reshape(b, c, h, w).clamp(0, 1)


# ---------------------------------------------------------------- extractors
class InceptionExtractor(nn.Module):
    """A TorchScript FID Inception network from a local file (see the module docstring)."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        super().__init__()
        try:
            self.net = torch.jit.load(path, map_location=device).eval()
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise ValueError(f"{path}: not a TorchScript Inception network ({type(e).__name__}: {e})") from None
        self.name = f"inception:{path}"
        self.device = torch.device(device)  # images go where the network is
        self.num_features = int(self.features(torch.zeros(1, 3, 64, 64, device=device)).shape[-1])

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.net(images.to(self.device).float() * 255.0, return_features=True).float()  # (B, F)

    @torch.no_grad()
    def log_probs(self, images: Tensor) -> Tensor:
        p = self.net(images.to(self.device).float() * 255.0, no_output_bias=True).float()  # (B, C) probabilities
        return p.clamp_min(1e-30).log()


class ClipExtractor(nn.Module):
    """The CLIP image encoder; IS classes are zero-shot over ``labels``."""

    def __init__(self, scorer, labels: list[str] | None = None):
        super().__init__()
        self.scorer = scorer
        self.name = f"{scorer.name} (CLIP image encoder)"
        self.labels = sorted(set(labels)) if labels else None
        self._label_emb = None
        self.num_features = int(self.features(torch.zeros(1, 3, 32, 32)).shape[-1])

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.scorer.image_embeds(images, normalize=False)  # (B, E)

    @torch.no_grad()
    def log_probs(self, images: Tensor) -> Tensor:
        if not self.labels:
            raise ValueError("ClipExtractor: inception_score needs labels (e.g. the reference captions)")
        if self._label_emb is None:
            self._label_emb = self.scorer.text_embeds(self.labels)  # (C, E)
        scale = float(self.scorer.model.logit_scale.exp())
        logits = scale * self.scorer.image_embeds(images) @ self._label_emb.T  # (B, C)
        return logits.log_softmax(-1)


class _Call(nn.Module):
    """Adapts an extractor method to the nn.Module torchmetrics calls (with ``num_features``)."""

    def __init__(self, fn, num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x).to(x.device)  # torchmetrics keeps its state where the images are


def load_extractor(inception_weights: str | None = None, clip=None, labels: list[str] | None = None,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Inception from a local TorchScript file when given, else the CLIP image encoder."""
    if inception_weights:
        return InceptionExtractor(inception_weights, device)
    if clip is None:
        raise ValueError("no feature extractor: pass --inception-weights FILE or --clip DIR")
    return ClipExtractor(clip, labels)


# ---------------------------------------------------------------- metrics
def _batches(images: Tensor, batch: int) -> Iterable[Tensor]:
    for i in range(0, images.shape[0], batch):
        yield images[i:i + batch]


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """torchmetrics' FID on given feature vectors (N, F) and (M, F), computed in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs >= 2 samples per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    m = FrechetInceptionDistance(feature=_Call(lambda x: x, real.shape[1]), normalize=True)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def fid(extractor: nn.Module, real: Tensor, fake: Tensor, batch: int = 64) -> float:
    """FID between two image sets with the extractor's features (torchmetrics FrechetInceptionDistance)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs >= 2 images per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    m = FrechetInceptionDistance(feature=_Call(extractor.features, extractor.num_features), normalize=True)
    for x in _batches(real, batch):
        m.update(x, real=True)
    for x in _batches(fake, batch):
        m.update(x, real=False)
    return float(m.compute())


def inception_score(extractor: nn.Module, images: Tensor, splits: int = 10, batch: int = 64,
                    seed: int = 0) -> tuple[float, float]:
    """(mean, std) Inception Score over ``splits`` (at most one split per 2 images), torchmetrics InceptionScore."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    splits = max(1, min(splits, images.shape[0] // 2))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        m = InceptionScore(feature=_Call(extractor.log_probs, 0), splits=splits)
    for x in _batches(images, batch):
        m.update(x)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # compute() permutes the images before splitting
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
            mean, std = m.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)
