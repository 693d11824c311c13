"""fp16 with per-resblock gradient scaling vs fp32 (and bf16 on CUDA): step time and skipped-step rate.

    python -m bench.precision [--config tiny] [--steps 6] [--warmup 1] [--modes fp32,fp16]

One process through dalle_ds.parallel.engine (DeepSpeed ZeRO-3, world size 1), the prior of the preset,
random tokens of the preset's shapes (the figures are about arithmetic, not data). Modes:
``fp32`` (ds_configs/zero3_fp32_cpu.json), ``fp16`` (ds_configs/zero3_fp16_v100.json: block
scaling, DeepSpeed in fp32 mode, branches in fp16), ``bf16`` (ds_configs/zero3_bf16.json).
Default modes: fp32,fp16 on CPU; fp32,bf16,fp16 on CUDA. The machine here is shared: noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.harness import Recorder

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = {"fp32": "zero3_fp32_cpu.json", "fp16": "zero3_fp16_v100.json", "bf16": "zero3_bf16.json"}


def run_mode(mode: str, cfg, steps: int, warmup: int) -> dict:
    from dalle_ds.parallel import block_scaling as precision
    from dalle_ds.config import replace
    from dalle_ds.parallel.engine import OptimSpec, build_engine, load_ds_config
    from dalle_ds.models.prior import Prior, no_decay

    pcfg = replace(cfg.precision, allow_fp16_on_cpu=True)
    resolved_mode, ds = precision.resolve_ds_config(load_ds_config(ROOT / "ds_configs" / DS_CONFIGS[mode]), pcfg)
    torch.manual_seed(cfg.run.seed)
    eng = build_engine(lambda: Prior(cfg.model), ds, OptimSpec.from_optim(cfg.optim), no_decay=no_decay,
                       allow_fp16_on_cpu=True)
    scaler = None
    if resolved_mode == "fp16_block":
        scaler = precision.attach(eng.model, pcfg, data_parallel_size=1)
        precision.install(eng, scaler)
    m, b = cfg.model, cfg.optim.micro_batch_size
    device = eng.ds.device
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for i in range(warmup + steps):
        text = torch.randint(1, m.text_vocab_size, (b, m.text_len), generator=gen).to(device)
        codes = torch.randint(0, m.image_vocab_size, (b, m.image_len), generator=gen).to(device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = eng(text, codes)
        eng.engine_step(loss)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    out = {"mode": resolved_mode, "step_s": statistics.median(times), "skipped": eng.skipped_updates,
           "updates": warmup + steps, "first_loss": losses[0], "last_loss": losses[-1],
           "tokens_per_step": b * m.seq_len}
    if scaler is not None:
        out["scale_log2_median"] = scaler.stats()["precision/scale_log2_median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default=None, help="comma list of fp32, fp16, bf16")
    args = parser.parse_args()

    from dalle_ds.config import load_config
    from dalle_ds.parallel.dist import init_distributed

    cfg = load_config(args.config)
    init_distributed()
    modes = args.modes.split(",") if args.modes else (["fp32", "bf16", "fp16"] if torch.cuda.is_available()
                                                      else ["fp32", "fp16"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with Recorder("precision") as rec:
        base = None
        for mode in modes:
            r = run_mode(mode, cfg, args.steps, args.warmup)
            base = base or r["step_s"]
            common = dict(device=device, config=args.config, steps=args.steps, warmup=args.warmup,
                          threads=torch.get_num_threads(), micro_batch=cfg.optim.micro_batch_size,
                          seq_len=cfg.model.seq_len)
            rec.add(f"{mode}_step_s", r["step_s"], "s", **common)
            rec.add(f"{mode}_tokens_per_s", r["tokens_per_step"] / r["step_s"], "tokens/s", **common)
            rec.add(f"{mode}_step_time_vs_{modes[0]}", r["step_s"] / base, "x", **common)
            rec.add(f"{mode}_skipped_step_rate", r["skipped"] / r["updates"], "fraction",
                    skipped=r["skipped"], updates=r["updates"], first_loss=round(r["first_loss"], 4),
                    last_loss=round(r["last_loss"], 4), **common)
            if "scale_log2_median" in r:
                rec.add("fp16_scale_log2_median", r["scale_log2_median"], "log2", **common)


if __name__ == "__main__":
    main()
