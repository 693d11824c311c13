"""The dVAE's relaxed ELBO (paper §2.1, App. A.3) and its reconstruction diagnostics.

Pixels x in [0, 1] are mapped to y = (1 - 2 eps) x + eps (eps = 0.1) so logit(y) is finite.
The logit-Laplace density of y with location mu and scale b is
    p(y) = 1 / (2 b y (1 - y)) * exp(-|logit(y) - mu| / b),
so the per-subpixel negative log-likelihood is ln 2 + ln b + ln y + ln(1 - y) + |logit(y) - mu| / b.
KL(q(z|x) || uniform) at one grid position is sum_k q_k ln q_k + ln K. The loss is
    (sum of NLL over subpixels + beta * sum of KL over positions) / (C * H * W), mean over the batch.

Two options the paper does not use, for small models on synthetic data (the tiny preset; see
``DVAETrainConfig``):
- ``recon="mse"``: a Gaussian likelihood of fixed scale on the mapped pixels, ``mse_weight *
  (sigmoid(mu) - y)^2`` (= the NLL with sigma^2 = 1 / (2 mse_weight), up to a constant). On images
  made of perfectly flat colours the logit-Laplace density is unbounded (ln b -> -inf where a pixel is
  predicted exactly), so its optimum spends the model on flat regions and leaves edges blurred.
- ``marginal_kl_weight``: extra weight on KL(q_bar || uniform), q_bar the encoder's code distribution
  averaged over the batch and grid. The positional KL splits as E_x KL(q(z|x) || U) = I(x; z) +
  KL(q_bar || U); this weights only the second part, which counters codebook collapse without
  penalising the information the codes carry. Normalised like the positional KL (per pixel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return (1 - 2 * eps) * x + eps


def unmap_pixels(y: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return ((y - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(y: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """Elementwise -ln p(y | mu, b) for y in (0, 1); all (B, C, H, W)."""
    logit_y = torch.log(y) - torch.log1p(-y)
    return (math.log(2.0) + ln_b + torch.log(y) + torch.log1p(-y)
            + (logit_y - mu).abs() * torch.exp(-ln_b))


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like ``like``: -log(-log u), u ~ U(0, 1) from ``generator``.

    Two vectorised logs of ``torch.rand`` instead of ``-log(Exponential(1))``: on CPU,
    ``exponential_`` with a generator took 50 ms per tiny-preset batch against 13 ms (README, Stage 1).
    u is clamped away from 0 (log 0); a u of 1 - 2^-24 gives g = -log(6e-8) = 16.6, finite."""
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()


def gumbel_softmax(logits: torch.Tensor, tau: float, dim: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax((logits + g) / tau), g ~ Gumbel(0, 1) drawn from ``generator`` (so a run can make the
    noise a function of (seed, step, rank) and resume exactly)."""
    if tau <= 0:
        raise ValueError(f"tau={tau}: must be > 0")
    return F.softmax((logits + gumbel_noise(logits, generator)) / tau, dim=dim)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || uniform) over dim 1, one value per position: (B, K, h, w) -> (B, h, w)."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return (log_q.exp() * log_q).sum(dim=1) + math.log(logits.shape[1])


def marginal_kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q_bar || uniform), q_bar = softmax(logits) averaged over batch and grid: (B, K, h, w) -> ()."""
    q_bar = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))  # (K,)
    return (q_bar * q_bar.clamp_min(1e-30).log()).sum() + math.log(logits.shape[1])


ReconLoss = Literal["logit_laplace", "mse"]


@dataclass(frozen=True)
class DVAELossSpec:
    """Which reconstruction term and extra weights the relaxed ELBO uses (defaults: the paper's)."""

    recon: ReconLoss = "logit_laplace"
    mse_weight: float = 100.0
    marginal_kl_weight: float = 0.0


PAPER_LOSS = DVAELossSpec()


def dvae_loss(y: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor, logits: torch.Tensor,
              beta: float, spec: DVAELossSpec = PAPER_LOSS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pixel relaxed ELBO. y, mu, ln_b: (B, C, H, W); logits: (B, K, h, w).

    Terms: ``nll`` (the reconstruction term), ``kl`` (positional KL per pixel) and ``marginal_kl``
    (KL(q_bar || U) per pixel; in the loss only when ``spec.marginal_kl_weight`` > 0)."""
    batch, pixels = y.shape[0], y[0].numel()  # C * H * W
    if spec.recon == "logit_laplace":
        nll = logit_laplace_nll(y, mu, ln_b).sum() / (batch * pixels)
    elif spec.recon == "mse":
        nll = spec.mse_weight * F.mse_loss(torch.sigmoid(mu), y)
    else:
        raise ValueError(f"recon={spec.recon!r}: expected 'logit_laplace' or 'mse'")
    kl = kl_to_uniform(logits).sum() / (batch * pixels)
    positions = logits.shape[-2] * logits.shape[-1]
    loss = nll + beta * kl
    # logged either way; in the autograd graph only when it is part of the loss
    with torch.set_grad_enabled(torch.is_grad_enabled() and spec.marginal_kl_weight > 0):
        marginal_kl = marginal_kl_to_uniform(logits) * positions / pixels
    if spec.marginal_kl_weight:
        loss = loss + spec.marginal_kl_weight * marginal_kl
    return loss, {"nll": nll.detach(), "kl": kl.detach(), "marginal_kl": marginal_kl.detach()}


def psnr(mse: float) -> float:
    """PSNR in dB (peak 1) of a mean squared error over pixels in [0, 1]; the project's one PSNR
    (training logs, dVAE evaluation, token verification). MSE 0 counts as 1e-12 (120 dB)."""
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def mse_psnr(images: torch.Tensor, recon: torch.Tensor) -> tuple[float, float]:
    """Mean squared error and PSNR (dB, peak 1) of images in [0, 1]."""
    mse = float(F.mse_loss(recon.float(), images.float()))
    return mse, psnr(mse)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(perplexity of the code histogram, fraction of the codebook used) over any code tensor."""
    return histogram_usage(torch.bincount(codes.reshape(-1).long(), minlength=codebook_size))


def histogram_usage(counts: torch.Tensor) -> tuple[float, float]:
    """(perplexity, fraction of entries used) of a code histogram: counts (K,) per codebook entry,
    e.g. summed over batches or ranks."""
    counts = counts.double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).sum()) / len(counts)
