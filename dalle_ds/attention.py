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


class _WindowAttention(torch.autograd.Function):
    """Image query blocks against [all text keys | their window of image keys], one softmax.

    The text part runs as one large GEMM per head (every image query sees the whole text); only
    the image window part is a batch of small GEMMs. Probabilities are kept for the backward.
    """

    @staticmethod
    def forward(ctx, q, kt, vt, kw, vw, bias, scale):
        # q (BH, nb, G, D); kt, vt (BH, T, D); kw, vw (BH, nb, W, D); bias (BH*nb, G, W) 0 / -inf
        bh, nb, g, d = q.shape
        t, w, n = kt.shape[1], kw.shape[2], nb * g
        kt, vt, kw, vw = kt.contiguous(), vt.contiguous(), kw.contiguous(), vw.contiguous()
        with torch.autocast(q.device.type, enabled=False):
            qs = (q * scale).contiguous()
            st = torch.bmm(qs.view(bh, n, d), kt.transpose(1, 2))  # (BH, N, T)
            sw = torch.baddbmm(bias, qs.view(bh * nb, g, d), kw.reshape(bh * nb, w, d).transpose(1, 2))  # (BH*nb, G, W)
            s = torch.cat([st.view(bh, nb, g, t), sw.view(bh, nb, g, w)], -1)  # (BH, nb, G, T+W)
            p = torch.softmax(s, -1, dtype=torch.float32 if q.element_size() < 4 else None).to(q.dtype)
            pt = p.view(bh, n, t + w)[..., :t]  # (BH, N, T), strided view
            pw = p.view(bh * nb, g, t + w)[..., t:]  # (BH*nb, G, W), strided view
            o = torch.baddbmm(torch.bmm(pw, vw.reshape(bh * nb, w, d)).view(bh, n, d), pt, vt)  # (BH, N, D)
        ctx.save_for_backward(qs, kt, vt, kw, vw, p, o)
        ctx.scale = scale
        return o.view(bh, nb, g, d)

    @staticmethod
    def backward(ctx, do):
        qs, kt, vt, kw, vw, p, o = ctx.saved_tensors
        bh, nb, g, d = qs.shape
        t, w, n = kt.shape[1], kw.shape[2], nb * g
        do = do.reshape(bh, n, d).to(o.dtype).contiguous()
        dob = do.view(bh * nb, g, d)
        kw, vw = kw.reshape(bh * nb, w, d), vw.reshape(bh * nb, w, d)
        pt = p.view(bh, n, t + w)[..., :t]
        pw = p.view(bh * nb, g, t + w)[..., t:]
        dpt = torch.bmm(do, vt.transpose(1, 2))  # (BH, N, T)
        dpw = torch.bmm(dob, vw.transpose(1, 2))  # (BH*nb, G, W)
        dp = torch.cat([dpt.view(bh, nb, g, t), dpw.view(bh, nb, g, w)], -1)  # (BH, nb, G, T+W)
        delta = (do * o).sum(-1).view(bh, nb, g, 1)
        ds = dp.sub_(delta).mul_(p)  # softmax backward, in place
        dst = ds.view(bh, n, t + w)[..., :t]
        dsw = ds.view(bh * nb, g, t + w)[..., t:]
        dvt = torch.bmm(pt.transpose(1, 2), do)  # (BH, T, D)
        dvw = torch.bmm(pw.transpose(1, 2), dob).view(bh, nb, w, d)
        dq = torch.baddbmm(torch.bmm(dsw, kw).view(bh, n, d), dst, kt).mul_(ctx.scale).view(bh, nb, g, d)
        dkt = torch.bmm(dst.transpose(1, 2), qs.view(bh, n, d))  # (BH, T, D)
        dkw = torch.bmm(dsw.transpose(1, 2), qs.view(bh * nb, g, d)).view(bh, nb, w, d)
        return dq, dkt, dvt, dkw, dvw, None, None


