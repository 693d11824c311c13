"""Confidence intervals for the caption-match rates of a held-out evaluation.

    wilson(90, 128)                         # (0.619, 0.775): 95% interval of a binomial rate
    cluster_bootstrap([[True, False, ...], ...])   # 95% interval of a mean over clustered trials

``wilson``: the Wilson score interval (Wilson 1927) of k successes in n independent trials; unlike
the normal approximation it stays inside [0, 1] and is sensible at k = 0 or k = n. Use it where each
trial is one caption (reranked top-1, the first candidate, any-of-N).

``cluster_bootstrap``: the per-candidate rate averages N candidates per caption, and candidates of
one caption are not independent (an easy caption is easy for all of them), so a Wilson interval over
all M x N candidates would be too narrow. The bootstrap resamples whole captions (clusters) with
replacement and takes the percentile interval of the resampled means.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% standard normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials; (0.0, 1.0) when n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cluster_bootstrap(rows: Sequence[Sequence[bool | float]], iters: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over all entries of ``rows`` (one row per cluster), resampling
    whole rows with replacement ``iters`` times (seeded: the same rows give the same interval)."""
    if not len(rows):
        return 0.0, 1.0
    sums = np.array([float(np.sum(r)) for r in rows])
    counts = np.array([len(r) for r in rows], dtype=np.float64)
    if (counts == 0).any():
        raise ValueError("cluster_bootstrap: every cluster needs at least one entry")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(rows), size=(iters, len(rows)))  # (iters, M)
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def rate(k: int, n: int) -> dict:
    """``{"k", "n", "rate", "ci95"}`` with the Wilson interval."""
    lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "rate": k / n if n else float("nan"), "ci95": [round(lo, 4), round(hi, 4)]}


def fmt(r: dict) -> str:
    """``0.703 [0.619, 0.775]`` of a ``rate`` dict (or any dict with rate and ci95)."""
    lo, hi = r["ci95"]
    return f"{r['rate']:.3f} [{lo:.3f}, {hi:.3f}]"
