"""Exponential moving average of a model's parameters (paper App. A.2: decay 0.999).

    ema = EMA(model, decay=0.999)
    ...optimizer step...; ema.update(model)
    ema.copy_to(eval_model)          # the averaged weights are the ones evaluated and exported

Buffers (none in the dVAE) are copied, not averaged. ``state_dict`` holds the shadow tensors and
the update count, so a resumed run continues the same average.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay}: must be in [0, 1)")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() ^ params.keys())
            raise KeyError(f"EMA.update: parameter names differ from the tracked ones: {missing[:5]}")
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            diff = sorted(state["shadow"].keys() ^ self.shadow.keys())
            raise KeyError(f"EMA.load_state_dict: parameter names differ: {diff[:5]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
