"""The transformer prior (DALL·E §2.2, App. B): decoder-only over [text | image] tokens.

    prior = Prior(cfg.model)
    text_logits, image_logits = prior(text, codes)  # (B, T, Vt), (B, N, Vi), fp32
    loss, parts = prior.loss(text, codes)           # parts: {"text_loss", "image_loss"}

Stream (see dalle_ds.models.masks): inputs ``[text_0..text_{T-1}, SOI, img_0..img_{N-2}]``.
``text_logits[:, t]`` is the prediction made at text position t, i.e. of ``text[:, t+1]``; the
last row (t = T-1, followed by SOI) has no target and is left out of the loss.
``image_logits[:, j]`` predicts ``codes[:, j]``. Text padding (id 0) is not masked: a padded
position's input is its own learned padding embedding (one per position), and pad targets count
in the text loss, as in the paper. Image inputs get learned row and column embeddings of the
slot they predict (slot j <-> grid cell (j // G, j % G)).

Model code only: no distribution. Every parameter is created and initialised in the
constructor of the module that owns it, so building under ``deepspeed.zero.Init`` partitions
initialised values; every parameter is used inside its own module's forward (ZeRO-3 gathers
per module). Each residual add goes through ``self.branch_fn(branch, h, idx)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dalle_ds.models.attention import AttentionBackend, build_backend
from dalle_ds.models.masks import layer_kinds
from dalle_ds.config import ModelConfig

PAD_ID = 0  # the tokenizer's [PAD]; such text positions take the per-position padding embedding

BranchFn = Callable[[nn.Module, Tensor, int], Tensor]


def _default_branch_fn(branch: nn.Module, h: Tensor, idx: int) -> Tensor:
    return branch(h)


class Linear(nn.Module):
    """nn.Linear with its N(0, std) initialisation done in its own constructor (zero.Init safe)."""

    def __init__(self, d_in: int, d_out: int, std: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in).normal_(0.0, std))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Head(nn.Module):
    """Unembedding: fp32 logits whatever the activation dtype (paper App. D)."""

    def __init__(self, d_model: int, vocab: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, d_model).normal_(0.0, std))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h.float(), self.weight.float())  # (B, L, V) fp32


class Embeddings(nn.Module):
    """Text tokens (+ position; per-position padding), SOI, image tokens + row + column."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, std, g = cfg.d_model, cfg.init_std, cfg.image_grid
        self.grid = g
        self.text_tok = nn.Parameter(torch.empty(cfg.text_vocab_size, d).normal_(0.0, std))
        self.text_pos = nn.Parameter(torch.empty(cfg.text_len, d).normal_(0.0, std))
        self.text_pad = nn.Parameter(torch.empty(cfg.text_len, d).normal_(0.0, std))
        self.soi = nn.Parameter(torch.empty(d).normal_(0.0, std))
        self.image_tok = nn.Parameter(torch.empty(cfg.image_vocab_size, d).normal_(0.0, std))
        self.image_row = nn.Parameter(torch.empty(g, d).normal_(0.0, std))
        self.image_col = nn.Parameter(torch.empty(g, d).normal_(0.0, std))

    def forward(self, text: Tensor, codes: Tensor) -> Tensor:
        b, n = codes.shape
        tok = F.embedding(text, self.text_tok) + self.text_pos  # (B, T, d)
        text_h = torch.where((text == PAD_ID)[..., None], self.text_pad.expand_as(tok), tok)  # (B, T, d)
        soi = (self.soi + self.image_pos(0)).expand(b, 1, -1)  # (B, 1, d): slot 0 is fed SOI
        slots = torch.arange(1, n, device=codes.device)
        return torch.cat([text_h, soi, self.image_input(codes[:, :-1], slots)], 1)  # (B, S, d)

    def image_pos(self, slots: Tensor | int) -> Tensor:
        """Row + column embedding (..., d) of image slots (slot j <-> grid cell (j // G, j % G))."""
        return self.image_row[slots // self.grid] + self.image_col[slots % self.grid]

    def image_input(self, prev_codes: Tensor, slots: Tensor | int) -> Tensor:
        """Input embeddings (B, L, d) of image slots >= 1, each fed the code before it:
        ``prev_codes`` (B, L) = codes[:, slots - 1]. A KV cache embeds one new slot with this."""
        return F.embedding(prev_codes, self.image_tok) + self.image_pos(slots)  # (B, L, d)


class AttentionBranch(nn.Module):
    """Pre-norm attention: LN -> qkv -> backend -> output projection."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, kind: str):
        super().__init__()
        d, std = cfg.d_model, cfg.init_std
        self.n_heads, self.kind = cfg.n_heads, kind
        self.backend = backend  # plain attribute: shared by all layers of this kind, holds no parameters
        self.ln = nn.LayerNorm(d)
        self.qkv = Linear(d, 3 * d, std)
        self.proj = Linear(d, d, std / math.sqrt(2 * cfg.n_layers))

    def project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised input -> q, k, v, each (B, H, L, D) (a KV cache hooks in here)."""
        b, s, d = h.shape
        qkv = self.qkv(self.ln(h)).view(b, s, 3, self.n_heads, d // self.n_heads)  # (B, L, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D)
        return q, k, v

    def merge(self, out: Tensor) -> Tensor:
        b, h, s, e = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, s, h * e))  # (B, L, d)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.project(h)
        return self.merge(self.backend(q, k, v))


