"""PowerSGD across nodes: bytes per step, compression rates, the paper's Table 1, step time on/off.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONPATH=. .venv/bin/python bench/powersgd.py [--steps 4]

1. Analytic (dalle_ds.plan, the same shard views as dalle_ds.parallel.powersgd): cross-node payload per GPU
   and step, exact fp32, exact fp16 and PowerSGD (a block is compressed only when P+Q beat fp16 exact),
   for the tiny preset and a ~100M model (paper preset with 12 layers,
   d 768) at several ranks, for node sizes 2 and 8; and Table 1 (1 - 5r/(8d)).
2. Measured: the tiny prior on 4 gloo ranks as 2 fake nodes x 2 (dalle_ds.parallel.engine + hierarchical_zero):
   median step time for flat ZeRO-3, hierarchical exact, PowerSGD at two ranks, and the cross-node
   bytes PowerSGD reports. The machine is a shared 2-core CPU: times are noisy and gloo on loopback says
   nothing about real inter-node links; the byte counts are exact.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.harness import Recorder
from dalle_ds import plan
from dalle_ds.config import load_config
from tests.multirank import run_ranks

PRESETS = {
    "tiny": ("tiny", []),
    "100M": ("paper", ["model.n_layers=12", "model.d_model=768", "model.n_heads=12"]),
}


def _measure(modes, steps):
    import dataclasses
    import warnings

    import torch

    from dalle_ds.parallel import hierarchy as hierarchical_zero
    from dalle_ds.parallel.dist import init_distributed
    from dalle_ds.parallel.engine import OptimSpec, build_engine
    from dalle_ds.models.prior import Prior, no_decay
    from tests.test_hierarchical_prior import synthetic_batch

    warnings.filterwarnings("ignore")
    init_distributed()
    cfg = load_config("tiny", ["model.attention=dense"])
    rank = torch.distributed.get_rank()
    out = {}
    for mode, psgd_rank in modes:
        pcfg = dataclasses.replace(cfg.powersgd, enabled=mode == "powersgd", hierarchical=mode != "flat",
                                   node_size=2, rank=psgd_rank, min_compression_numel=1024)
        hier = hierarchical_zero.from_config(pcfg, seed=cfg.run.seed)
        spec = OptimSpec(2, 1, 1e-3, (0.9, 0.96), 1e-8, 0.0)
        eng = build_engine(lambda: Prior(cfg.model), "ds_configs/zero3_fp32_cpu.json", spec, no_decay=no_decay,
                           **(hier.engine_kwargs() if hier else {}))
        times = []
        for step in range(steps + 1):  # the first step is warm-up
            torch.distributed.barrier()
            t0 = time.perf_counter()
            loss, _ = eng(*synthetic_batch(cfg.model, step, rank))
            eng.engine_step(loss)
            times.append(time.perf_counter() - t0)
        out[f"{mode}-r{psgd_rank}"] = {"step_s": statistics.median(times[1:]),
                                       "stats": hier.stats() if hier else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--analytic-only", action="store_true", help="skip the 4-rank measurement")
    args = ap.parse_args()
    with Recorder("powersgd") as rec:
        for _, d, r, paper in plan.PAPER_TABLE1:
            rec.add("table1_compression", plan.table1_compression(d, r), unit="fraction", d_model=d, rank=r,
                    paper=paper, formula="1-5r/(8d)")
        for name, (preset, overrides) in PRESETS.items():
            m = load_config(preset, overrides).model
            n = plan.param_count(m)
            for node_size in (2, 8):
                for r in (4, 16, 64, 256) if name == "tiny" else (16, 64, 192, 256):
                    c = plan.communication(m, node_size, 2, r, min_numel=1024)
                    rec.add("cross_node_bytes_per_step", c["cross_node_powersgd_bytes"], unit="B", preset=name,
                            params=n, node_size=node_size, rank=r, exact_bytes=c["cross_node_exact_bytes"],
                            exact_fp16_bytes=c["cross_node_exact_fp16_bytes"],
                            compression_rate=round(c["compression_rate"], 4),
                            compression_rate_vs_fp16=round(c["compression_rate_vs_fp16"], 4))
        m = load_config("paper").model
        c = plan.communication(m, 8, 128, 896)
        rec.add("paper_12B_cross_node_bytes_per_step", c["cross_node_powersgd_bytes"], unit="B", rank=896,
                node_size=8, exact_bytes=c["cross_node_exact_bytes"], exact_fp16_bytes=c["cross_node_exact_fp16_bytes"],
                compression_rate=round(c["compression_rate"], 4),
                compression_rate_vs_fp16=round(c["compression_rate_vs_fp16"], 4))
        if args.analytic_only:
            return

        modes = [("flat", 0), ("exact", 0), ("powersgd", 8), ("powersgd", 32)]
        results = run_ranks(_measure, 4, args=(modes, args.steps), node_size=2, timeout_s=900)
        for key in results[0]:
            step_s = max(r[key]["step_s"] for r in results)
            stats = results[0][key]["stats"] or {}
            rec.add("tiny_step_time", step_s, unit="s", mode=key, ranks="2 nodes x 2 (gloo, 2 shared cores)",
                    cross_node_bytes_per_step=[r[key]["stats"]["cross_node_bytes_per_step"] for r in results]
                    if stats else None, compression_rate=round(stats.get("compression_rate", 0.0), 4),
                    compression_rate_vs_fp16=round(stats.get("compression_rate_vs_fp16", 0.0), 4))


if __name__ == "__main__":
    main()
