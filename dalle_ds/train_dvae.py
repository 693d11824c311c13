"""Stage 1: train the discrete VAE under DeepSpeed, data parallel over ranks (paper §2.1, App. A).

    deepspeed --num_gpus 2 dalle_ds/train_dvae.py --deepspeed_config ds_configs/dvae.json --config tiny
    torchrun --nproc_per_node 2 dalle_ds/train_dvae.py --deepspeed_config ds_configs/dvae.json --config tiny \
        dvae_train.max_steps=500 run.dir=runs/dvae_try      # dotted overrides after the options

Reads top to bottom: config -> dist -> data -> model + engine -> EMA, checkpoint, resume -> loop -> export.
Per update: beta, tau and lr are cosine functions of the step (dalle_ds.training.schedules); the Gumbel
noise comes from a generator seeded by (seed, step, rank); the data position, the EMA and the
DeepSpeed state are checkpointed, so a resumed run repeats the uninterrupted one exactly.
Outputs in ``run.dir``: config.yaml + ds_config.json, checkpoints/, tb/ (TensorBoard),
metrics.jsonl, grids/step_N.png (inputs over EMA reconstructions), export/ (EMA weights:
model.safetensors + config.json, refreshed at every checkpoint and at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

if __package__ in (None, ""):  # `deepspeed dalle_ds/train_dvae.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle_ds.parallel.checkpoint import EXIT_CHECKPOINTED, Checkpointer, clear_run_markers, write_run_marker  # noqa: E402
from dalle_ds.config import Config, DVAETrainConfig, load_config  # noqa: E402
from dalle_ds.data.loaders import ImageShardLoader  # noqa: E402
from dalle_ds.parallel.dist import init_distributed, print0  # noqa: E402
from dalle_ds.models.dvae import DiscreteVAE, save_dvae  # noqa: E402
from dalle_ds.models.dvae_loss import mse_psnr  # noqa: E402
from dalle_ds.training.ema import EMA  # noqa: E402
from dalle_ds.parallel.engine import OptimSpec, build_engine  # noqa: E402
from dalle_ds.evaluation.reconstruction import evaluate_reconstruction, reconstruction_grid, save_png  # noqa: E402
from dalle_ds.training.schedules import DVAESchedule  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the DALL·E dVAE (stage 1) under DeepSpeed.")
    ap.add_argument("--config", default="tiny", help="preset name (dalle_ds/configs) or YAML path")
    ap.add_argument("--deepspeed_config", default="ds_configs/dvae.json", help="static DeepSpeed JSON")
    ap.add_argument("--eval_shards", default=None, help="held-out shards evaluated at every image step")
    ap.add_argument("--eval_images", type=int, default=256, help="held-out images per evaluation")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher (unused)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    return ap.parse_args(argv)


def optim_spec(cfg: DVAETrainConfig) -> OptimSpec:
    """AdamW with the paper's dVAE settings; the lr is set every step from the cosine schedule."""
    return OptimSpec(cfg.micro_batch_size, 1, cfg.lr_start, tuple(cfg.betas), cfg.eps, cfg.weight_decay)


def noise_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Gumbel noise as a pure function of (seed, step, rank): nothing to checkpoint for it."""
    digest = hashlib.blake2b(f"gumbel/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class RunningStats:
    """Loss terms and the code histogram since the last log line, reduced over ranks when read."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(6, dtype=torch.float64)  # loss, nll, kl, marginal_kl, mse, steps
        self.codes = torch.zeros(self.codebook_size, dtype=torch.float64)

    def add(self, loss: float, nll: float, kl: float, marginal_kl: float, mse: float, codes: torch.Tensor) -> None:
        self.sums += torch.tensor([loss, nll, kl, marginal_kl, mse, 1.0], dtype=torch.float64)
        self.codes += torch.bincount(codes.reshape(-1), minlength=self.codebook_size).double()

    def reduce(self) -> dict[str, float]:
        """Collective: means over steps and ranks; codebook usage over every rank's codes."""
        packed = torch.cat([self.sums, self.codes])
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(packed)
        sums, codes = packed[:6], packed[6:]
        n = max(float(sums[5]), 1.0)
        mse = float(sums[4]) / n
        p = codes / codes.sum().clamp(min=1)
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        self.reset()
        return {"loss": float(sums[0]) / n, "nll": float(sums[1]) / n, "kl": float(sums[2]) / n,
                "marginal_kl": float(sums[3]) / n, "mse": mse, "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "perplexity": math.exp(entropy),
                "codes_used_fraction": float((codes > 0).sum()) / self.codebook_size}


