"""Batched autoregressive sampling of image codes from the prior (paper §2.6, §3).

    codes = generate(prior, text, seeds, SamplingSettings(temperature=1.0, top_k=0, top_p=1.0))
    codes = generate(prior, text, seeds, settings, prompt_codes=codes_of_image[:, :rows * G])  # completion
    images = dvae.decode(codes)                                                               # (B, 3, H, W)

Randomness is per candidate: row i draws its noise from its own generator seeded with
``seeds[i]`` (Gumbel-max over the filtered logits), so a candidate depends only on its text,
prompt and seed, never on which batch it was sampled in, and with or without the cache.

Filtering: logits / temperature, then top-k (keep the k largest), then top-p (keep the smallest
set of largest-probability tokens whose mass reaches p; the most likely token is always kept).
``temperature=0`` is greedy decoding.

Classifier-free guidance (``guidance_scale`` s != 1; a departure from the paper, for priors trained
with ``data.caption_dropout`` > 0): every row is also decoded with the empty caption (all
``[PAD]``, what caption dropout trains on), both halves in one KV-cached batch of 2B fed the same
codes, and the sampled logits are ``uncond + s * (cond - uncond)`` before filtering. s = 1 is the
plain conditional model (no second half is run), s = 0 the unconditional one.

``use_cache=False`` recomputes the whole stream for every code (``Prior.prefix_logits``): the
reference the cache is tested and benchmarked against.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor

from dalle_ds.models.kv_cache import CachedDecoder
from dalle_ds.models.prior import PAD_ID, Prior

PAPER_PROMPT_ROWS, PAPER_GRID = 15, 32  # image completion keeps the top 15 of 32 rows


@dataclass
class SamplingSettings:
    temperature: float = 1.0  # paper: 1
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    guidance_scale: float = 1.0  # classifier-free guidance; 1: off (paper)

    def validate(self) -> "SamplingSettings":
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale}: must be >= 0 (1: off)")
        return self

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @staticmethod
    def add_args(ap: argparse.ArgumentParser) -> None:
        """--temperature, --top-k, --top-p (the sampling commands' shared flags)."""
        ap.add_argument("--temperature", type=float, default=1.0, help="logits / temperature (0: greedy)")
        ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (0: off)")
        ap.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this mass (1: off)")
        ap.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1: off; needs a prior trained with data.caption_dropout)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SamplingSettings":
        return cls(args.temperature, args.top_k, args.top_p, getattr(args, "guidance_scale", 1.0)).validate()


def default_prompt_rows(grid: int) -> int:
    """The paper's 15 of 32 rows, scaled to the grid (16 -> 7)."""
    return max(1, grid * PAPER_PROMPT_ROWS // PAPER_GRID)


def filter_logits(logits: Tensor, s: SamplingSettings) -> Tensor:
    """(B, V) logits -> temperature-scaled logits with the filtered-out tokens at -inf."""
    x = logits.float() / max(s.temperature, 1e-8)
    if s.top_k and s.top_k < x.shape[-1]:
        kth = x.topk(s.top_k, dim=-1).values[:, -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = (cum - sorted_x.softmax(-1)) >= s.top_p  # mass before this token already reaches p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


class Sampler:
    """Draws one token per row from filtered logits with per-row generators (Gumbel-max)."""

    def __init__(self, seeds: list[int], settings: SamplingSettings, device: torch.device):
        self.settings = settings.validate()
        self.gens = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            self.gens.append(g)

    def __call__(self, logits: Tensor) -> Tensor:
        x = filter_logits(logits, self.settings)  # (B, V)
        if self.settings.temperature == 0:
            return x.argmax(-1)
        u = torch.stack([torch.rand(x.shape[-1], generator=g, device=x.device) for g in self.gens])  # (B, V)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return (x + gumbel).argmax(-1)  # (B,)


@torch.no_grad()
def generate(prior: Prior, text: Tensor, seeds: list[int], settings: SamplingSettings | None = None,
             prompt_codes: Tensor | None = None, use_cache: bool = True, max_codes: int | None = None,
             progress: bool = False) -> Tensor:
    """Sample image codes (B, N) for text (B, T); the first n codes are ``prompt_codes`` (B, n).

    ``max_codes`` stops after that many codes in total (benchmarks); the rest stay 0.
    """
    cfg = prior.cfg
    b = text.shape[0]
    if len(seeds) != b:
        raise ValueError(f"seeds: need one per row, got {len(seeds)} for batch {b}")
    if prior.training:
        raise ValueError("generate: call prior.eval() first")
    device = next(prior.parameters()).device
    text = text.to(device)
    sampler = Sampler(seeds, settings or SamplingSettings(), device)
    n = 0 if prompt_codes is None else prompt_codes.shape[1]
    codes = torch.zeros(b, cfg.image_len, dtype=torch.long, device=device)  # (B, N)
    if n:
        codes[:, :n] = prompt_codes.to(device)
    end = cfg.image_len if max_codes is None else min(cfg.image_len, max_codes)
    steps = range(n, end)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling", unit="tok", leave=False)
    settings = sampler.settings
    if settings.guided:  # rows [0, B): the caption; rows [B, 2B): the empty caption, same codes
        text = torch.cat([text, torch.full_like(text, PAD_ID)])  # (2B, T)
    dec = CachedDecoder(prior, text.shape[0]) if use_cache else None
    for a in steps:
        if dec is None:
            both = codes.repeat(2, 1) if settings.guided else codes
            logits = prior.prefix_logits(text, both[:, :a])[:, a]  # (B or 2B, Vi)
        elif a == n:
            prompt = codes[:, :n] if n else None
            logits = dec.prefill(text, prompt.repeat(2, 1) if settings.guided and n else prompt)
        else:
            prev = codes[:, a - 1]
            logits = dec.step(prev.repeat(2) if settings.guided else prev)
        if settings.guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + settings.guidance_scale * (cond - uncond)  # (B, Vi)
        codes[:, a] = sampler(logits)
    return codes


def load_prior(export_dir: str, device: str | torch.device = "cpu", attention: str | None = None,
               dtype: torch.dtype | None = None) -> Prior:
    """A Prior in eval mode from an export or bundle folder (single or sharded safetensors, any dtype;
    dalle_ds.sampling.bundle), in ``dtype`` (default fp32)."""
    from dalle_ds.config import ModelConfig, _build
    from dalle_ds.sampling.bundle import load_weights

    state, cfg_dict = load_weights(export_dir)
    if attention:
        cfg_dict = {**cfg_dict, "attention": attention}
    cfg = _build(ModelConfig, cfg_dict, "model")
    cfg.activation_checkpointing = False
    prior = Prior(cfg)
    missing, unexpected = prior.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{export_dir}/model.safetensors does not fit the config in config.json: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return prior.to(device=device, dtype=dtype or torch.float32).eval()
