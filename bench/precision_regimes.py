"""fp32-master against the 16-bit model-state regime (#14) on the tiny preset: same seed, same batches,
2 gloo ranks under DeepSpeed ZeRO-3, fp16 branches with block scaling in both.

    python -m bench.precision_regimes --steps 500 [--micro-batch 8] [--time-budget 1800] [--log-every 50]

Cost on a CPU: this CPU has no fp16 GEMM (2-core EPYC, one thread, tiny prior forward+backward: micro-batch
2 in fp32 0.10-0.18 s, under fp16 autocast 1.25-1.40 s, bf16 1.28-1.59 s; ``aten::mm`` is 69% of it), and
on the shared, loaded machine an update of 2 ranks took ~3.5 s at micro-batch 1 or 2 alike. The recorded
run (2026-12-02) used ``--micro-batch 1 --time-budget 2400``: 500 updates per regime in 1778 s (fp32
master) and 1520 s (16-bit). The preset (sequence, vocabularies, layers) is unchanged; only the
micro-batch, one thread per rank and no validation/sampling are the bench's.

fp32 master: zero3_fp16_v100.json (DeepSpeed in fp32, torch AdamW, 16 B/param); 16-bit:
zero3_fp16_v100_16bit.json + precision.branch_dtype=float16 (bf16 partitions, AdamW16 with stochastic
rounding, fp32 masters and moments for the fp32 set). Batches: captions of random tokens whose image
codes follow from the text (a learnable rule), a fresh batch per step, the same on both regimes.
Records per-step image loss curves (JSON + PNG via dalle_ds.training.curves), the final image loss (mean of the last
10% of steps), the relative gap, and skipped-step rates, in bench/results/. ``--time-budget`` (seconds per
regime) stops a run early on a slow machine; the steps actually run are recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.harness import RESULTS_DIR, Recorder
from dalle_ds.training.curves import write_comparison_curve
from tests.multirank import run_ranks

DS_DIR = Path(__file__).resolve().parent.parent / "dalle_ds" / "ds_configs"
REGIMES = {"fp32_master": "zero3_fp16_v100.json", "16bit": "zero3_fp16_v100_16bit.json"}


def _batch(step: int, rank: int, b: int, m) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    text = torch.randint(1, m.text_vocab_size, (b, m.text_len), generator=g)
    base = (text[:, :4].sum(1, keepdim=True) * 7) % m.image_vocab_size  # the caption picks the codes
    pos = torch.arange(m.image_len)[None, :]
    noise = torch.randint(0, 4, (b, m.image_len), generator=g)
    codes = (base + (pos % 16) * (text[:, 4:5] % 5 + 1) + noise) % m.image_vocab_size
    return text, codes


def _run(regime: str, steps: int, micro_batch: int, budget: float, log_every: int) -> dict:
    from dalle_ds.config import load_config
    from dalle_ds.models.prior import Prior, keep_fp32, no_decay
    from dalle_ds.parallel import block_scaling as precision
    from dalle_ds.parallel.dist import all_reduce_values, init_distributed
    from dalle_ds.parallel.engine import OptimSpec, build_engine
    from dalle_ds.plan import resolve_mode

    init_distributed()
    torch.set_num_threads(1)
    rank = torch.distributed.get_rank()
    cfg = load_config("tiny", ["precision.allow_fp16_on_cpu=true", "precision.branch_dtype=float16",
                               f"optim.micro_batch_size={micro_batch}"])
    mode, ds = resolve_mode(json.loads((DS_DIR / REGIMES[regime]).read_text()), cfg.precision)
    torch.manual_seed(cfg.run.seed)
    eng = build_engine(lambda: Prior(cfg.model), ds, OptimSpec.from_optim(cfg.optim), no_decay=no_decay,
                       keep_fp32=keep_fp32, seed=cfg.run.seed)
    scaler = precision.attach(eng.model, cfg.precision)
    precision.install(eng, scaler)
    from dalle_ds.training.schedules import prior_lr_schedule

    sched = prior_lr_schedule(cfg.optim)
    image, total, t0 = [], [], time.perf_counter()
    for step in range(steps):
        eng.set_lr(sched.lr)
        eng.set_grad_clip(sched.grad_clip)
        text, codes = _batch(step, rank, micro_batch, cfg.model)
        loss, parts = eng(text, codes)
        eng.engine_step(loss)
        lv, iv = all_reduce_values([float(loss.detach()), float(parts["image_loss"])])
        total.append(lv / 2)
        image.append(iv / 2)
        sched.step(total[-1])  # identical on every rank (averaged), as train.py does
        if rank == 0 and (step + 1) % log_every == 0:
            print(f"{regime}: update {step + 1}/{steps} image loss {image[-1]:.4f} skipped {eng.skipped_updates} "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if (step + 1) % 10 == 0 and all_reduce_values([float(time.perf_counter() - t0 > budget)], "max")[0]:
            break
    return {"mode": mode, "image_loss": image, "loss": total, "steps": len(image),
            "skipped": eng.skipped_updates, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--time-budget", type=float, default=1800.0, help="seconds per regime (stops early)")
    ap.add_argument("--log-every", type=int, default=50, help="progress line on stderr every N updates")
    args = ap.parse_args(argv)
    out: dict[str, dict] = {}
    for regime in REGIMES:
        out[regime] = run_ranks(_run, world_size=2, args=(regime, args.steps, args.micro_batch, args.time_budget,
                                                                 args.log_every),
                                timeout_s=args.time_budget + 600, extra_env={"OMP_NUM_THREADS": "1"})[0]
    n = min(r["steps"] for r in out.values())
    tail = max(1, n // 10)
    final = {k: sum(r["image_loss"][n - tail:n]) / tail for k, r in out.items()}
    gap = (final["16bit"] - final["fp32_master"]) / final["fp32_master"]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = RESULTS_DIR / f"precision_regimes-{time.strftime('%Y%m%d')}.png"
    write_comparison_curve(png, "tiny prior, image loss per update (nats/token), 2 gloo ranks",
                           {k: r["image_loss"][:n] for k, r in out.items()})
    with Recorder("precision_regimes") as rec:
        for k, r in out.items():
            rec.add(f"{k}_final_image_loss", final[k], "nats", steps=n, requested_steps=args.steps, mode=r["mode"],
                    mean_of_last=tail, seconds=round(r["seconds"], 1))
            rec.add(f"{k}_skipped_step_rate", r["skipped"] / r["steps"], "", skipped=r["skipped"], steps=r["steps"])
        rec.add("16bit_vs_fp32_master_final_image_loss_gap", gap, "relative", within_2_percent=abs(gap) <= 0.02)
        rec.add("curves", 0, "", png=png.name, image_loss={k: r["image_loss"] for k, r in out.items()},
                micro_batch=args.micro_batch, preset="tiny")
    print(f"final image loss: fp32 master {final['fp32_master']:.4f}, 16-bit {final['16bit']:.4f} "
          f"({100 * gap:+.2f}%) after {n} updates; curves {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
