"""Incremental decoding of the prior with a key/value cache that respects the sparse masks.

    dec = CachedDecoder(prior, batch=B)
    logits = dec.prefill(text, prompt_codes)   # (B, Vi): predicts code n (n = prompt codes given)
    logits = dec.step(code_n)                  # feeds code n, predicts code n+1; ... up to code N-1

The decoder drives the prior's own submodules (embeddings, ``AttentionBranch.project/merge``,
MLP branches, final norm, image head), so a cached logit equals the uncached forward's logit
for the same position (tests/test_sampling.py checks every layer type, dense and sparse).

Masks. Each layer keeps the keys and values of every position seen so far, ``(B, H, S, D)``.
A step at stream position p attends only to the keys allowed by row p of that layer's mask
(``backend.mask``): row attention sees the text plus the previous G+1 slots, column attention
the text plus the slots above in the same column, convolutional attention the text plus the
causal k x k neighbourhood. The allowed key positions are gathered from the cache with one
``index_select`` (computed once per (layer type, position)), so a step costs O(allowed keys),
not O(p). Prefill runs the prefix at once with the mask's top-left block (all masks are causal).

Inference only: the residual branches are called directly, not through ``prior.branch_fn``
(the fp16 block-scaling hook only rescales gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle_ds.models.prior import Prior


class CachedDecoder:
    def __init__(self, prior: Prior, batch: int):
        if prior.training:
            raise ValueError("CachedDecoder: call prior.eval() first (dropout-free inference)")
        self.prior, self.cfg, self.batch = prior, prior.cfg, batch
        p = next(prior.parameters())
        self.device, self.dtype = p.device, p.dtype
        c = self.cfg
        shape = (batch, c.n_heads, c.seq_len, c.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in prior.blocks]  # (B, H, S, D) each
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in prior.blocks]
        self.masks = {kind: b.mask.to(self.device) for kind, b in prior.backends.items()}  # (S, S) each
        self._allowed: dict[tuple[str, int], Tensor] = {}
        self.pos = 0  # positions [0, pos) are in the cache

    @property
    def next_slot(self) -> int:
        """Image slot the next ``step`` fills (slot a takes code a-1 as input and predicts code a)."""
        return self.pos - self.cfg.text_len

    def allowed(self, kind: str, p: int) -> Tensor:
        """Key positions (int64) that query position ``p`` of a ``kind`` layer may attend to."""
        key = (kind, p)
        if key not in self._allowed:
            self._allowed[key] = self.masks[kind][p, : p + 1].nonzero().squeeze(1)
        return self._allowed[key]

    # ------------------------------------------------------------------ layers
    def _run(self, h: Tensor, p0: int) -> Tensor:
        """Hidden states (B, L, d) of new positions p0..p0+L-1 -> image logits of those positions."""
        p1 = p0 + h.shape[1]
        for i, blk in enumerate(self.prior.blocks):
            q, k, v = blk.attn.project(h)  # (B, H, L, D) each
            self.k[i][:, :, p0:p1] = k
            self.v[i][:, :, p0:p1] = v
            kind = blk.attn.kind
            if p1 - p0 == 1:
                idx = self.allowed(kind, p0)
                kk = self.k[i].index_select(2, idx)  # (B, H, K, D): the allowed keys only
                vv = self.v[i].index_select(2, idx)
                out = F.scaled_dot_product_attention(q, kk, vv)  # (B, H, 1, D)
            else:
                mask = self.masks[kind][p0:p1, :p1]  # (L, p1)
                out = F.scaled_dot_product_attention(q, self.k[i][:, :, :p1], self.v[i][:, :, :p1], attn_mask=mask)
            h = h + blk.attn.merge(out)
            h = h + blk.mlp(h)
        self.pos = p1
        return self.prior.image_head(self.prior.ln_f(h))  # (B, L, Vi) fp32

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, text: Tensor, prompt_codes: Tensor | None = None) -> Tensor:
        """Text (B, T) and optionally the first n codes (B, n) -> logits (B, Vi) predicting code n."""
        c, b = self.cfg, text.shape[0]
        if b != self.batch:
            raise ValueError(f"prefill: text has batch {b}, the cache was built for {self.batch}")
        n = 0 if prompt_codes is None else prompt_codes.shape[1]
        if n >= c.image_len:
            raise ValueError(f"prompt_codes: at most {c.image_len - 1} codes, got {n}")
        codes = torch.zeros(b, c.image_len, dtype=torch.long, device=text.device)  # (B, N)
        if n:
            if prompt_codes.shape[0] != b:
                raise ValueError(f"prompt_codes: batch {prompt_codes.shape[0]} != text batch {b}")
            codes[:, :n] = prompt_codes
        self.prior.check_inputs(text, codes)
        length = c.text_len + n + 1  # text, SOI, and the n prompt codes as inputs of slots 1..n
        h = self.prior.embed(text, codes)[:, :length]  # (B, T+n+1, d)
        return self._run(h, 0)[:, -1]  # (B, Vi)

    @torch.no_grad()
    def step(self, code: Tensor) -> Tensor:
        """Feed the code just chosen for slot a-1 (B,) -> logits (B, Vi) predicting code a."""
        c, a = self.cfg, self.next_slot
        if self.pos == 0:
            raise RuntimeError("step before prefill")
        if a >= c.image_len:
            raise RuntimeError(f"step: all {c.image_len} image slots are filled")
        h = self.prior.embed.image_input(code.view(-1, 1), a)  # (B, 1, d)
        return self._run(h, self.pos)[:, -1]  # (B, Vi)
