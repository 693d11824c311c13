"""Stage 2: train the transformer prior under DeepSpeed ZeRO-3 (paper §2.2, App. B-E).

    deepspeed --num_gpus 2 dalle_ds/train.py --deepspeed_config ds_configs/zero3_fp32_cpu.json --config tiny
    torchrun --nproc_per_node 2 dalle_ds/train.py --deepspeed_config ds_configs/zero3_fp32_cpu.json \\
        --config tiny optim.max_steps=100 run.dir=runs/try
    srun python dalle_ds/train.py ...            (dalle_ds.parallel.dist maps the SLURM variables)

Reads top to bottom: parse -> config -> dist -> data -> model + engine -> loop -> close. The precision
mode (dalle_ds.parallel.block_scaling) decides what DeepSpeed sees; with powersgd.enabled or
powersgd.hierarchical ZeRO-3 partitions inside each node and the nodes average their gradient
shards (dalle_ds.parallel.hierarchy). Resumes from ``<run.dir>/checkpoints/latest`` when present
(data position, RNG, schedule, block scales, PowerSGD error buffers: the resumed run repeats the
uninterrupted one); SIGTERM/SIGUSR1 checkpoint, write ``<run.dir>/REQUEUE`` and exit 75, a finished
run writes ``<run.dir>/COMPLETED`` (dalle_ds.training.loop). Logs (rank 0, dalle_ds.training.logger):
``train step N: loss=...`` lines every ``logging.every_steps``, one ``<run.dir>/metrics.jsonl`` row
per update (throughput, MFU and per-rank memory on logging steps), TensorBoard ``<run.dir>/tb``.
Afterwards: ``python -m dalle_ds.export RUN_DIR OUT`` and ``python -m dalle_ds.sample --checkpoint OUT ...``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `deepspeed dalle_ds/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as torch_dist

from dalle_ds import cli_args
from dalle_ds.config import Config
from dalle_ds.parallel.checkpoint import Checkpointer
from dalle_ds.parallel.dist import DistInfo, all_gather_values, all_reduce_values, init_distributed, print0
from dalle_ds.parallel.dist import launch_info
from dalle_ds.parallel.engine import Engine, OptimSpec, build_engine, load_ds_config
from dalle_ds.training.flops import Throughput
from dalle_ds.training.logger import MetricsLogger
from dalle_ds.training.loop import EXIT_COMPLETED, TrainLoop
from dalle_ds.training import preflight
from dalle_ds.training.prior_hooks import CaptionDropout, PriorHooks, split_token_shards, token_views
from dalle_ds.training.schedules import WarmupPlateauLR, prior_lr_schedule

# In-training extension point, called every logging.image_every_steps as fn(step, engine) on every
# rank (ZeRO-3 parameters are partitioned: gather them, e.g. with deepspeed.zero.GatheredParameters).
# The command line passes none: sampling runs offline on an export (dalle_ds/sample.py).
SampleHook = Callable[[int, Engine], None]
ECHO_KEYS = ["loss", "text_loss", "image_loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "mfu", "memory_mb"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli_args.Parser(description="Train the DALL-E prior under DeepSpeed ZeRO-3.", config=True)
    cli_args.add_deepspeed_config(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """parse -> config -> inputs checked (before any process group or engine) -> train."""
    args = parse_args(argv)
    cfg, ds_config_path = cli_args.load_run(args)  # --print-config prints and exits here
    launch = launch_info()
    cfg.optim = cfg.optim.for_world(launch.world_size)
    found = preflight.prior_inputs(cfg)
    if args.dry_run:
        from dalle_ds.plan import run_plan

        print0(f"train --dry-run: config {args.config} valid; DeepSpeed JSON {ds_config_path}; inputs {found}")
        node = cfg.powersgd.node_size or launch.local_world_size
        print0("\n".join(run_plan(cfg, launch.world_size, node if cfg.powersgd.enabled or cfg.powersgd.hierarchical
                                   else launch.world_size, load_ds_config(ds_config_path), ds_config_path)))
        return 0
    return train(cfg, ds_config_path)


def train(cfg: Config, ds_config_path: str, sample_hooks: list[SampleHook] | None = None) -> int:
    """The whole run; returns the process exit code (0, or 75 after a signal checkpoint)."""
    from dalle_ds.parallel import block_scaling as precision
    from dalle_ds.parallel import hierarchy as hierarchical_zero

    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed")
    # -- dist
    info = init_distributed()
    cfg.optim = cfg.optim.for_world(info.world_size)  # optim.global_batch_size -> grad_accum_steps
    seed_everything(cfg.run.seed)
    print0(f"train: {info.world_size} ranks via {info.launcher}, run dir {cfg.run.dir}")
    # -- data
    loader = build_loader(cfg)
    tokens_per_step = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * info.world_size * cfg.model.seq_len
    print0(f"train: {cfg.model.text_len} text + {cfg.model.image_len} image = {cfg.model.seq_len} tokens/sample, "
           f"{tokens_per_step:,} tokens per update, {len(loader.urls)} token shards")
    # -- model + engine (hierarchy: ZeRO-3 inside node groups, averaged across nodes)
    hierarchy = hierarchical_zero.from_config(cfg.powersgd, seed=cfg.run.seed)
    if hierarchy:
        cross = f"PowerSGD rank {cfg.powersgd.rank}" if cfg.powersgd.enabled else "exact fp32"
        print0(f"train: ZeRO-3 inside nodes of {hierarchy.groups.node_size} ranks, {hierarchy.groups.num_nodes} nodes, "
               f"cross-node average: {cross}")
    from dalle_ds.plan import resolve_mode  # the planner resolves the regime with this same function

    mode, ds_config = resolve_mode(load_ds_config(ds_config_path), cfg.precision)  # fp16_block16: 16-bit regime
    engine = build_prior_engine(cfg, ds_config, mode, hierarchy.engine_kwargs() if hierarchy else {})
    sched = prior_lr_schedule(cfg.optim)  # optim.schedule: plateau (paper) or cosine
    # hierarchical: one copy of the model state (node 0 writes), resumable on another number of nodes
    ckpt = Checkpointer.from_config(engine, cfg.run.dir, cfg.checkpoint,
                                    node_groups=hierarchy.groups if hierarchy else None)
    ckpt.register_stateful("schedule", sched, scope="replicated")
    ckpt.register_stateful("data", loader, scope="redistributed")  # virtual ranks: exactly-once on a resize
    if hierarchy:  # the error buffers' mean over nodes, one copy (dalle_ds.parallel.hierarchy.CrossNodeState)
        ckpt.register_stateful("powersgd", hierarchy.checkpoint_state(), scope="node_replica")
    scaler = None
    if mode in ("fp16_block", "fp16_block16"):
        scaler = precision.attach(engine.model, cfg.precision, info.world_size)
        precision.install(engine, scaler)  # skip vote = agreed overflow flags; scales updated after the step
        ckpt.register_stateful("precision", scaler, scope="replicated")
    # -- loop
    log = MetricsLogger.from_config(cfg.run.dir, cfg.logging, echo_keys=ECHO_KEYS, run_config=cfg)
    loop = TrainLoop(cfg.optim.max_steps, log, ckpt=ckpt, run_dir=cfg.run.dir, desc="train")
    # validation loss on held-out token shards, training-time sample grids (dalle_ds/training/prior_hooks.py)
    hooks = PriorHooks.from_config(cfg, split_token_shards(cfg)[1], loader.tokenizer, info.is_main, sample_hooks)
    meter = Throughput.for_prior(cfg.model, tokens_per_step, mode, info.world_size, info.local_world_size)
    batches = iter(loader)
    if cfg.data.caption_dropout > 0:  # empty captions for classifier-free guidance (not in the paper)
        dropout = CaptionDropout(cfg.data.caption_dropout, cfg.run.seed, info.rank)
        ckpt.register_stateful("caption_dropout", dropout)
        batches = dropout.wrap(batches)
    loop.resume(cfg.checkpoint.resume)
    for step in loop:
        values = update(engine, sched, batches, cfg.optim.grad_accum_steps)
        log_step = step % cfg.logging.every_steps == 0
        if scaler is not None:  # block-scale min/median/max, skipped-step rate, overflows (per branch on log steps)
            values.update(scaler.stats(per_branch=log_step))
        if log_step:  # collective: the memory gather
            values.update(meter.rates(*loop.timer.window()), memory_mb=memory_per_rank(info))
            if hierarchy:
                values.update(powersgd_stats(hierarchy))
        values.update(hooks.validate(step, engine, log))  # collective: forwards on held-out tokens
        log.log(step, values, echo=log_step)
        if not math.isfinite(values["loss"]):
            print0(f"train: loss is {values['loss']} at step {step}")
        hooks.samples(step, engine, log)  # collective under ZeRO-3: the parameter gather
    if loop.exit_code == EXIT_COMPLETED:
        print0(f"train: done at step {loop.step}; export with "
               f"`python -m dalle_ds.export {cfg.run.dir} {cfg.run.dir}/export`")
    return loop.exit_code


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initialisation (zero.Init also broadcasts from rank 0)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loader(cfg: Config):
    """Token shards checked against the run's grid, codebook and (when given) dVAE; text tokenized on the fly."""
    from dalle_ds.data.loaders import TokenShardLoader, check_token_manifest
    from dalle_ds.data.storage import expand_urls
    from dalle_ds.data.virtual_ranks import VirtualRankLoader
    from dalle_ds.data.tokenizer import TextTokenizer
    from dalle_ds.models.dvae_io import dvae_hash

    m = cfg.model
    check_token_manifest(cfg.data.token_shards, m.image_grid, m.image_vocab_size,
                         expected_dvae_hash=dvae_hash(cfg.data.dvae) if cfg.data.dvae else None)
    tokenizer = TextTokenizer.from_file(cfg.data.tokenizer, m.text_len, m.text_vocab_size)
    train_spec, validation_spec = split_token_shards(cfg)  # data.validation_shards / validation_fraction
    if validation_spec is not None:
        check_token_manifest(validation_spec, m.image_grid, m.image_vocab_size,
                             expected_dvae_hash=dvae_hash(cfg.data.dvae) if cfg.data.dvae else None)
    urls = expand_urls(train_spec)  # listed once, for every virtual rank's loader

    def make(rank: int, world_size: int) -> TokenShardLoader:
        return TokenShardLoader(urls, cfg.optim.micro_batch_size, tokenizer=tokenizer, rank=rank, world_size=world_size,
                                views=token_views(cfg.data.token_shards), use_views=cfg.data.token_views,
                                grid=m.image_grid, codebook_size=m.image_vocab_size, bpe_dropout=cfg.data.bpe_dropout,
                                num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                                shuffle_buffer=cfg.data.shuffle_buffer, max_bad_fraction=cfg.data.max_bad_fraction)

    # the data position is kept per virtual rank (the first run's world size): a resume on fewer nodes
    # reads the same samples exactly once (dalle_ds/data/virtual_ranks.py)
    info = launch_info()
    return VirtualRankLoader(make, info.rank, info.world_size)


