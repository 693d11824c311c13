"""Attention backends behind one interface: ``backend(q, k, v) -> out``, all ``(B, H, S, D)``.

One backend object per layer type (row / column / conv), built once from that type's mask
(dalle_ds.models.masks) and shared by every layer of the type. All three give the same
outputs and gradients (tests/test_attention.py):

- ``dense``  reference: ``scaled_dot_product_attention`` with the dense (S, S) bool mask.
- ``sparse`` fast path, one autograd Function with a hand-written backward: text queries attend
  to the text (small GEMMs); image queries are regrouped into blocks of G (one image row in
  raster order; one image column in transposed order for column attention) and each block meets
  only the whole text plus a window of whole key blocks: its own and ``back`` blocks before it.
  One softmax spans [text | window]; the text part runs as one large GEMM per head, the window
  part as a batch of small (G x D) @ (D x W) GEMMs. Keys per image query drop from S to T + W
  (row: T + 2G, column: T + G, conv 11x11: T + 7G). The construction checks that every allowed
  (query, key) pair of the dense mask lies in a window, so the result is exact for any mask in
  which the image sees all the text and that is causal in the chosen order.
- ``flex``   ``torch.nn.attention.flex_attention`` with a block mask built from the same mask
  (compiled on CUDA, sm_80 or newer: refused on Volta/Turing, see :func:`check_flex_device`; on CPU
  it runs eager, forward only).

Backends hold masks as plain tensors (not buffers: they are derived from the config, never
checkpointed) cached per device. ``backend.mask`` is the dense (S, S) mask for a KV-cache sampler.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle_ds.models.masks import build_mask

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


class CausalAttention:
    """Layer type ``causal``: the whole stream mask is plain causal, so SDPA's ``is_causal`` path
    runs without a mask tensor (the ``dense`` and ``sparse`` backends both land here: there is no
    sparsity to exploit)."""

    def __init__(self, mask: Tensor):
        self.mask = mask

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v, self.mask.shape[0])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _softmax(s: Tensor) -> Tensor:
    return torch.softmax(s, -1, dtype=torch.float32 if s.element_size() < 4 else None).to(s.dtype)


class _BlockSparseFunction(torch.autograd.Function):
    """The fast path's forward and hand-written backward (no autograd glue, no masked blocks).

    Text queries: causal attention over the text (small GEMMs). Image queries, in blocks of G:
    one softmax over [all T text keys | the W window keys]; the text part runs as one large GEMM
    per head, the window part as a batch of (G x D) @ (D x W) GEMMs. Probabilities are kept.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: "BlockSparseAttention", text_bias: Tensor, win_bias: Tensor):
        b, h, s, e = q.shape
        bh, t, g, nb, w = b * h, plan.text_len, plan.grid, plan.grid, plan.window
        n, scale = s - t, e ** -0.5
        with torch.autocast(q.device.type, enabled=False):
            qt = (q[:, :, :t] * scale).reshape(bh, t, e)  # (BH, T, D) scaled
            kt = k[:, :, :t].reshape(bh, t, e)
            vt = v[:, :, :t].reshape(bh, t, e)
            # text queries: causal over the text
            ptt = _softmax(torch.baddbmm(text_bias, qt, kt.transpose(1, 2)))  # (BH, T, T)
            ott = torch.bmm(ptt, vt)  # (BH, T, D)
            # image queries: blocks against [text | window]
            qb = plan.blocks(q[:, :, t:], scale)  # (BH, nb, G, D) scaled
            kw = plan.windows(k[:, :, t:])  # (BH, nb, W, D)
            vw = plan.windows(v[:, :, t:])
            st = torch.bmm(qb.view(bh, n, e), kt.transpose(1, 2))  # (BH, N, T)
            sw = torch.baddbmm(win_bias, qb.view(bh * nb, g, e), kw.view(bh * nb, w, e).transpose(1, 2))  # (BH*nb, G, W)
            p = _softmax(torch.cat([st.view(bh, nb, g, t), sw.view(bh, nb, g, w)], -1))  # (BH, nb, G, T+W)
            pt = p.view(bh, n, t + w)[..., :t]  # (BH, N, T) strided view
            pw = p.view(bh * nb, g, t + w)[..., t:]  # (BH*nb, G, W) strided view
            oi = torch.baddbmm(torch.bmm(pw, vw.view(bh * nb, w, e)).view(bh, n, e), pt, vt)  # (BH, N, D)
            out = torch.empty(b, h, s, e, dtype=q.dtype, device=q.device)
            out[:, :, :t] = ott.view(b, h, t, e)
            plan.unblock(oi.view(bh, nb, g, e), out[:, :, t:])
        ctx.save_for_backward(qt, kt, vt, ptt, ott, qb, kw, vw, p, oi)
        ctx.plan, ctx.shape = plan, (b, h, s, e)
        return out

    @staticmethod
    def backward(ctx, dout):
        qt, kt, vt, ptt, ott, qb, kw, vw, p, oi = ctx.saved_tensors
        plan = ctx.plan
        b, h, s, e = ctx.shape
        bh, t, g, nb, w = b * h, plan.text_len, plan.grid, plan.grid, plan.window
        n, scale = s - t, e ** -0.5
        dout = dout.to(qt.dtype)
        dq = torch.empty(b, h, s, e, dtype=qt.dtype, device=qt.device)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        # text queries
        dot = dout[:, :, :t].reshape(bh, t, e)
        dstt = torch.bmm(dot, vt.transpose(1, 2)).sub_((dot * ott).sum(-1, keepdim=True)).mul_(ptt)  # (BH, T, T)
        dq[:, :, :t] = torch.bmm(dstt, kt).mul_(scale).view(b, h, t, e)
        dkt = torch.bmm(dstt.transpose(1, 2), qt)  # (BH, T, D)
        dvt = torch.bmm(ptt.transpose(1, 2), dot)
        # image queries
        doi = plan.blocks(dout[:, :, t:]).view(bh, n, e)  # (BH, N, D) in processing order
        dob = doi.view(bh * nb, g, e)
        kw2, vw2 = kw.view(bh * nb, w, e), vw.view(bh * nb, w, e)
        pt = p.view(bh, n, t + w)[..., :t]
        pw = p.view(bh * nb, g, t + w)[..., t:]
        dpt = torch.bmm(doi, vt.transpose(1, 2))  # (BH, N, T)
        dpw = torch.bmm(dob, vw2.transpose(1, 2))  # (BH*nb, G, W)
        dp = torch.cat([dpt.view(bh, nb, g, t), dpw.view(bh, nb, g, w)], -1)  # (BH, nb, G, T+W)
        ds = dp.sub_((doi * oi).sum(-1).view(bh, nb, g, 1)).mul_(p)  # softmax backward, in place
        dst = ds.view(bh, n, t + w)[..., :t]
        dsw = ds.view(bh * nb, g, t + w)[..., t:]
        dk[:, :, :t] = dkt.baddbmm_(dst.transpose(1, 2), qb.view(bh, n, e)).view(b, h, t, e)
        dv[:, :, :t] = dvt.baddbmm_(pt.transpose(1, 2), doi).view(b, h, t, e)
        dqi = torch.baddbmm(torch.bmm(dsw, kw2).view(bh, n, e), dst, kt).mul_(scale)  # (BH, N, D)
        plan.unblock(dqi.view(bh, nb, g, e), dq[:, :, t:])
        plan.unwindow(torch.bmm(dsw.transpose(1, 2), qb.view(bh * nb, g, e)).view(bh, nb, w, e), dk[:, :, t:])
        plan.unwindow(torch.bmm(pw.transpose(1, 2), dob).view(bh, nb, w, e), dv[:, :, t:])
        return dq, dk, dv, None, None, None


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

    def _grid_view(self, x: Tensor) -> Tensor:
        """(B, H, N, D) raster image positions -> (B, H, nb, G, D) view in processing order."""
        b, h, n, e = x.shape
        x = x.unflatten(2, (self.grid, self.grid))
        return x.transpose(2, 3) if self.transposed else x

    def blocks(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """(B, H, N, D) raster image positions -> contiguous (B*H, nb, G, D) in processing order."""
        b, h, n, e = x.shape
        out = torch.empty(b, h, self.grid, self.grid, e, dtype=x.dtype, device=x.device)
        if scale == 1.0:
            out.copy_(self._grid_view(x))
        else:
            torch.mul(self._grid_view(x), scale, out=out)
        return out.view(b * h, self.grid, self.grid, e)

    def unblock(self, xb: Tensor, out: Tensor) -> None:
        """Write (B*H, nb, G, D) blocks into ``out`` (B, H, N, D) in raster order."""
        b, h, n, e = out.shape
        self._grid_view(out).copy_(xb.view(b, h, self.grid, self.grid, e))

    def windows(self, x: Tensor) -> Tensor:
        """(B, H, N, D) raster image positions -> (B*H, nb, W, D): blocks b - back .. b, zeros before."""
        if self.back == 0:
            return self.blocks(x)
        b, h, n, e = x.shape
        g, nb = self.grid, self.grid
        src = self._grid_view(x)  # (B, H, nb, G, D)
        out = x.new_empty(b, h, nb, self.window, e)
        for j in range(self.back + 1):  # j blocks back
            lo = (self.back - j) * g
            out[:, :, j:, lo:lo + g] = src[:, :, :nb - j]
            out[:, :, :j, lo:lo + g] = 0
        return out.view(b * h, nb, self.window, e)

    def unwindow(self, dw: Tensor, out: Tensor) -> None:
        """Adjoint of ``windows``: sum (B*H, nb, W, D) window gradients onto their slots in ``out`` (B, H, N, D)."""
        g = self.grid
        nb = dw.shape[1]
        acc = dw[:, :, self.back * g:].clone()  # own block
        for j in range(1, self.back + 1):
            lo = (self.back - j) * g
            acc[:, :nb - j] += dw[:, j:, lo:lo + g]
        self.unblock(acc, out)

    def _tables(self, device: torch.device, dtype: torch.dtype, bh: int) -> tuple[Tensor, Tensor]:
        key = (device, dtype, bh)
        if key not in self._bias_cache:
            self._bias_cache.clear()  # keep one (the current batch size)
            d = self._dev.on(device)
            text = torch.zeros(d["text_mask"].shape, dtype=dtype, device=device).masked_fill_(~d["text_mask"], float("-inf"))
            win = d["bias"].to(dtype)
            self._bias_cache[key] = (text, win.expand(bh, *win.shape).reshape(-1, *win.shape[1:]).contiguous())
        return self._bias_cache[key]  # (T, T), (BH*nb, G, W)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v, self.mask.shape[0])
        text_bias, win_bias = self._tables(q.device, q.dtype, q.shape[0] * q.shape[1])
        return _BlockSparseFunction.apply(q, k.to(q.dtype), v.to(q.dtype), self, text_bias, win_bias)


_compiled_flex = None


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if device.type != "cuda":
        return flex_attention  # eager reference implementation: forward only on CPU
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


FLEX_MIN_CAPABILITY = (8, 0)


def check_flex_device(device: torch.device | str | None = None) -> None:
    """Refuse FlexAttention on a CUDA GPU below sm_80 (V100 is sm_70, T4 sm_75).

    FlexAttention runs only through Triton kernels, and Triton dropped the pre-Ampere tensor-core
    (MMAv1) path, falling back to FMA below compute capability 8.0 (triton-lang/triton#5066); on V100
    flex_attention was measured ~10x slower than SDPA (meta-pytorch/attention-gym#21), and flash
    attention does not support sm_70 (Dao-AILab/flash-attention#148). ``sparse`` (cuBLAS GEMMs, fp16
    tensor cores on sm_70) is exact and is the paper preset's backend; ``dense`` is the fallback.
    ``device=None``: the current CUDA device when CUDA is available, else nothing to check.
    """
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < FLEX_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"model.attention='flex': {name} is sm_{cap[0]}{cap[1]}; FlexAttention's Triton kernels have no "
            f"tensor-core path below sm_80 (triton-lang/triton#5066; ~10x slower than SDPA on V100, "
            f"meta-pytorch/attention-gym#21): use model.attention=sparse (exact, cuBLAS) or dense")


