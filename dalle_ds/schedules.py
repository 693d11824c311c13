"""Cosine schedules as pure functions of the update step (paper App. A.2: beta, tau, lr).

``cosine(step, start, end, steps)`` moves from ``start`` at step 0 to ``end`` at ``steps`` along
half a cosine and stays at ``end`` afterwards. Nothing is stored, so resuming at step s gives
exactly the values an uninterrupted run had at step s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dalle_ds.config import DVAETrainConfig


def cosine(step: int, start: float, end: float, steps: int) -> float:
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    t = min(step, steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class DVAESchedule:
    """beta 0 -> kl_weight_max, tau tau_start -> tau_end, lr lr_start -> lr_end (all cosine)."""

    cfg: DVAETrainConfig

    def beta(self, step: int) -> float:
        return cosine(step, 0.0, self.cfg.kl_weight_max, self.cfg.kl_weight_steps)

    def tau(self, step: int) -> float:
        return cosine(step, self.cfg.tau_start, self.cfg.tau_end, self.cfg.tau_steps)

    def lr(self, step: int) -> float:
        return cosine(step, self.cfg.lr_start, self.cfg.lr_end, self.cfg.lr_steps)

    def __call__(self, step: int) -> dict[str, float]:
        return {"beta": self.beta(step), "tau": self.tau(step), "lr": self.lr(step)}
