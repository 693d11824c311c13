"""The App. C filters beyond single-file checks: caption language, repeated captions, near-duplicates.

- :func:`caption_language`: py3langid's naive Bayes identifier (its model ships inside the wheel:
  nothing is downloaded), loaded once per process on first use.
- :func:`perceptual_hash`: the classic 64-bit pHash (grey 32x32, 2-D DCT-II, the 8x8 lowest
  frequencies against their median). Written here in numpy rather than taken from ``imagehash``,
  whose wheel pulls in scipy and PyWavelets (~40 MB) for these few lines.
- :func:`caption_key`: what "the same caption" means for the repeat filter (the normalised caption,
  case-folded), as a 16-byte digest so the disk-backed counter stores fixed-size keys.
- :func:`near_bands`: the pigeonhole split that lets an sqlite index find every earlier hash within
  Hamming distance D: two 64-bit hashes at distance <= D agree exactly on at least one of D + 1
  disjoint bands.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from PIL import Image

PHASH_SIDE, PHASH_LOW = 32, 8
MAX_PHASH_DISTANCE = 16  # beyond this the bands get so short that every lookup is a scan


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # imported on first use: 0.2 s, 25 MB

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_codes() -> list[str]:
    return list(_identifier().labels)


def caption_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the caption's most likely language."""
    lang, prob = _identifier().classify(text)
    return lang, float(prob)


def caption_key(text: str) -> bytes:
    return hashlib.blake2b(text.casefold().encode("utf-8"), digest_size=16).digest()


@functools.lru_cache(maxsize=2)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``_dct_matrix(n) @ x`` is the DCT of the column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit pHash of an (H, W, 3) uint8 image as an unsigned int (bit 63 = lowest frequency)."""
    grey = Image.fromarray(rgb, "RGB").convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS)
    d = _dct_matrix(PHASH_SIDE)
    coeffs = d @ np.asarray(grey, dtype=np.float64) @ d.T
    # rounded so that float noise (a flat image's zero coefficients, BLAS differences between
    # machines) cannot flip a bit: parts on different machines must agree with a single run
    low = np.round(coeffs[:PHASH_LOW, :PHASH_LOW].ravel(), 6)
    bits = low > np.median(low)
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_bands(phash: int, distance: int) -> list[tuple[int, int]]:
    """(band number, band value) for the ``distance + 1`` contiguous bands of a 64-bit hash."""
    n = distance + 1
    edges = [64 * k // n for k in range(n + 1)]
    return [(k, (phash >> (64 - edges[k + 1])) & ((1 << (edges[k + 1] - edges[k])) - 1)) for k in range(n)]