class BlockSparseAttention:
    """Fast path: each block of image queries attends only to the text plus its key window."""

    def __init__(self, mask: Tensor, text_len: int, grid: int, transposed: bool = False):
        s = mask.shape[0]
        t, n, g = text_len, grid * grid, grid
        if mask.shape != (s, s) or s != t + n:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit text_len={t} + grid {g}x{g}")
        if mask[:t, t:].any() or not mask[t:, :t].all():
            raise ValueError("sparse attention: text must not see the image, and the image must see all the text")
        self.mask, self.text_len, self.grid, self.transposed = mask, t, g, transposed
        text_mask = mask[:t, :t]
        self.text_causal = bool(torch.equal(text_mask, torch.ones(t, t, dtype=torch.bool).tril()))

        # order[i] = raster slot of the i-th image query in processing order (blocks of G).
        slots = torch.arange(n)
        order = slots.view(g, g).t().reshape(-1) if transposed else slots
        img = mask[t:, t:][order][:, order]  # (N, N) image->image in processing order
        nb = n // g
        # How many whole blocks before its own a query block must see, from the earliest allowed key.
        has = img.any(1)
        first = torch.where(has, img.float().argmax(1), slots)
        last = n - 1 - img.flip(1).float().argmax(1)
        block_start = (slots // g) * g
        if bool((has & (last >= block_start + g)).any()):
            raise ValueError("sparse attention: the mask reaches past the end of a query block in this order"
                             f" (transposed={transposed}); it must be causal in that order")
        self.before = int((block_start - first).clamp(min=0).max())  # slots
        self.back = -(-self.before // g)  # whole blocks
        self.window = (self.back + 1) * g

        # Window of block b: processing-order slots (b - back) * G .. (b + 1) * G - 1 (negative -> masked).
        w = torch.arange(nb)[:, None] * g - self.back * g + torch.arange(self.window)[None, :]  # (nb, W)
        valid = w >= 0
        win_slots = order[w.clamp(min=0)]
        q_slots = order.view(nb, g)
        block_mask = mask[t + q_slots[:, :, None], t + win_slots[:, None, :]] & valid[:, None, :]  # (nb, G, W)
        if int(block_mask.sum()) != int(img.sum()):
            raise AssertionError("sparse attention: the key windows miss allowed pairs of the mask")
        bias = torch.zeros(block_mask.shape).masked_fill_(~block_mask, float("-inf"))
        self._dev = _PerDevice(mask=mask, text_mask=text_mask, bias=bias)
        self._bias_cache: dict[tuple, Tensor] = {}

    def _bias(self, d: dict[str, Tensor], bh: int, dtype: torch.dtype) -> Tensor:
        key = (d["bias"].device, dtype, bh)
        if key not in self._bias_cache:
            self._bias_cache.clear()  # keep one (the current batch size)
            b = d["bias"].to(dtype)
            self._bias_cache[key] = b.expand(bh, *b.shape).reshape(-1, *b.shape[1:]).contiguous()
        return self._bias_cache[key]  # (BH*nb, G, W)

    def _blocks(self, x: Tensor) -> Tensor:
        """(B, H, N, D) raster image positions -> (B*H, nb, G, D) in processing order."""
        b, h, n, e = x.shape
        g = self.grid
        if self.transposed:
            x = x.reshape(b, h, g, g, e).transpose(2, 3)  # (B, H, col, row, D)
        return x.reshape(b * h, n // g, g, e)

    def _windows(self, x: Tensor) -> Tensor:
        """(BH, nb, G, D) blocks -> (BH, nb, W, D): blocks b - back .. b (zeros before the first)."""
        nb = x.shape[1]
        if self.back == 0:
            return x
        shifted = [F.pad(x, (0, 0, 0, 0, j, 0))[:, :nb] for j in range(self.back, 0, -1)]
        return torch.cat([*shifted, x], 2)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v, self.mask.shape[0])
        d = self._dev.on(q.device)
        b, h, s, e = q.shape
        t, g = self.text_len, self.grid
        qt, kt, vt = q[:, :, :t], k[:, :, :t], v[:, :, :t]
        if self.text_causal:
            text_out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # (B, H, T, D)
        else:
            text_out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=d["text_mask"])
        dtype = q.dtype
        qi = self._blocks(q[:, :, t:])  # (BH, nb, G, D)
        kw = self._windows(self._blocks(k[:, :, t:]))  # (BH, nb, W, D)
        vw = self._windows(self._blocks(v[:, :, t:]))
        img_out = _WindowAttention.apply(qi, kt.reshape(b * h, t, e).to(dtype), vt.reshape(b * h, t, e).to(dtype),
                                         kw.to(dtype), vw.to(dtype), self._bias(d, b * h, dtype), e ** -0.5)
        if self.transposed:
            img_out = img_out.view(b, h, g, g, e).transpose(2, 3)  # back to (B, H, row, col, D)
        img_out = img_out.reshape(b, h, s - t, e)
        return torch.cat([text_out.to(img_out.dtype), img_out], 2)  # (B, H, S, D)


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
