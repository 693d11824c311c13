"""Stage 1: train the discrete VAE under DeepSpeed, data parallel over ranks (paper §2.1, App. A).

    deepspeed --num_gpus 2 dalle_ds/train_dvae.py --deepspeed_config ds_configs/dvae.json --config tiny
    torchrun --nproc_per_node 2 dalle_ds/train_dvae.py --deepspeed_config ds_configs/dvae.json --config tiny \\
        dvae_train.max_steps=500 run.dir=runs/dvae_try      # dotted overrides after the options

Reads top to bottom: parse -> config -> dist -> data -> model + engine -> EMA, checkpoint, resume
-> loop -> close. Per update: beta, tau and lr are cosine functions of the step
(dalle_ds.training.schedules); the Gumbel noise comes from a generator seeded by (seed, step, rank);
the data position, the EMA and the DeepSpeed state are checkpointed, so a resumed run repeats the
uninterrupted one exactly. SIGTERM/SIGUSR1, run markers and exit codes as for the prior
(dalle_ds.training.loop). Outputs in ``run.dir``: config.yaml + ds_config.json, checkpoints/,
metrics.jsonl (a row per ``logging.every_steps``: means since the previous row), eval.jsonl
(``--eval_shards``), tb/ (TensorBoard, ``train/...`` and ``eval/...``), grids/step_N.png (inputs
over EMA reconstructions), export/ (EMA weights: model.safetensors + config.json, refreshed at
every checkpoint).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

if __package__ in (None, ""):  # `deepspeed dalle_ds/train_dvae.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle_ds import cli_args  # noqa: E402
from dalle_ds.config import Config, DVAETrainConfig  # noqa: E402
from dalle_ds.data.loaders import ImageShardLoader  # noqa: E402
from dalle_ds.evaluation.reconstruction import evaluate_reconstruction, reconstruction_grid, save_png  # noqa: E402
from dalle_ds.models.dvae import DiscreteVAE, save_dvae  # noqa: E402
from dalle_ds.models.dvae_loss import histogram_usage, mse_psnr, psnr  # noqa: E402
from dalle_ds.parallel.checkpoint import Checkpointer  # noqa: E402
from dalle_ds.parallel.dist import all_reduce_, init_distributed, print0  # noqa: E402
from dalle_ds.parallel.engine import OptimSpec, build_engine  # noqa: E402
from dalle_ds.training.ema import EMA  # noqa: E402
from dalle_ds.training.logger import MetricsLogger  # noqa: E402
from dalle_ds.training.loop import EXIT_COMPLETED, TrainLoop  # noqa: E402
from dalle_ds.training import preflight  # noqa: E402
from dalle_ds.training.schedules import DVAESchedule  # noqa: E402

ECHO_KEYS = ["loss", "nll", "kl", "psnr", "codes_used_fraction", "beta", "tau", "lr", "images_per_s"]
UpdateHook = Callable[[int, float], None]  # fn(step, this rank's loss) after every update


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = cli_args.Parser(description="Train the DALL·E dVAE (stage 1) under DeepSpeed.", config=True)
    cli_args.add_deepspeed_config(ap, default="dvae.json")
    ap.add_argument("--eval-shards", default=None, help="held-out shards evaluated at every image step")
    ap.add_argument("--eval-images", type=int, default=256, help="held-out images per evaluation")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """parse -> config -> image shards checked (before any process group or engine) -> train the dVAE."""
    args = parse_args(argv)
    cfg, ds_config_path = cli_args.load_run(args)  # --print-config prints and exits here
    found = preflight.dvae_inputs(cfg, args.eval_shards)
    if args.dry_run:
        n = sum(p.numel() for p in DiscreteVAE(cfg.dvae).parameters())
        print0(f"train_dvae --dry-run: config {args.config} valid; DeepSpeed JSON {ds_config_path}; inputs {found}; "
               f"dVAE {n:,} parameters (fp32, data parallel: weights, grads and Adam moments "
               f"{16 * n / 2**30:.3f} GiB per rank)")
        return 0
    return train(cfg, ds_config_path, args.eval_shards, args.eval_images)


def train(cfg: Config, ds_config_path: str, eval_shards: str | None = None, eval_images: int = 256,
          on_update: UpdateHook | None = None) -> int:
    """The whole run; returns the process exit code (0, or 75 after a signal checkpoint)."""
    tc, run_dir = cfg.dvae_train, Path(cfg.run.dir)
    # -- dist
    info = init_distributed()
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    # -- data
    loader = ImageShardLoader(cfg.data.image_shards, tc.micro_batch_size, mode="dvae", size=cfg.data.image_size,
                              num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                              shuffle_buffer=cfg.data.shuffle_buffer, infinite=True)
    images_per_step = info.world_size * tc.micro_batch_size
    grid = cfg.data.image_size // cfg.dvae.downsample
    print0(f"dvae: {len(loader.urls)} shards, {info.world_size} ranks x {tc.micro_batch_size} images = "
           f"{images_per_step} per update; {cfg.data.image_size}px -> {grid}x{grid} codes "
           f"of {cfg.dvae.codebook_size}; {tc.max_steps} updates")
    # -- model + engine, EMA, checkpoint
    engine = build_engine(lambda: DiscreteVAE(cfg.dvae), ds_config_path, optim_spec(tc), entry=None,
                          run_dir=run_dir, run_config=cfg)
    model: DiscreteVAE = engine.model
    ema = EMA(model, tc.ema_decay)
    sched, loss_spec = DVAESchedule(tc), tc.loss_spec()
    ckpt = Checkpointer.from_config(engine, run_dir, cfg.checkpoint)
    ckpt.register_stateful("ema", ema)
    ckpt.register_stateful("data", loader)
    log = MetricsLogger.from_config(run_dir, cfg.logging, echo_keys=ECHO_KEYS, run_config=cfg)
    loop = TrainLoop(tc.max_steps, log, ckpt=ckpt, run_dir=run_dir, desc="dvae")
    if info.is_main:  # the EMA export follows every checkpoint
        loop.on_save(lambda step: export_ema(ema, cfg, run_dir / "export", step))
    loop.resume(cfg.checkpoint.resume)
    # -- loop
    eval_vae = DiscreteVAE(cfg.dvae)  # holds the EMA weights for grids, evaluation and export
    stats, batches = RunningStats(cfg.dvae.codebook_size), iter(loader)
    for step in loop:
        # Channels-last activations: oneDNN's convolutions run faster on them (README, Stage 1: with the
        # cheaper Gumbel noise 44 -> 59 images/s on 2 CPU ranks). The weights stay NCHW-contiguous, which
        # DeepSpeed's parameter broadcast needs; the layout follows the input through every conv.
        images = next(batches)["images"].to(engine.device).contiguous(memory_format=torch.channels_last)
        s = sched(step - 1)  # the values for update number `step`, counted from 0
        engine.set_lr(s["lr"])
        noise = noise_generator(cfg.run.seed, step - 1, info.rank, engine.device)
        loss, terms = engine(images, s["tau"], s["beta"], generator=noise, loss_spec=loss_spec)
        engine.engine_step(loss)
        ema.update(model)
        stats.add(float(loss.detach()), float(terms["nll"]), float(terms["kl"]), float(terms["marginal_kl"]),
                  mse_psnr(images, terms["recon"])[0], terms["codes"])
        if on_update:
            on_update(step, float(loss.detach()))
        if step % cfg.logging.every_steps == 0 or step == tc.max_steps:  # collective: the stats reduce
            steps, seconds = loop.timer.window()
            log.log(step, {**stats.reduce(), **s, "images_per_s": steps * images_per_step / max(seconds, 1e-9),
                           "elapsed_s": loop.timer.elapsed_s})  # elapsed: since this process's first step
        if info.is_main and (step % cfg.logging.image_every_steps == 0 or step == tc.max_steps):
            log_reconstructions(log, ema, eval_vae, images, step, run_dir)
            if eval_shards:
                log.log(step, evaluate_heldout(eval_vae, eval_shards, eval_images, cfg.data.image_size), split="eval")
    if loop.exit_code == EXIT_COMPLETED:
        print0(f"dvae: done at step {loop.step}; EMA export in {run_dir / 'export'}")
    return loop.exit_code


def optim_spec(cfg: DVAETrainConfig) -> OptimSpec:
    """AdamW with the paper's dVAE settings; the lr is set every step from the cosine schedule."""
    return OptimSpec(cfg.micro_batch_size, 1, cfg.lr_start, tuple(cfg.betas), cfg.eps, cfg.weight_decay)


