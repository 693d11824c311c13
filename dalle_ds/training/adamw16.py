"""AdamW with 16-bit parameters and moments, stochastic rounding, and an fp32 set (paper App. D, #14).

The paper kept the parameters and Adam moments of the large matrices in 16 bit (about 8 bytes of model
state per parameter, so 12.29B parameters fit 8 V100-16GB) and the gains, biases, embeddings and
unembeddings in fp32. Under DeepSpeed 0.19.8 ZeRO-3 the 16-bit storage comes from the JSON
(``bf16.bf16_master_weights_and_grads`` + ``bf16.bf16_optimizer_states``: the optimizer steps the
bf16 partition itself, no fp32 copy); this optimizer is the client AdamW DeepSpeed then calls:

- groups with ``fp32_master=False`` (the matrices): the update is computed in fp32 from the bf16
  parameter, gradient and moments, and all three are written back to bf16 with **stochastic
  rounding** (unbiased; round-to-nearest would drop every update below half a bf16 ulp, i.e. every
  update of a weight |w| >~ 0.005 once the learning rate has been halved a few times);
- groups with ``fp32_master=True`` (the paper's fp32 set): an fp32 master copy and fp32 moments live
  in the optimizer state; the bf16 parameter is the master rounded to nearest (what forward uses).

Moments in bf16 rather than fp16: v = g^2 underflows fp16 for |g| < 2.4e-4; bf16 has fp32's range.
Stochastic rounding costs no memory (a Kahan buffer would cost 2 more bytes per parameter).
The rounding noise depends on (seed, ``sr_stream``, step, group, chunk) only, so replicas of a shard
on other nodes round identically when they share ``sr_stream`` (the rank inside the ZeRO group).
Parameters of other dtypes (fp32 tests, fp16) are stepped in fp32 and copied back, round to nearest.
"""

from __future__ import annotations

import math
from typing import Any

import torch

CHUNK = 1 << 22  # elements per fp32 temporary (16 MB each)


def stochastic_round_to_bf16_(dst: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> None:
    """``dst`` (bf16) <- ``x`` (fp32) rounded up or down with probability proportional to closeness.

    Adds 16 uniform random bits below bf16's mantissa and truncates: exact for every finite x whose
    rounding does not overflow; Inf/NaN pass through unchanged."""
    bits = x.contiguous().view(torch.int32)
    r = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + r) & -65536).view(torch.float32)
    dst.copy_(torch.where(torch.isfinite(x), rounded, x))


class AdamW16(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (torch.optim.AdamW's arithmetic) for 16-bit storage; see the module
    docstring. Per group: ``fp32_master`` (bool, default False)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0):
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"AdamW16: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay} out of range")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      fp32_master=False))
        self.seed = seed
        self.sr_stream = 0  # e.g. this rank's index in the ZeRO partition group
        self._generator: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device, step: int, group_idx: int) -> torch.Generator:
        g = self._generator.get(device)
        if g is None:
            g = self._generator[device] = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + self.sr_stream * 10_007 + step * 101 + group_idx) % (2**63 - 1))
        return g

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            b1, b2 = group["betas"]
            lr, eps, wd, fp32_master = group["lr"], group["eps"], group["weight_decay"], group["fp32_master"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    keep32 = fp32_master or p.dtype not in (torch.bfloat16,)
                    mdtype = torch.float32 if keep32 else torch.bfloat16
                    st["exp_avg"] = torch.zeros_like(p, dtype=mdtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=mdtype)
                    if fp32_master and p.dtype != torch.float32:
                        st["master"] = p.detach().float().clone()
                st["step"] += 1
                t = st["step"]
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                step_size, bc2_sqrt = lr / bc1, math.sqrt(bc2)
                gen = self._gen(p.device, t, gi) if p.dtype == torch.bfloat16 and "master" not in st else None
                master = st.get("master")
                flat_p, flat_g = p.view(-1), p.grad.view(-1)
                flat_m, flat_v = st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
                flat_w = master.view(-1) if master is not None else None
                for lo in range(0, flat_p.numel(), CHUNK):
                    hi = min(lo + CHUNK, flat_p.numel())
                    g = flat_g[lo:hi].float()
                    w = (flat_w[lo:hi] if flat_w is not None else flat_p[lo:hi]).float()
                    m = flat_m[lo:hi].float().mul_(b1).add_(g, alpha=1 - b1)
                    v = flat_v[lo:hi].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    w.mul_(1 - lr * wd).addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
                    if gen is not None:  # 16-bit matrices: p, m, v stochastically rounded
                        stochastic_round_to_bf16_(flat_p[lo:hi], w, gen)
                        stochastic_round_to_bf16_(flat_m[lo:hi], m, gen)
                        stochastic_round_to_bf16_(flat_v[lo:hi], v, gen)
                    else:  # fp32 set (master) or non-bf16 storage: fp32 state, parameter rounded to nearest
                        if flat_w is not None:
                            flat_w[lo:hi].copy_(w)
                        flat_p[lo:hi].copy_(w)
                        flat_m[lo:hi].copy_(m)
                        flat_v[lo:hi].copy_(v)
        return loss

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments, fp32 masters) this rank holds."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))


def uses_16bit_state(ds_config: dict[str, Any]) -> bool:
    """True when the DeepSpeed config keeps master weights and optimizer states in bf16 (AdamW16's regime)."""
    bf16 = ds_config.get("bf16", {})
    return bool(bf16.get("enabled") and bf16.get("bf16_master_weights_and_grads") and bf16.get("bf16_optimizer_states"))
