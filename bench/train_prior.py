"""Training throughput of the prior: 2 ranks under DeepSpeed ZeRO-3 vs 1 process without DeepSpeed.

    python -m bench.train_prior [--configs tiny B 100M] [--steps 3] [--rounds 1]

Same model (same seed), same global batch: the single process trains on the whole batch with all
the machine's threads; the 2 ZeRO-3 ranks (gloo, launched like torchrun) take half the batch each
with half the threads. A step is forward + backward + AdamW update. Figures per config: median
seconds per step, training tokens/s, MFU against the recorded fp32 matmul peak (useful FLOPs:
``Prior.flops_per_sequence``, attention over the allowed pairs only) and the overhead ratio
``zero3_step_s / plain_step_s`` (aim <= 1.25). Because a 2-thread process suffers more from a
loaded machine than two 1-thread processes, also ``overhead_per_rank``: ZeRO-3 step time over one
process doing one rank's share (half the batch, half the threads) without DeepSpeed, i.e. the
time DeepSpeed adds (gathers, reduce-scatters, hooks) to the same per-rank compute. Rounds alternate plain / ZeRO-3 so machine load
hits both alike; the machine is shared, so figures are noisy.

Configs: ``tiny`` (the tiny preset, batch 8), ``B`` (64 text + 32x32 image tokens, width 512,
8 layers, 8 heads, batch 2, the paper's vocabularies), ``100M`` (10 layers, width 768, 12 heads,
64 text + 16x16 image tokens, batch 2; ~108M parameters). All fp32, dense masked attention
(the reference backend: the comparison is about DeepSpeed, not attention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def model_config(name: str):
    from dalle_ds.config import ModelConfig, load_config, replace

    if name == "tiny":
        return replace(load_config("tiny").model, attention="dense", activation_checkpointing=False), 8
    common = dict(mlp_ratio=4, text_len=64, text_vocab_size=16384, image_vocab_size=8192, attention="dense",
                  activation_checkpointing=False)
    if name == "B":
        return ModelConfig(n_layers=8, n_heads=8, d_model=512, image_grid=32, conv_kernel=11, **common), 2
    if name == "100M":
        return ModelConfig(n_layers=10, n_heads=12, d_model=768, image_grid=16, conv_kernel=11, **common), 2
    raise SystemExit(f"--configs: unknown config {name!r} (tiny, B, 100M)")


def _batch(cfg, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    codes = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_len), generator=g)
    return text, codes


def _time_steps(step, warmup: int, steps: int) -> dict[str, list[float]]:
    """Wall-clock and process CPU seconds (all threads) of each timed step."""
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu}


def worker_plain(name: str, warmup: int, steps: int, per_rank: bool = False) -> dict:
    import torch

    from dalle_ds.models.prior import Prior

    cfg, batch = model_config(name)
    if per_rank:  # one rank's share of the batch, one rank's share of the threads
        batch //= 2
    torch.manual_seed(0)
    model = Prior(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045)
    text, codes = _batch(cfg, batch)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model.loss(text, codes)
        loss.backward()
        opt.step()

    return {**_time_steps(step, warmup, steps), "threads": torch.get_num_threads()}


def worker_zero3(name: str, warmup: int, steps: int, ds_config: str | None = None) -> dict:
    import warnings

    import torch

    from dalle_ds.parallel.dist import init_distributed
    from dalle_ds.parallel.engine import OptimSpec, build_engine
    from dalle_ds.models.prior import Prior, no_decay

    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed")
    info = init_distributed()
    cfg, batch = model_config(name)
    torch.manual_seed(0)
    per_rank = batch // info.world_size
    spec = OptimSpec(per_rank, 1, 1e-4, (0.9, 0.96), 1e-8, 0.045)
    engine = build_engine(lambda: Prior(cfg), ds_config or ROOT / "ds_configs/zero3_fp32_cpu.json", spec,
                          no_decay=no_decay)
    text, codes = _batch(cfg, batch)
    mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)

    def step():
        loss, _ = engine(text[mine], codes[mine])
        engine.engine_step(loss)

    out = _time_steps(step, warmup, steps)
    cpu = torch.tensor(out["cpu"], dtype=torch.float64)
    torch.distributed.all_reduce(cpu)  # CPU seconds of both ranks together
    return {**out, "cpu": cpu.tolist(), "threads": torch.get_num_threads()}


def _run(kind: str, name: str, warmup: int, steps: int, threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_train_prior_")) / "result.json"
    # Passive OpenMP waits: a spinning thread would bill CPU time while its peer is descheduled.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "bench.train_prior", "--worker", kind, "--configs", name,
           "--warmup", str(warmup), "--steps", str(steps), "--out", str(out)]
    if kind in ("zero3", "rankshare"):
        env["OMP_NUM_THREADS"] = str(max(1, threads // 2))
    if kind == "zero3":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "bench.train_prior", *cmd[3:]]
    else:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{kind} {name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _free_port() -> int:
    from tests.multirank import free_port

    return free_port()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "B", "100M"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--worker", choices=["plain", "zero3", "rankshare"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # inside a measuring process
        if args.worker == "zero3":
            result = worker_zero3(args.configs[0], args.warmup, args.steps, os.environ.get("BENCH_DS_CONFIG"))
        else:
            result = worker_plain(args.configs[0], args.warmup, args.steps, per_rank=args.worker == "rankshare")
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        return

    from bench.harness import Recorder, figure, latest
    from dalle_ds.models.prior import Prior

    threads = os.cpu_count() or 1
    peak = figure(latest("matmul_peak"), "fp32_gflops")
    with Recorder("train_prior") as rec:
        rec.add("threads", threads, peak_fp32_gflops=peak)
        for name in args.configs:
            cfg, batch = model_config(name)
            kinds = ("plain", "zero3", "rankshare")
            times: dict[str, list[float]] = {k: [] for k in kinds}
            cpu: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.rounds):
                for kind in kinds:
                    result = _run(kind, name, args.warmup, args.steps, threads)
                    times[kind] += result["times"]
                    cpu[kind] += result.get("cpu", [])
            flops = Prior.flops_per_sequence(cfg) * batch
            details = dict(config=name, batch=batch, seq_len=cfg.seq_len, d_model=cfg.d_model, n_layers=cfg.n_layers,
                           params=Prior.num_params(cfg), steps=len(times["plain"]))
            step_s = {}
            for kind, label in (("plain", "1 process, no DeepSpeed"), ("zero3", "2 ranks ZeRO-3 (gloo)")):
                step_s[kind] = statistics.median(times[kind])
                rec.add(f"{name}_{kind}_step_s", step_s[kind], "s", setup=label, **details)
                rec.add(f"{name}_{kind}_tokens_per_s", batch * cfg.seq_len / step_s[kind], "tokens/s", **details)
                if peak:
                    rec.add(f"{name}_{kind}_mfu", flops / step_s[kind] / (peak * 1e9), "",
                            useful_gflop_per_step=flops / 1e9, **details)
            rec.add(f"{name}_zero3_overhead", step_s["zero3"] / step_s["plain"], "x", target=1.25, **details)
            step_s["rankshare"] = statistics.median(times["rankshare"])
            rec.add(f"{name}_rankshare_step_s", step_s["rankshare"], "s",
                    setup="1 process, no DeepSpeed, half the batch, half the threads (one rank's work)", **details)
            rec.add(f"{name}_zero3_overhead_per_rank", step_s["zero3"] / step_s["rankshare"], "x", **details)
            if all(cpu.values()):
                cpu_s = {k: statistics.median(v) for k, v in cpu.items()}
                rec.add(f"{name}_zero3_overhead_cpu_time", cpu_s["zero3"] / cpu_s["plain"], "x",
                        plain_cpu_s=cpu_s["plain"], zero3_cpu_s_both_ranks=cpu_s["zero3"], **details)


if __name__ == "__main__":
    main()