def noise_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Gumbel noise as a pure function of (seed, step, rank): nothing to checkpoint for it. On the model's
    device: a generator draws only on its own device's tensors."""
    digest = hashlib.blake2b(f"gumbel/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


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
        if self.codes.device != codes.device:  # count where the codes are (no host sync per step)
            self.codes = self.codes.to(codes.device)
        self.codes += torch.bincount(codes.reshape(-1), minlength=self.codebook_size).double()

    def reduce(self) -> dict[str, float]:
        """Collective: means over steps and ranks; codebook usage over every rank's codes."""
        packed = all_reduce_(torch.cat([self.sums, self.codes.cpu()]))  # on the backend's device and back
        sums, codes = packed[:6], packed[6:]
        n = max(float(sums[5]), 1.0)
        mse = float(sums[4]) / n
        perplexity, used = histogram_usage(codes.cpu())
        self.reset()
        return {"loss": float(sums[0]) / n, "nll": float(sums[1]) / n, "kl": float(sums[2]) / n,
                "marginal_kl": float(sums[3]) / n, "mse": mse, "psnr": psnr(mse),
                "perplexity": perplexity, "codes_used_fraction": used}


def export_ema(ema: EMA, cfg: Config, out_dir: Path, step: int) -> None:
    vae = DiscreteVAE(cfg.dvae)
    ema.copy_to(vae)
    save_dvae(vae, str(out_dir), extra={"image_size": cfg.data.image_size, "step": step,
                                        "ema_decay": ema.decay, "source": "dalle_ds.train_dvae"})


def log_reconstructions(log: MetricsLogger, ema: EMA, eval_vae: DiscreteVAE, images: torch.Tensor, step: int,
                        run_dir: Path) -> None:
    """Rank 0: input-vs-reconstruction grid (EMA weights, argmax codes) to grids/ and TensorBoard."""
    ema.copy_to(eval_vae)
    eval_vae.eval()
    with torch.no_grad():
        recon = eval_vae.decode(eval_vae.encode(images))
    grid = reconstruction_grid(images, recon)
    save_png(grid, str(run_dir / "grids" / f"step_{step:08d}.png"))
    log.image("reconstruction", grid, step)


def evaluate_heldout(eval_vae: DiscreteVAE, shards: str, max_images: int, image_size: int) -> dict[str, float]:
    """Rank 0: PSNR, SSIM, MSE, perplexity and codebook usage of ``eval_vae`` (the EMA weights) on held-out shards."""
    loader = ImageShardLoader(shards, 64, mode="eval", size=image_size, rank=0, world_size=1, shuffle=False,
                              infinite=False)
    m = evaluate_reconstruction(eval_vae, loader, max_images=max_images)
    m.pop("grid")
    return m


if __name__ == "__main__":
    code = cli_args.run(main)
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    sys.exit(code)