class MLPBranch(nn.Module):
    """Pre-norm MLP: LN -> fc -> GELU -> projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, std = cfg.d_model, cfg.init_std
        self.ln = nn.LayerNorm(d)
        self.fc = Linear(d, cfg.mlp_ratio * d, std)
        self.proj = Linear(cfg.mlp_ratio * d, d, std / math.sqrt(2 * cfg.n_layers))

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(self.ln(h))))


class ResBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, kind: str):
        super().__init__()
        self.attn = AttentionBranch(cfg, backend, kind)
        self.mlp = MLPBranch(cfg)


class Prior(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.kinds = layer_kinds(cfg.n_layers, cfg.layer_pattern)
        # One backend (one mask) per layer type, shared by the layers of that type.
        self.backends = {kind: build_backend(cfg.attention, kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel)
                         for kind in sorted(set(self.kinds))}
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(ResBlock(cfg, self.backends[kind], kind) for kind in self.kinds)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.text_head = Head(cfg.d_model, cfg.text_vocab_size, cfg.init_std)
        self.image_head = Head(cfg.d_model, cfg.image_vocab_size, cfg.init_std)
        self.branch_fn: BranchFn = _default_branch_fn

    def set_branch_fn(self, fn: BranchFn | None) -> None:
        """Route every residual branch through ``fn(branch, h, idx)`` (None restores the default)."""
        self.branch_fn = fn or _default_branch_fn

    # ------------------------------------------------------------------ forward

    def check_inputs(self, text: Tensor, codes: Tensor) -> None:
        c = self.cfg
        if text.dim() != 2 or text.shape[1] != c.text_len or text.dtype != torch.long:
            raise ValueError(f"text: expected int64 (B, {c.text_len}), got {text.dtype} {tuple(text.shape)}")
        if codes.dim() != 2 or codes.shape != (text.shape[0], c.image_len) or codes.dtype != torch.long:
            raise ValueError(f"codes: expected int64 ({text.shape[0]}, {c.image_len}), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        for name, x, vocab in (("text", text, c.text_vocab_size), ("codes", codes, c.image_vocab_size)):
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{name}: token ids must be in [0, {vocab}), got min {lo} max {hi}")

    def _block(self, i: int, h: Tensor) -> Tensor:
        blk = self.blocks[i]
        h = h + self.branch_fn(blk.attn, h, 2 * i)
        h = h + self.branch_fn(blk.mlp, h, 2 * i + 1)
        return h

    def hidden(self, text: Tensor, codes: Tensor) -> Tensor:
        """Final normalised hidden states (B, S, d)."""
        self.check_inputs(text, codes)
        h = self.embed(text, codes)  # (B, S, d)
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(len(self.blocks)):
            if ckpt:
                h = checkpoint(self._block, i, h, use_reentrant=False)
            else:
                h = self._block(i, h)
        return self.ln_f(h)

    def forward(self, text: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        h = self.hidden(text, codes)
        t = self.cfg.text_len
        return self.text_head(h[:, :t]), self.image_head(h[:, t:])  # (B, T, Vt), (B, N, Vi) fp32

    def loss(self, text: Tensor, codes: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy per modality (mean over that modality's targets), weighted 1/8 : 7/8."""
        text_logits, image_logits = self(text, codes)
        if self.cfg.text_len > 1:
            text_loss = F.cross_entropy(text_logits[:, :-1].reshape(-1, text_logits.shape[-1]), text[:, 1:].reshape(-1))
        else:
            text_loss = text_logits.sum() * 0.0  # no text targets
        image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), codes.reshape(-1))
        loss = self.cfg.text_loss_weight * text_loss + self.cfg.image_loss_weight * image_loss
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    @torch.no_grad()
    def prefix_logits(self, text: Tensor, codes_prefix: Tensor) -> Tensor:
        """Image logits (B, n+1, Vi) for a prefix of n codes; row n predicts code n.

        Runs the full stream with the missing codes set to 0: causality makes them invisible to
        slots 0..n (tested). A KV-cache sampler replaces this with incremental steps.
        """
        b, n = codes_prefix.shape
        if n >= self.cfg.image_len:
            raise ValueError(f"codes_prefix: at most {self.cfg.image_len - 1} codes, got {n}")
        codes = codes_prefix.new_zeros(b, self.cfg.image_len)
        codes[:, :n] = codes_prefix
        h = self.hidden(text, codes)
        t = self.cfg.text_len
        return self.image_head(h[:, t:t + n + 1])

    # ------------------------------------------------------------------ sizes

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        """Parameter count from the config alone (equals sum(p.numel()) of the built model)."""
        d, r, g, t = cfg.d_model, cfg.mlp_ratio, cfg.image_grid, cfg.text_len
        embed = (cfg.text_vocab_size + 2 * t + cfg.image_vocab_size + 2 * g + 1) * d
        attn = 2 * d + (3 * d * d + 3 * d) + (d * d + d)
        mlp = 2 * d + (r * d * d + r * d) + (r * d * d + d)
        heads = (cfg.text_vocab_size + cfg.image_vocab_size) * d
        return embed + cfg.n_layers * (attn + mlp) + 2 * d + heads

    @staticmethod
    def flops_per_sequence(cfg: ModelConfig, dense_attention: bool = False) -> int:
        """Training FLOPs (forward + backward = 3x forward) for one sequence.

        Matmuls only: projections, MLP, heads (text head on T rows, image head on N rows) and
        attention scores + weighted sum over the allowed (query, key) pairs of each layer's mask
        (``dense_attention``: over all S x S pairs, what the dense reference actually computes).
        """
        from dalle_ds.models.masks import build_mask

        d, s = cfg.d_model, cfg.seq_len
        per_token = cfg.n_layers * 2 * (4 + 2 * cfg.mlp_ratio) * d * d
        heads = 2 * d * (cfg.text_len * cfg.text_vocab_size + cfg.image_len * cfg.image_vocab_size)
        pairs = 0
        for kind in layer_kinds(cfg.n_layers, cfg.layer_pattern):
            pairs += s * s if dense_attention else int(build_mask(kind, cfg.text_len, cfg.image_grid,
                                                                  cfg.conv_kernel).sum())
        attn = 4 * d * pairs  # QK^T and PV: 2 * 2 * head_dim * heads per pair
        return 3 * (per_token * s + heads + attn)


def no_decay(name: str, param: nn.Parameter | None = None) -> bool:
    """Gains, biases and embeddings: no weight decay (paper App. B.2). Name-based, so it also
    works on ZeRO-3 partitioned parameters and with a ``module.`` prefix."""
    parts = name.split(".")
    return parts[-1] == "bias" or "ln" in parts or "ln_f" in parts or "embed" in parts


def keep_fp32(name: str, param: nn.Parameter | None = None) -> bool:
    """Gains, biases, embeddings and unembeddings: kept in fp32, never compressed (App. D, E)."""
    parts = name.split(".")
    return no_decay(name, param) or "text_head" in parts or "image_head" in parts
