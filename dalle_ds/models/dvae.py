"""The discrete VAE of DALL·E stage 1 (paper §2.1, App. A; openai/DALL-E's released layout).

Encoder: 7x7 conv, ``group_count`` groups of bottleneck resblocks with widths 1, 2, 4, ... x n_hid,
max-pool after every group but the last, ReLU + 1x1 conv to ``codebook_size`` logits (fp32).
Decoder: 1x1 conv from the (soft) one-hot codes to ``n_init``, groups of widths ..., 2, 1 x n_hid,
nearest x2 upsample after every group but the last, ReLU + 1x1 conv to 2*channels (mu, ln b).
Resblock output = skip(x) + post_gain * res(x), post_gain = 1 / n_layers^2.

Module names follow OpenAI's (``blocks.group_1.block_1.res_path.conv_1``) so their weights map
one to one (``dalle_ds.convert_openai_dvae``). The encoder sees *mapped* pixels, as theirs does.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ds.config import DVAEConfig
from dalle_ds.models.dvae_loss import PAPER_LOSS, DVAELossSpec, dvae_loss, gumbel_softmax, map_pixels, unmap_pixels


def _conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    """Conv with 'same' padding, weights ~ N(0, 1/fan_in), zero bias (OpenAI's init)."""
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    nn.init.normal_(conv.weight, std=1.0 / math.sqrt(n_in * kw * kw))
    nn.init.zeros_(conv.bias)
    return conv


class Fp32Conv(nn.Module):
    """A 1x1 conv kept in fp32 under autocast (encoder logits, decoder input from the codes)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = _conv(n_in, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.conv(x.float())


class ResBlock(nn.Module):
    """Bottleneck resblock (hidden = n_out / 4); ``kernels`` are the residual path's conv widths."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


ENCODER_KERNELS = (3, 3, 3, 1)  # paper: ReLU-3x3 x3 then ReLU-1x1
DECODER_KERNELS = (1, 3, 3, 3)  # paper: 1x1 then 3x3 x3


def _group(widths_in_out: list[tuple[int, int]], n_layers: int, kernels, resize: nn.Module | None,
           resize_name: str) -> nn.Sequential:
    layers = [(f"block_{i + 1}", ResBlock(a, b, n_layers, kernels)) for i, (a, b) in enumerate(widths_in_out)]
    if resize is not None:
        layers.append((resize_name, resize))
    return nn.Sequential(OrderedDict(layers))


class Encoder(nn.Module):
    """Mapped pixels (B, C, H, W) -> fp32 logits (B, K, H/d, W/d), d = 2**(group_count-1)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        g, n = cfg.group_count, cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**i for i in range(g)]  # 1, 2, 4, 8 x n_hid
        blocks: list[tuple[str, nn.Module]] = [("input", _conv(cfg.channels, widths[0], 7))]
        prev = widths[0]
        for i, w in enumerate(widths):
            io = [(prev if j == 0 else w, w) for j in range(n)]
            pool = nn.MaxPool2d(kernel_size=2) if i < g - 1 else None
            blocks.append((f"group_{i + 1}", _group(io, g * n, ENCODER_KERNELS, pool, "pool")))
            prev = w
        blocks.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Fp32Conv(prev, cfg.codebook_size))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, K, h, w) fp32


class Decoder(nn.Module):
    """Codes as (soft) one-hot (B, K, h, w) -> statistics (B, 2C, H, W): mu then ln b."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        g, n = cfg.group_count, cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**i for i in reversed(range(g))]  # 8, 4, 2, 1 x n_hid
        blocks: list[tuple[str, nn.Module]] = [("input", Fp32Conv(cfg.codebook_size, cfg.n_init))]
        prev = cfg.n_init
        for i, w in enumerate(widths):
            io = [(prev if j == 0 else w, w) for j in range(n)]
            up = nn.Upsample(scale_factor=2, mode="nearest") if i < g - 1 else None
            blocks.append((f"group_{i + 1}", _group(io, g * n, DECODER_KERNELS, up, "upsample")))
            prev = w
        blocks.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", _conv(prev, 2 * cfg.channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)  # (B, 2C, H, W)


class DiscreteVAE(nn.Module):
    """Encoder + decoder + the relaxed ELBO. Images are float (B, C, H, W) in [0, 1]."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.export_meta: dict = {}  # config.json + dvae_hash when loaded by dalle_ds.models.dvae_io.load_dvae
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    # ------------------------------------------------------------------ checks
    def check_images(self, images: torch.Tensor) -> None:
        c, d = self.cfg.channels, self.cfg.downsample
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != c:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a (B, {c}, H, W) tensor, got shape {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images: expected a floating dtype with values in [0, 1], got {images.dtype}")
        h, w = images.shape[-2:]
        if h % d or w % d:
            raise ValueError(f"images: H and W must be divisible by the downsampling factor {d}, got {h}x{w}")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0 or math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"images: values must lie in [0, 1], got min {lo:.4g} max {hi:.4g}")

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or row-major (B, h*w) with a square grid -> (B, h, w) int64."""
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dim() not in (2, 3):
            desc = (f"shape {tuple(codes.shape)} dtype {codes.dtype}" if isinstance(codes, torch.Tensor)
                    else type(codes).__name__)
            raise ValueError(f"codes: expected an integer (B, h, w) or (B, h*w) tensor, got {desc}")
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"codes: (B, N) needs a square grid, N={codes.shape[1]} is not a square")
            codes = codes.view(codes.shape[0], side, side)
        k = self.cfg.codebook_size
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"codes: values must lie in [0, {k}), got min {lo} max {hi}")
        return codes.long()

    # ------------------------------------------------------------------ inference
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.encoder(map_pixels(images.float()))  # (B, K, h, w) fp32

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> codes (B, H/d, W/d) int64 (argmax, no noise)."""
        return self.logits(images).argmax(dim=1)  # (B, h, w)

    def decode_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.decoder(z).float()  # (B, 2C, H, W)
        c = self.cfg.channels
        return stats[:, :c], stats[:, c:]  # mu, ln b

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) or (B, h*w) -> images (B, C, H, W) in [0, 1]."""
        codes = self.check_codes(codes)
        z = F.one_hot(codes, self.cfg.codebook_size).permute(0, 3, 1, 2).float()  # (B, K, h, w)
        mu, _ = self.decode_stats(z)
        return unmap_pixels(torch.sigmoid(mu))

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, tau: float, beta: float, generator: torch.Generator | None = None,
                loss_spec: DVAELossSpec = PAPER_LOSS) -> tuple[torch.Tensor, dict]:
        """Relaxed ELBO per pixel. Returns (loss, terms) with detached diagnostics in ``terms``."""
        logits = self.logits(images)  # (B, K, h, w)
        z = gumbel_softmax(logits, tau, dim=1, generator=generator)  # (B, K, h, w)
        mu, ln_b = self.decode_stats(z)  # (B, C, H, W) each
        loss, terms = dvae_loss(map_pixels(images.float()), mu, ln_b, logits, beta, loss_spec)
        with torch.no_grad():
            terms["recon"] = unmap_pixels(torch.sigmoid(mu.detach()))
            terms["codes"] = logits.detach().argmax(dim=1)
        return loss, terms


# ---------------------------------------------------------------------- export format
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"


def save_dvae(vae: DiscreteVAE, out_dir: str, extra: dict | None = None) -> dict:
    """Write ``model.safetensors`` + ``config.json`` (config, sha256 of the weights, ``extra``) to a folder."""
    import dataclasses
    import hashlib
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, EXPORT_WEIGHTS)
    state = {k: v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()}
    save_file(state, weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    with open(weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    meta = {"dvae": dataclasses.asdict(vae.cfg), "weights_sha256": digest, **(extra or {})}
    with open(os.path.join(out_dir, EXPORT_CONFIG) + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out_dir, EXPORT_CONFIG) + ".tmp", os.path.join(out_dir, EXPORT_CONFIG))
    return meta