def export_ema(ema: EMA, cfg: Config, out_dir: Path, step: int) -> None:
    vae = DiscreteVAE(cfg.dvae)
    ema.copy_to(vae)
    save_dvae(vae, str(out_dir), extra={"image_size": cfg.data.image_size, "step": step,
                                        "ema_decay": ema.decay, "source": "dalle_ds.train_dvae"})


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns this rank's loss per update (tests compare them across resumes)."""
    args = parse_args(argv)
    # -- config
    cfg = load_config(args.config, args.overrides)
    tc, run_dir = cfg.dvae_train, Path(cfg.run.dir)
    # -- dist
    info = init_distributed()
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    # -- data
    loader = ImageShardLoader(cfg.data.image_shards, tc.micro_batch_size, mode="dvae", size=cfg.data.image_size,
                              num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                              shuffle_buffer=cfg.data.shuffle_buffer, infinite=True)
    grid = cfg.data.image_size // cfg.dvae.downsample
    print0(f"dvae: {len(loader.urls)} shards, {info.world_size} ranks x {tc.micro_batch_size} images = "
           f"{info.world_size * tc.micro_batch_size} per update; {cfg.data.image_size}px -> {grid}x{grid} codes "
           f"of {cfg.dvae.codebook_size}; {tc.max_steps} updates")
    # -- model + engine
    engine = build_engine(lambda: DiscreteVAE(cfg.dvae), args.deepspeed_config, optim_spec(tc), entry=None,
                          run_dir=run_dir, run_config=cfg)
    model: DiscreteVAE = engine.model
    ema = EMA(model, tc.ema_decay)
    sched, loss_spec = DVAESchedule(tc), tc.loss_spec()
    # -- checkpoint / resume
    ckpt = Checkpointer.from_config(engine, run_dir, cfg.checkpoint)
    clear_run_markers(run_dir)
    ckpt.register_stateful("ema", ema)
    ckpt.register_stateful("data", loader)
    state = ckpt.resume() if cfg.checkpoint.resume else None
    step = state["step"] if state else 0
    writer = None
    if info.is_main and cfg.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    eval_vae = DiscreteVAE(cfg.dvae)  # holds the EMA weights for grids, evaluation and export
    stats, losses = RunningStats(cfg.dvae.codebook_size), []
    bar = None
    if info.is_main and cfg.logging.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, desc="dvae", unit="step", dynamic_ncols=True)
    # -- loop
    t0, t_step0, batches = time.perf_counter(), step, iter(loader)
    while step < tc.max_steps:
        images = next(batches)["images"]  # (B, C, H, W) in [0, 1]
        s = sched(step)
        engine.set_lr(s["lr"])
        loss, terms = engine(images, s["tau"], s["beta"], generator=noise_generator(cfg.run.seed, step, info.rank),
                             loss_spec=loss_spec)
        engine.engine_step(loss)
        ema.update(model)
        step += 1
        losses.append(float(loss.detach()))
        stats.add(float(loss.detach()), float(terms["nll"]), float(terms["kl"]), float(terms["marginal_kl"]),
                  mse_psnr(images, terms["recon"])[0], terms["codes"])
        if bar:
            bar.update(1)
        if step % cfg.logging.every_steps == 0 or step == tc.max_steps:
            m = {**stats.reduce(), **s, "step": step}
            elapsed = time.perf_counter() - t0
            m["images_per_s"] = (step - t_step0) * tc.micro_batch_size * info.world_size / max(elapsed, 1e-9)
            m["elapsed_s"] = elapsed  # since this process's first step (benchmarks difference it)
            log_scalars(writer, run_dir, m, bar)
        if step % cfg.logging.image_every_steps == 0 or step == tc.max_steps:
            if info.is_main:
                log_images(writer, run_dir, ema, eval_vae, images, step, args, cfg)
        if ckpt.should_save(step) or step == tc.max_steps:
            ckpt.save(step)
            if info.is_main:
                export_ema(ema, cfg, run_dir / "export", step)
            if ckpt.stop_requested:
                write_run_marker(run_dir, "REQUEUE", step)
                sys.exit(EXIT_CHECKPOINTED)
    if bar:
        bar.close()
    if writer:
        writer.close()
    write_run_marker(run_dir, "COMPLETED", step)
    print0(f"dvae: done at step {step}; EMA export in {run_dir / 'export'}")
    return losses


def log_scalars(writer, run_dir: Path, m: dict, bar) -> None:
    """Rank 0: TensorBoard scalars, one metrics.jsonl line, the progress-bar postfix."""
    if torch_dist.is_initialized() and torch_dist.get_rank() != 0:
        return
    step = m["step"]
    if writer:
        for k, v in m.items():
            if k != "step":
                writer.add_scalar(f"train/{k}", v, step)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()}) + "\n")
    if bar:
        bar.set_postfix(loss=f"{m['loss']:.4f}", psnr=f"{m['psnr']:.1f}", used=f"{m['codes_used_fraction']:.2f}",
                        tau=f"{m['tau']:.3f}")
    else:
        print0(f"step {step} loss {m['loss']:.4f} nll {m['nll']:.4f} kl {m['kl']:.4f} psnr {m['psnr']:.2f} "
               f"used {m['codes_used_fraction']:.3f} beta {m['beta']:.3f} tau {m['tau']:.4f} lr {m['lr']:.3g}")


def log_images(writer, run_dir: Path, ema: EMA, eval_vae: DiscreteVAE, images: torch.Tensor, step: int,
               args: argparse.Namespace, cfg: Config) -> None:
    """Rank 0: input-vs-reconstruction grid (EMA weights, argmax codes); held-out metrics if given."""
    ema.copy_to(eval_vae)
    eval_vae.eval()
    with torch.no_grad():
        recon = eval_vae.decode(eval_vae.encode(images))
    grid = reconstruction_grid(images, recon)
    save_png(grid, str(run_dir / "grids" / f"step_{step:08d}.png"))
    if writer:
        writer.add_image("train/reconstruction", grid, step)
    if args.eval_shards:
        loader = ImageShardLoader(args.eval_shards, 64, mode="eval", size=cfg.data.image_size, rank=0,
                                  world_size=1, shuffle=False, infinite=False)
        m = evaluate_reconstruction(eval_vae, loader, max_images=args.eval_images)
        m.pop("grid")
        m["step"] = step
        if writer:
            for k in ("psnr", "ssim", "mse", "perplexity", "codes_used_fraction"):
                writer.add_scalar(f"eval/{k}", m[k], step)
        with open(run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        print0(f"eval step {step}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.4f} codes used "
               f"{100 * m['codes_used_fraction']:.1f}%")


if __name__ == "__main__":
    main()
    torch_dist.destroy_process_group() if torch_dist.is_initialized() else None
