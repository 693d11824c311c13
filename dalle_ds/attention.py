"""Attention backends behind one interface: ``backend(q, k, v) -> out``, all ``(B, H, S, D)``.

One backend object per layer type (row / column / conv), built once from that type's mask
(dalle_ds.attention_masks) and shared by every layer of the type. All three give the same
outputs and gradients (tests/test_attention.py):

- ``dense``  reference: ``scaled_dot_product_attention`` with the dense (S, S) bool mask.
- ``sparse`` fast path: text queries attend causally to the text; image queries are regrouped
  into blocks of G queries (one image row in raster order; one image column in transposed order
  for column attention) and each block meets only its window: the whole text plus the image
  keys from ``before`` slots ahead of the block to its end. Masked work shrinks from S keys per
  query to T + before + G (row: T + 2G, column: T + G, conv 11x11: T + 6G + 5). The windows are
  gathered with one ``index_select`` (which also applies the transposition), then one SDPA call
  with a small block mask does the rest. The construction checks that every allowed (query,
  key) pair of the dense mask lies in some window, so the result is exact for any mask that is
  causal in the chosen order.
- ``flex``   ``torch.nn.attention.flex_attention`` with a block mask built from the same mask
  (compiled on CUDA; on CPU it runs eager, forward only).

Backends hold masks as plain tensors (not buffers: they are derived from the config, never
checkpointed) cached per device. ``backend.mask`` is the dense (S, S) mask for a KV-cache sampler.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle_ds.attention_masks import build_mask

BACKENDS = ("dense", "sparse", "flex")


class AttentionBackend(Protocol):
    mask: Tensor  # (S, S) bool, True = may attend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class _PerDevice:
    """Lazily moves a dict of CPU tensors to whatever device the inputs live on."""

    def __init__(self, **tensors: Tensor):
        self._cpu = tensors
        self._cache: dict[torch.device, dict[str, Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._cache:
            self._cache[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._cache[device]


def _check(q: Tensor, k: Tensor, v: Tensor, seq_len: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or q.shape[2] != seq_len:
        raise ValueError(f"attention expects q, k, v of shape (B, H, {seq_len}, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


class DenseAttention:
    """Reference: SDPA over the whole sequence with the dense bool mask."""

    def __init__(self, mask: Tensor):
        self.mask = mask
        self._dev = _PerDevice(mask=mask)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v, self.mask.shape[0])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._dev.on(q.device)["mask"])


class BlockSparseAttention:
    """Fast path: each block of image queries attends only to the text plus its key window."""

    def __init__(self, mask: Tensor, text_len: int, grid: int, transposed: bool = False):
        s = mask.shape[0]
        t, n, g = text_len, grid * grid, grid
        if mask.shape != (s, s) or s != t + n:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit text_len={t} + grid {g}x{g}")
        if mask[:t, t:].any():
            raise ValueError("sparse attention: text positions must not attend to image positions")
        self.mask, self.text_len, self.grid, self.transposed = mask, t, g, transposed
        text_mask = mask[:t, :t]
        self.text_causal = bool(torch.equal(text_mask, torch.ones(t, t, dtype=torch.bool).tril()))

        # order[i] = raster slot of the i-th image query in processing order.
        slots = torch.arange(n)
        order = slots.view(g, g).t().reshape(-1) if transposed else slots
        img = mask[t:, t:][order][:, order]  # (N, N) image->image in processing order
        nb, bq = n // g, g
        # before: how far ahead of its block start a query's earliest allowed image key lies.
        first = torch.where(img.any(1), img.float().argmax(1), slots)  # first allowed key per query
        last = n - 1 - img.flip(1).float().argmax(1)
        block_start = (slots // bq) * bq
        if bool((img.any(1) & (last >= block_start + bq)).any()):
            raise ValueError("sparse attention: the mask reaches past the end of a query block in this order"
                             f" (transposed={transposed}); it must be causal in that order")
        before = int((block_start - first).clamp(min=0).max())
        win = before + bq

        # Key index per block: [text 0..T-1 | image window], as stream positions (invalid -> 0, masked).
        w = torch.arange(nb)[:, None] * bq - before + torch.arange(win)[None, :]  # (nb, win) order index
        valid = w >= 0
        img_pos = t + order[w.clamp(min=0)]
        kv_index = torch.cat([torch.arange(t).expand(nb, t), torch.where(valid, img_pos, 0)], 1)  # (nb, T+win)
        q_pos = (t + order).view(nb, bq)  # (nb, bq)
        block_mask = mask[q_pos[:, :, None], kv_index[:, None, :]]  # (nb, bq, T+win)
        block_mask[:, :, t:] &= valid[:, None, :]
        if int(block_mask.sum()) != int(mask[t:].sum()):
            raise AssertionError("sparse attention: the key windows miss allowed pairs of the mask")
        self.before, self.window = before, t + win
        self._dev = _PerDevice(
            mask=mask, text_mask=text_mask, kv_index=kv_index.reshape(-1), block_mask=block_mask[None],
            q_index=(t + order), inverse=torch.argsort(order),
        )

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v, self.mask.shape[0])
        d = self._dev.on(q.device)
        b, h, s, e = q.shape
        t, g = self.text_len, self.grid
        nb = (s - t) // g
        if self.text_causal:
            text_out = F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], is_causal=True)
        else:
            text_out = F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], attn_mask=d["text_mask"])
        if self.transposed:
            qi = q.index_select(2, d["q_index"])  # (B, H, N, D) in column-major order
        else:
            qi = q[:, :, t:]
        qi = qi.reshape(b * h, nb, g, e)  # (B*H, nb, G, D)
        ki = k.index_select(2, d["kv_index"]).view(b * h, nb, self.window, e)  # (B*H, nb, T+win, D)
        vi = v.index_select(2, d["kv_index"]).view(b * h, nb, self.window, e)
        img_out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=d["block_mask"])  # (B*H, nb, G, D)
        img_out = img_out.view(b, h, s - t, e)
        if self.transposed:
            img_out = img_out.index_select(2, d["inverse"])  # back to raster order
        return torch.cat([text_out, img_out], 2)  # (B, H, S, D)


_compiled_flex = None


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if device.type != "cuda":
        return flex_attention  # eager reference implementation: forward only on CPU
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FlexAttention:
    """FlexAttention with a block mask built from the dense mask (one per device)."""

    def __init__(self, mask: Tensor):
        self.mask = mask
        self._dev = _PerDevice(mask=mask)
        self._block_masks: dict[torch.device, object] = {}

    def block_mask(self, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        if device not in self._block_masks:
            m = self._dev.on(device)["mask"]
            s = m.shape[0]

            def mask_mod(b, h, q_idx, kv_idx):
                return m[q_idx, kv_idx]

            self._block_masks[device] = create_block_mask(mask_mod, None, None, s, s, device=str(device))
        return self._block_masks[device]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v, self.mask.shape[0])
        return _flex_fn(q.device)(q, k, v, block_mask=self.block_mask(q.device))


def build_backend(name: str, kind: str, text_len: int, grid: int, kernel: int) -> AttentionBackend:
    """The backend ``name`` (dense | sparse | flex) for layer type ``kind`` (row | column | conv)."""
    mask = build_mask(kind, text_len, grid, kernel)
    match name:
        case "dense":
            return DenseAttention(mask)
        case "sparse":
            return BlockSparseAttention(mask, text_len, grid, transposed=(kind == "column"))
        case "flex":
            return FlexAttention(mask)
        case _:
            raise ValueError(f"model.attention={name!r}: must be one of {list(BACKENDS)}")