def build_prior_engine(cfg: Config, ds_config: dict, mode: str, hierarchy_kwargs: dict[str, Any]) -> Engine:
    """The prior under ``zero.Init``, AdamW without decay on gains/biases/embeddings; writes the run configs."""
    from dalle_ds.models.prior import Prior, keep_fp32, no_decay

    return build_engine(lambda: Prior(cfg.model), ds_config, OptimSpec.from_optim(cfg.optim), no_decay=no_decay,
                        keep_fp32=keep_fp32, seed=cfg.run.seed,
                        fixed_fp16_loss_scale=(mode != "fp16"), allow_fp16_on_cpu=cfg.precision.allow_fp16_on_cpu,
                        run_dir=cfg.run.dir, run_config=cfg, **hierarchy_kwargs)


def update(engine: Engine, sched: WarmupPlateauLR, batches, grad_accum_steps: int) -> dict[str, Any]:
    """One optimizer update over ``grad_accum_steps`` micro-batches; losses averaged over ranks."""
    engine.set_lr(sched.lr)
    engine.set_grad_clip(sched.grad_clip)
    sums = [0.0, 0.0, 0.0]
    for _ in range(grad_accum_steps):
        batch = next(batches)
        loss, parts = engine(batch["text"], batch["codes"])  # (,) fp32
        sums[0] += float(loss.detach())
        sums[1] += float(parts["text_loss"])
        sums[2] += float(parts["image_loss"])
        applied = engine.engine_step(loss)
    loss_avg, text_avg, image_avg = mean_over_ranks([s / grad_accum_steps for s in sums])
    lr = sched.lr
    if applied:
        sched.step(loss_avg)  # identical on every rank: the loss is averaged over ranks
    return {"loss": loss_avg, "text_loss": text_avg, "image_loss": image_avg, "lr": lr,
            "grad_norm": engine.grad_norm if applied else float("nan"), "applied": applied,
            "skipped_total": engine.skipped_updates}


def mean_over_ranks(values: list[float]) -> list[float]:
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    return [v / world for v in all_reduce_values(values)]  # float64 on the backend's device


def memory_per_rank(info: DistInfo) -> list[float]:
    """Collective: each rank's peak CUDA memory (CPU: resident set) in MB, in rank order."""
    if torch.cuda.is_available():
        mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        with open("/proc/self/statm") as f:  # resident pages
            mb = int(f.read().split()[1]) * 4096 / 2**20
    return [round(float(m[0]), 1) for m in all_gather_values([mb])]  # on the backend's device


def powersgd_stats(hierarchy) -> dict[str, float]:
    return {f"powersgd/{k}": v for k, v in hierarchy.stats().items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


if __name__ == "__main__":
    sys.exit(cli_args.run(main))
