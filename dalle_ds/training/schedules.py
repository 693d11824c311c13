"""Schedules as small objects of the update step: the dVAE's cosines (paper App. A.2) and the
prior's warm-up + plateau-halving learning rate (paper App. B.2).

dVAE: ``cosine(step, start, end, steps)`` moves from ``start`` at step 0 to ``end`` at ``steps`` along
half a cosine and stays at ``end`` afterwards. Nothing is stored, so resuming at step s gives
exactly the values an uninterrupted run had at step s.

Prior:

    sched = WarmupPlateauLR.from_optim(cfg.optim)
    engine.set_lr(sched.lr); engine.set_grad_clip(sched.grad_clip)   # before each update
    sched.step(loss)                                                 # after an applied update

Plateau: the loss is smoothed with an exponential moving average (``ema`` per update, bias
corrected); after warm-up, an update that does not bring the smoothed loss below
``best * (1 - threshold)`` counts as "bad"; ``patience`` bad updates in a row halve the learning
rate (at most ``max_halvings`` times) and restart the count. Updates skipped for overflow are
not counted (call ``step`` only for applied updates).

Gradient clipping (paper: norm 4, warm-up only): ``grad_clip`` is ``cfg.optim.grad_clip`` while
``updates < warmup_steps`` and 0 afterwards. With ZeRO, DeepSpeed clips inside its optimiser
(``unscale_and_clip_grads`` uses ``optimizer.clip_grad``), so the engine sets that attribute
before each update (``Engine.set_grad_clip``); the JSON must not set ``gradient_clipping``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dalle_ds.config import DVAETrainConfig, OptimConfig


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

class WarmupPlateauLR:
    def __init__(self, lr: float, warmup_steps: int, patience: int, threshold: float = 1e-3,
                 max_halvings: int = 5, ema: float = 0.98, grad_clip: float = 0.0):
        if lr <= 0 or warmup_steps < 0 or patience < 1 or max_halvings < 0 or not 0 <= ema < 1:
            raise ValueError(f"WarmupPlateauLR(lr={lr}, warmup_steps={warmup_steps}, patience={patience}, "
                             f"max_halvings={max_halvings}, ema={ema}): need lr > 0, warmup_steps >= 0, "
                             f"patience >= 1, max_halvings >= 0, 0 <= ema < 1")
        self.base_lr, self.warmup_steps, self.patience = lr, warmup_steps, patience
        self.threshold, self.max_halvings, self.ema, self.clip = threshold, max_halvings, ema, grad_clip
        self.updates = 0  # applied updates so far
        self.halvings = 0
        self.bad_updates = 0
        self.best = float("inf")
        self._avg = 0.0  # EMA accumulator (bias-corrected by _weight)
        self._weight = 0.0

    @classmethod
    def from_optim(cls, cfg: OptimConfig) -> "WarmupPlateauLR":
        return cls(cfg.lr, cfg.warmup_steps, cfg.plateau_patience, cfg.plateau_threshold, cfg.max_halvings,
                   cfg.plateau_ema, cfg.grad_clip)

    @property
    def in_warmup(self) -> bool:
        return self.updates < self.warmup_steps

    @property
    def lr(self) -> float:
        """The learning rate for the next update."""
        if self.in_warmup:
            return self.base_lr * (self.updates + 1) / self.warmup_steps
        return self.base_lr * 0.5 ** self.halvings

    @property
    def grad_clip(self) -> float:
        """The gradient-norm clip for the next update (0 = off)."""
        return self.clip if self.in_warmup else 0.0

    @property
    def smoothed_loss(self) -> float | None:
        return self._avg / self._weight if self._weight else None

    def step(self, loss: float) -> float:
        """Record one applied update and its training loss; returns the next learning rate."""
        loss = float(loss)
        self.updates += 1
        self._avg = self.ema * self._avg + (1 - self.ema) * loss
        self._weight = self.ema * self._weight + (1 - self.ema)
        if self.updates <= self.warmup_steps:
            return self.lr
        smoothed = self.smoothed_loss
        if smoothed < self.best * (1 - self.threshold):
            self.best, self.bad_updates = smoothed, 0
        else:
            self.bad_updates += 1
            if self.bad_updates >= self.patience and self.halvings < self.max_halvings:
                self.halvings += 1
                self.bad_updates = 0
                self.best = smoothed
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("updates", "halvings", "bad_updates", "best", "_avg", "_weight")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k not in self.state_dict():
                raise KeyError(f"WarmupPlateauLR.load_state_dict: unknown key {k!r}")
            setattr(self, k, v)


class WarmupCosineLR(WarmupPlateauLR):
    """``optim.schedule: cosine``: the same warm-up (and warm-up clipping), then a half cosine from
    ``lr`` to ``min_lr_ratio * lr`` at ``max_steps`` (a short run's budget is known; halving on a
    noisy plateau starts early there). Same interface and state as WarmupPlateauLR."""

    def __init__(self, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1,
                 grad_clip: float = 0.0):
        super().__init__(lr, warmup_steps, patience=1, grad_clip=grad_clip)
        self.max_steps, self.min_lr_ratio = max(max_steps, warmup_steps + 1), min_lr_ratio

    @classmethod
    def from_optim(cls, cfg: OptimConfig) -> "WarmupCosineLR":
        return cls(cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.grad_clip)

    @property
    def lr(self) -> float:
        if self.in_warmup:
            return self.base_lr * (self.updates + 1) / self.warmup_steps
        return cosine(self.updates - self.warmup_steps, self.base_lr, self.base_lr * self.min_lr_ratio,
                      self.max_steps - self.warmup_steps)

    def step(self, loss: float) -> float:
        self.updates += 1
        self._avg = self.ema * self._avg + (1 - self.ema) * float(loss)
        self._weight = self.ema * self._weight + (1 - self.ema)
        return self.lr


def prior_lr_schedule(cfg: OptimConfig) -> WarmupPlateauLR:
    """The prior's schedule named by ``optim.schedule``: plateau (paper) or cosine."""
    return (WarmupCosineLR if cfg.schedule == "cosine" else WarmupPlateauLR).from_optim(cfg)