class FlexAttention:
    """FlexAttention with a block mask built from the dense mask (one per device). On CUDA it needs
    sm_80 or newer (:func:`check_flex_device`, checked at construction and per device at the first call)."""

    def __init__(self, mask: Tensor):
        check_flex_device()
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

            check_flex_device(device)
            self._block_masks[device] = create_block_mask(mask_mod, None, None, s, s, device=str(device))
        return self._block_masks[device]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v, self.mask.shape[0])
        if q.device.type == "cpu":
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                raise NotImplementedError("model.attention='flex': FlexAttention has no backward on CPU; "
                                          "train with model.attention=sparse (or dense) there")
            q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses inputs that require grad
        return _flex_fn(q.device)(q, k, v, block_mask=self.block_mask(q.device))


def build_backend(name: str, kind: str, text_len: int, grid: int, kernel: int) -> AttentionBackend:
    """The backend ``name`` (dense | sparse | flex) for layer type ``kind`` (row | column | conv)."""
    mask = build_mask(kind, text_len, grid, kernel)
    if name not in BACKENDS:
        raise ValueError(f"model.attention={name!r}: must be one of {list(BACKENDS)}")
    if kind == "causal" and name != "flex":
        return CausalAttention(mask)
    match name:
        case "dense":
            return DenseAttention(mask)
        case "sparse":
            return BlockSparseAttention(mask, text_len, grid, transposed=(kind == "column"))
        case "flex":
            return FlexAttention(mask)
        case _:
            raise ValueError(f"model.attention={name!r}: must be one of {list(BACKENDS)}")
