"""Sampling speed: image tokens/s with and without the KV cache, and the reranking cost per candidate.

    python -m bench.sampling [--configs tiny 100M] [--device cpu|cuda] [--threads N]

Configs: ``tiny`` (the tiny preset: 4 layers, d 128, 32 text + 16x16 image tokens; batch 16),
``100M`` (the paper preset with 12 layers, d 768, 12 heads: 256 text + 32x32 image tokens, the paper's
vocabularies, ~120M parameters; batch 4). Randomly initialised weights (speed does not depend on them).

- ``cached``: prefill (text + SOI) and then one cached step per image token (``dalle_ds.models.kv_cache``);
  tokens/s = batch x tokens / seconds, prefill included; also the time per cached step alone.
- ``uncached``: the whole stream recomputed for every token (``Prior.prefix_logits``, sparse
  attention), for a few tokens only (each costs a full forward); the speed-up is the ratio of the two
  per-token rates.
- rerank: the project's small CLIP (dalle_ds/train_clip.py defaults, 64px) scoring 64 candidates
  against one caption, seconds per candidate; also the dVAE decode (tiny preset) per candidate.
The machine is shared (2 cores, other jobs running): CPU figures are noisy.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.harness import Recorder
from dalle_ds.config import load_config, replace
from dalle_ds.models.prior import Prior
from dalle_ds.sampling.generate import SamplingSettings, generate


def config(name: str):
    if name == "tiny":
        return replace(load_config("tiny").model, activation_checkpointing=False), 16, None, 32
    if name == "100M":
        m = load_config("paper", ["model.n_layers=12", "model.d_model=768", "model.n_heads=12"]).model
        return replace(m, activation_checkpointing=False, attention="sparse"), 4, 64, 4
    raise SystemExit(f"--configs: unknown config {name!r} (tiny, 100M)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_prior(rec: Recorder, name: str, device: torch.device, dtype: torch.dtype, batch: int | None = None,
                full: bool = False) -> None:
    cfg, default_batch, cached_tokens, uncached_tokens = config(name)
    batch = batch or default_batch
    cached_tokens = None if full else cached_tokens
    torch.manual_seed(0)
    prior = Prior(cfg).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in prior.parameters())
    text = torch.randint(3, cfg.text_vocab_size, (batch, cfg.text_len), device=device)
    seeds = list(range(batch))
    s = SamplingSettings()
    tokens = cached_tokens or cfg.image_len
    common = dict(config=name, params=n_params, batch=batch, device=str(device), dtype=str(dtype).replace("torch.", ""))

    generate(prior, text, seeds, s, max_codes=2)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    generate(prior, text, seeds, s, max_codes=1)
    _sync(device)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate(prior, text, seeds, s, max_codes=tokens)
    _sync(device)
    cached = time.perf_counter() - t0
    step = (cached - prefill) / max(1, tokens - 1)
    rec.add("cached_tokens_per_s", batch * tokens / cached, "image tokens/s", tokens=tokens, **common)
    rec.add("cached_step_ms", 1000 * step, "ms", **common)
    rec.add("prefill_ms", 1000 * prefill, "ms", **common)

    generate(prior, text, seeds, s, max_codes=1, use_cache=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    generate(prior, text, seeds, s, max_codes=uncached_tokens, use_cache=False)
    _sync(device)
    uncached = time.perf_counter() - t0
    rec.add("uncached_tokens_per_s", batch * uncached_tokens / uncached, "image tokens/s", tokens=uncached_tokens,
            **common)
    rec.add("cache_speedup", (batch * tokens / cached) / (batch * uncached_tokens / uncached), "x", **common)


def bench_rerank(rec: Recorder, device: torch.device, n: int = 64) -> None:
    import tempfile

    from dalle_ds.sampling.rerank import ClipScorer, ProjectClipProcessor
    from dalle_ds.models.dvae import DiscreteVAE
    from dalle_ds.train_clip import MEAN, STD, build_clip
    from tests.eval_fixtures import train_tokenizer, write_image_shards

    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        write_image_shards(Path(tmp) / "s", 64, size=16)
        tok = train_tokenizer(Path(tmp) / "s", Path(tmp) / "tok.json", 512)
        proc = ProjectClipProcessor(str(tok), 32, 64, MEAN, STD)
        scorer = ClipScorer(build_clip(proc), proc, device)
    images = torch.rand(n, 3, 64, 64, device=device)
    from dalle_ds.sampling.rerank import rerank

    rerank(scorer, images, "a red circle", 8)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        rerank(scorer, images, "a red circle above a blue square", 8)
    _sync(device)
    per = (time.perf_counter() - t0) / (3 * n)
    rec.add("rerank_ms_per_candidate", 1000 * per, "ms", model="train_clip default (0.9M params, 64px)",
            candidates=n, device=str(device))
    vae = DiscreteVAE(load_config("tiny").dvae).to(device).eval()
    codes = torch.randint(0, vae.cfg.codebook_size, (n, 16 * 16), device=device)
    vae.decode(codes[:4])
    _sync(device)
    t0 = time.perf_counter()
    vae.decode(codes)
    _sync(device)
    rec.add("dvae_decode_ms_per_candidate", 1000 * (time.perf_counter() - t0) / n, "ms", model="tiny dVAE, 64px",
            device=str(device))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "100M"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="override the configs' batch sizes")
    p.add_argument("--full", action="store_true", help="sample whole images with the cache (100M: 1024 tokens)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with Recorder("sampling") as rec:
        for name in args.configs:
            bench_prior(rec, name, device, getattr(torch, args.dtype), args.batch, args.full)
        if not args.no_rerank:
            bench_rerank(rec, device)


if __name__ == "__main__":
    main()
