"""Fast (block-sparse) attention vs the dense masked reference: training speed of the prior.

    python -m bench.attention [--configs tiny B] [--repeat 5] [--threads N]

For each config, both backends train the same model (same seed, same batch) side by side in one
run; rounds alternate between them so machine load hits both alike. Two step kinds:
``fwd_bwd`` (forward + backward: where the backends differ) and ``step`` (plus a fused AdamW
update). Figures: seconds per step (median), training tokens/s, the speed-up sparse / dense,
and MFU against the recorded matmul peak (bench/matmul_peak.py). MFU counts useful FLOPs: matmuls plus attention over the *allowed* (query, key) pairs only, the
same numerator for both backends; ``dense_hw_mfu`` also counts the masked pairs the dense
reference computes. Also the attention call alone (forward + backward) per layer type.

Config B: 64 text + 32x32 image tokens, d_model 512, 8 layers, 8 heads, batch 2, fp32, with the
paper's vocabularies (16,384 text, 8,192 image) and 11x11 conv attention in the last layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import Recorder, figure, latest
from dalle_ds.models.attention import build_backend
from dalle_ds.models.masks import KINDS
from dalle_ds.config import ModelConfig, load_config, replace
from dalle_ds.models.prior import Prior

CONFIG_B = ModelConfig(n_layers=8, n_heads=8, d_model=512, mlp_ratio=4, text_len=64, text_vocab_size=16384,
                       image_grid=32, image_vocab_size=8192, conv_kernel=11, attention="dense",
                       activation_checkpointing=False)


def configs() -> dict[str, tuple[ModelConfig, int]]:
    tiny = replace(load_config("tiny").model, activation_checkpointing=False)
    return {"tiny": (tiny, 8), "B": (CONFIG_B, 2)}


def _batch(cfg: ModelConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    text[:, cfg.text_len // 2:] = 0  # padded tail
    codes = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_len), generator=g)
    return text, codes


def _trainer(cfg: ModelConfig, backend: str, batch: int, optimizer: bool):
    """One training step: forward + backward (+ a fused AdamW step when ``optimizer``)."""
    torch.manual_seed(0)
    model = Prior(replace(cfg, attention=backend)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if optimizer else None
    text, codes = _batch(cfg, batch)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(text, codes)
        loss.backward()
        if opt is not None:
            opt.step()

    return step


def _attention_call(cfg: ModelConfig, backend: str, kind: str, batch: int):
    att = build_backend(backend, kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel)
    g = torch.Generator().manual_seed(0)
    shape = (batch, cfg.n_heads, cfg.seq_len, cfg.head_dim)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))

    def call() -> None:
        out = att(q, k, v)
        out.backward(torch.ones_like(out))

    return call


def _side_by_side(fns: dict, repeat: int, warmup: int = 1) -> dict:
    """Median seconds per call of each fn, measured in alternating rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["tiny", "B"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = figure(latest("matmul_peak"), "fp32_gflops")
    if peak is None:
        print("no bench/results/matmul_peak-cpu-*.json: run python -m bench.matmul_peak first; MFU left out")
    all_configs = configs()
    with Recorder("attention" if not args.threads else f"attention-threads{args.threads}") as rec:
        rec.add("threads", torch.get_num_threads(), "", peak_fp32_gflops=peak, load_avg=_load())
        for name in args.configs:
            cfg, batch = all_configs[name]
            tokens = batch * cfg.seq_len
            info = dict(config=name, batch=batch, seq_len=cfg.seq_len, d_model=cfg.d_model, n_layers=cfg.n_layers,
                        params=Prior.num_params(cfg))
            fns = {(b, mode): _trainer(cfg, b, batch, optimizer=(mode == "step"))
                   for mode in ("fwd_bwd", "step") for b in ("dense", "sparse")}
            secs = _side_by_side(fns, args.repeat)
            useful = Prior.flops_per_sequence(cfg) * batch
            dense_hw = Prior.flops_per_sequence(cfg, dense_attention=True) * batch
            for (b, mode), s in secs.items():
                rec.add(f"{name}_{b}_{mode}_s", s, "s", **info)
                rec.add(f"{name}_{b}_{mode}_tokens_per_s", tokens / s, "tokens/s", **info)
                if peak:
                    rec.add(f"{name}_{b}_{mode}_mfu", useful / s / 1e9 / peak, "",
                            useful_gflop_per_step=round(useful / 1e9, 2), **info)
            for mode in ("fwd_bwd", "step"):
                if peak:
                    rec.add(f"{name}_dense_{mode}_hw_mfu", dense_hw / secs["dense", mode] / 1e9 / peak, "",
                            dense_gflop_per_step=round(dense_hw / 1e9, 2), **info)
                rec.add(f"{name}_sparse_speedup_{mode}", secs["dense", mode] / secs["sparse", mode], "x",
                        target=1.3, **info)
            for kind in KINDS:
                att = _side_by_side({b: _attention_call(cfg, b, kind, batch) for b in ("dense", "sparse")},
                                    args.repeat)
                rec.add(f"{name}_{kind}_attention_speedup", att["dense"] / att["sparse"], "x",
                        dense_ms=round(att["dense"] * 1e3, 2), sparse_ms=round(att["sparse"] * 1e3, 2), **info)


if __name__ == "__main__":
    main()
