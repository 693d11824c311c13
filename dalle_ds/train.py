"""Train the transformer prior under DeepSpeed ZeRO-3.

    deepspeed --num_gpus 2 dalle_ds/train.py --deepspeed_config ds_configs/zero3_fp32_cpu.json --config tiny
    torchrun --nproc_per_node 2 dalle_ds/train.py --deepspeed_config ds_configs/zero3_fp32_cpu.json \\
        --config tiny optim.max_steps=100 run.dir=runs/try
    srun python dalle_ds/train.py ...            (dalle_ds.parallel.dist maps the SLURM variables)

Reads top to bottom: config -> dist -> data -> model -> engine -> loop. Resumes from
``<run.dir>/checkpoints/latest`` when present; SIGTERM/SIGUSR1 checkpoint and exit with code 75.
Logs (rank 0) to stdout, ``<run.dir>/metrics.jsonl`` and TensorBoard (``<run.dir>/tb``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # `deepspeed dalle_ds/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as torch_dist

from dalle_ds.parallel.checkpoint import EXIT_CHECKPOINTED, Checkpointer, clear_run_markers, write_run_marker
from dalle_ds.config import Config, ModelConfig, load_config
from dalle_ds.parallel.dist import DistInfo, init_distributed, print0
from dalle_ds.parallel.engine import Engine, OptimSpec, build_engine, load_ds_config
from dalle_ds.training.schedules import WarmupPlateauLR

# Called every logging.image_every_steps as fn(step, engine) on every rank (ZeRO-3 parameters
# are partitioned: gather them, e.g. with deepspeed.zero.GatheredParameters). Samples grids come
# with dalle_ds/sampling/generate.py; until then the list is empty.
SampleHook = Callable[[int, Engine], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the DALL-E prior under DeepSpeed ZeRO-3.")
    p.add_argument("--config", default="tiny", help="preset name (dalle_ds/configs) or YAML path")
    p.add_argument("--deepspeed_config", required=True, help="static DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initialisation (zero.Init also broadcasts from rank 0)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token of the prior (matmuls, attention over the allowed pairs only)."""
    from dalle_ds.models.prior import Prior

    return Prior.flops_per_sequence(m) / m.seq_len


def matmul_peak_flops(dtype: str) -> float | None:
    """Recorded matmul peak of one device (CPU: the whole machine) in FLOP/s, or None."""
    from bench.harness import figure, latest

    device = "gpu" if torch.cuda.is_available() else "cpu"
    gflops = figure(latest("matmul_peak", device), f"{dtype}_gflops")
    return None if gflops is None else gflops * 1e9


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/statm") as f:  # resident pages
        return int(f.read().split()[1]) * 4096 / 2**20


class TrainLog:
    """Rank-0 stdout / metrics.jsonl / TensorBoard; throughput over each logging window."""

    def __init__(self, cfg: Config, info: DistInfo, dtype: str):
        self.cfg, self.info = cfg, info
        self.every = cfg.logging.every_steps
        self.tokens_per_step = (cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * info.world_size
                                * cfg.model.seq_len)
        self.flops_per_token = model_flops_per_token(cfg.model)
        peak = matmul_peak_flops(dtype)
        devices = info.world_size if torch.cuda.is_available() else max(1, info.world_size // info.local_world_size)
        self.peak_total = None if peak is None else peak * devices
        self.writer = None
        self.jsonl = None
        if info.is_main:
            run = Path(cfg.run.dir)
            run.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run / "metrics.jsonl", "a")
            if cfg.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run / "tb"))
        self._t0 = time.perf_counter()
        self._steps = 0

    def step(self, step: int, values: dict[str, float]) -> None:
        """Called on every rank each step (the memory gather is collective on logging steps)."""
        self._steps += 1
        row = {"step": step, **values}
        if step % self.every == 0:
            dt = time.perf_counter() - self._t0
            tokens_s = self.tokens_per_step * self._steps / dt
            row.update(tokens_per_s=tokens_s, flops_per_s=tokens_s * self.flops_per_token,
                       step_time_s=dt / self._steps)
            if self.peak_total:
                row["mfu"] = row["flops_per_s"] / self.peak_total
            mem = torch.tensor([memory_mb()])
            if torch_dist.is_initialized() and self.info.world_size > 1:
                gathered = [torch.zeros(1) for _ in range(self.info.world_size)]
                torch_dist.all_gather(gathered, mem)
                mem = torch.cat(gathered)
            row["memory_mb"] = [round(float(m), 1) for m in mem]
            self._t0, self._steps = time.perf_counter(), 0
            mfu = f" mfu {row['mfu']:.1%}" if "mfu" in row else ""
            print0(f"step {step} loss {values['loss']:.4f} text {values['text_loss']:.4f} image "
                   f"{values['image_loss']:.4f} lr {values['lr']:.3g} {tokens_s:,.0f} tok/s "
                   f"{row['flops_per_s'] / 1e9:.1f} GFLOP/s{mfu} mem/rank {max(row['memory_mb']):.0f} MB")
        if self.jsonl:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self.writer:
            for k, v in row.items():
                if k == "memory_mb":
                    for r, m in enumerate(v):
                        self.writer.add_scalar(f"memory_mb/rank{r}", m, step)
                elif k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()


def mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t)
        t /= torch_dist.get_world_size()
    return t.tolist()


def train(cfg: Config, ds_config_path: str, sample_hooks: list[SampleHook] | None = None) -> int:
    """The whole run; returns the process exit code (0, or 75 after a signal checkpoint)."""
    from dalle_ds.parallel import hierarchy as hierarchical_zero
    from dalle_ds.parallel import block_scaling as precision
    from dalle_ds.data.loaders import TokenShardLoader, check_token_manifest
    from dalle_ds.models.prior import Prior, no_decay
    from dalle_ds.data.tokenizer import TextTokenizer

    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed")
    # -- dist
    info = init_distributed()
    seed_everything(cfg.run.seed)
    print0(f"train: {info.world_size} ranks via {info.launcher}, run dir {cfg.run.dir}")

    # -- data
    m = cfg.model
    from dalle_ds.models.dvae_io import dvae_hash

    # refuse tokens made by another dVAE (hash) or for another grid / codebook
    check_token_manifest(cfg.data.token_shards, m.image_grid, m.image_vocab_size,
                         expected_dvae_hash=dvae_hash(cfg.data.dvae) if cfg.data.dvae else None)
    tokenizer = TextTokenizer.from_file(cfg.data.tokenizer, m.text_len, m.text_vocab_size)
    loader = TokenShardLoader(cfg.data.token_shards, cfg.optim.micro_batch_size, tokenizer=tokenizer,
                              grid=m.image_grid, codebook_size=m.image_vocab_size,
                              bpe_dropout=cfg.data.bpe_dropout, num_workers=cfg.data.num_workers,
                              seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer)
    tokens_per_step = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * info.world_size * m.seq_len
    print0(f"train: {m.text_len} text + {m.image_len} image = {m.seq_len} tokens/sample, "
           f"{tokens_per_step:,} tokens per update, {len(loader.urls)} token shards")

    # -- model + engine (precision decides what DeepSpeed itself sees; PowerSGD where ZeRO partitions)
    mode, ds_config = precision.resolve_ds_config(load_ds_config(ds_config_path), cfg.precision)
    hierarchy = None
    if hierarchical_zero.is_enabled(cfg.powersgd):  # ZeRO-3 inside node groups, averaged across nodes
        hierarchy = hierarchical_zero.setup(cfg.powersgd, seed=cfg.run.seed)
        print0(f"train: ZeRO-3 inside nodes of {hierarchy.groups.node_size} ranks, {hierarchy.groups.num_nodes} nodes, "
               f"cross-node average: {'PowerSGD rank ' + str(cfg.powersgd.rank) if cfg.powersgd.enabled else 'exact fp32'}")
    engine = build_engine(lambda: Prior(m), ds_config, OptimSpec.from_optim(cfg.optim), no_decay=no_decay,
                          zero_partition_group=hierarchy.groups.intra if hierarchy else None,
                          before_initialize=[lambda model, _: hierarchical_zero.mark_params(model)] if hierarchy else [],
                          after_initialize=[hierarchy.attach] if hierarchy else [],
                          fixed_fp16_loss_scale=(mode != "fp16"),
                          allow_fp16_on_cpu=cfg.precision.allow_fp16_on_cpu, run_dir=cfg.run.dir, run_config=cfg)
    sched = WarmupPlateauLR.from_optim(cfg.optim)
    ckpt = Checkpointer.from_config(engine, cfg.run.dir, cfg.checkpoint)
    ckpt.register_stateful("schedule", sched)
    ckpt.register_stateful("data", loader)
    if hierarchy:
        ckpt.register_stateful("powersgd", hierarchy)  # per rank: error buffers of its own shards
    scaler = None
    if mode == "fp16_block":
        scaler = precision.attach(engine.model, cfg.precision, info.world_size)
        precision.install(engine, scaler)  # skip vote = agreed overflow flags; scales updated after the step
        ckpt.register_stateful("precision", scaler)

    step = 0
    clear_run_markers(cfg.run.dir)
    if cfg.checkpoint.resume:
        state = ckpt.resume()
        step = state["step"] if state else 0

    # -- loop
    log = TrainLog(cfg, info, "bf16" if mode == "bf16" else "fp32")
    batches = iter(loader)
    progress = None
    if info.is_main and cfg.logging.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=cfg.optim.max_steps, initial=step, desc="train", file=sys.stderr)
    while step < cfg.optim.max_steps:
        engine.set_lr(sched.lr)
        engine.set_grad_clip(sched.grad_clip)
        sums = [0.0, 0.0, 0.0]
        for _ in range(cfg.optim.grad_accum_steps):
            batch = next(batches)
            loss, parts = engine(batch["text"], batch["codes"])  # (,) fp32
            sums[0] += float(loss.detach())
            sums[1] += float(parts["text_loss"])
            sums[2] += float(parts["image_loss"])
            applied = engine.engine_step(loss)
        step += 1
        loss_avg, text_avg, image_avg = mean_over_ranks([s / cfg.optim.grad_accum_steps for s in sums])
        lr = sched.lr
        if applied:
            sched.step(loss_avg)  # identical on every rank: the loss is averaged over ranks
        values = {"loss": loss_avg, "text_loss": text_avg, "image_loss": image_avg, "lr": lr,
                  "grad_norm": engine.grad_norm if applied else float("nan"), "applied": applied,
                  "skipped_total": engine.skipped_updates}
        if scaler is not None:  # block-scale min/median/max, skipped-step rate, overflows (per branch on log steps)
            values.update(scaler.stats(per_branch=step % cfg.logging.every_steps == 0))
        if hierarchy and step % cfg.logging.every_steps == 0:
            values.update({f"powersgd/{k}": v for k, v in hierarchy.stats().items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
        log.step(step, values)
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_avg:.3f}")
        if not math.isfinite(loss_avg):
            print0(f"train: loss is {loss_avg} at step {step}")
        if step % cfg.logging.image_every_steps == 0:
            for hook in sample_hooks or []:
                hook(step, engine)
        if ckpt.should_save(step):
            ckpt.save(step)
        if ckpt.stop_requested:
            write_run_marker(cfg.run.dir, "REQUEUE", step)
            log.close()
            if progress:
                progress.close()
            return EXIT_CHECKPOINTED
    if ckpt.last_saved_step != step:
        ckpt.save(step)
    write_run_marker(cfg.run.dir, "COMPLETED", step)
    log.close()
    if progress:
        progress.close()
    print0(f"train: done at step {step}; export with "
           f"`python -m dalle_ds.export {cfg.run.dir} {cfg.run.dir}/export`")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return train(cfg, args.deepspeed_config)


if __name__ == "__main__":
    sys.exit(main())
