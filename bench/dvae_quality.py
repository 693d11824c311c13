"""Tiny-dVAE quality in a fixed budget: held-out PSNR, SSIM and codebook usage after the tiny preset's
updates on 2 CPU ranks, for the preset's recipe and for the paper's loss it departs from (ablation).

    python -m bench.dvae_quality --shards runs/demo/shards --heldout runs/demo/heldout_shards
    python -m bench.dvae_quality ... --variants tiny paper_loss     # a subset

Variants (overrides on top of ``--config tiny``):
    tiny            MSE reconstruction + marginal KL (the preset)
    paper_loss      logit-Laplace, no marginal KL (the paper's objective)
    mse_only        MSE reconstruction, no marginal KL
    marginal_only   logit-Laplace + marginal KL
Wall time is the whole training run (start-up, updates, checkpoints), without the evaluation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import Recorder
from tests.multirank import run_ranks

VARIANTS = {
    "tiny": [],
    "paper_loss": ["dvae_train.recon_loss=logit_laplace", "dvae_train.marginal_kl_weight=0"],
    "mse_only": ["dvae_train.marginal_kl_weight=0"],
    "marginal_only": ["dvae_train.recon_loss=logit_laplace"],
}


def _train(run_dir: str, shards: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    from dalle_ds.train_dvae import main

    main(["--config", "tiny", "--deepspeed_config", "ds_configs/dvae.json", f"run.dir={run_dir}",
          f"data.image_shards={shards}", "logging.progress_bar=false", "logging.tensorboard=false",
          "logging.image_every_steps=1000000", *overrides])


def run_variant(name: str, shards: str, heldout: str, ranks: int, extra: list[str]) -> dict:
    from dalle_ds.data.loaders import ImageShardLoader
    from dalle_ds.models.dvae_io import load_dvae
    from dalle_ds.evaluation.reconstruction import evaluate_reconstruction

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_ranks(_train, world_size=ranks, args=(tmp, shards, VARIANTS[name] + extra), timeout_s=3600)
        wall = time.perf_counter() - t0
        vae = load_dvae(str(Path(tmp) / "export"))
        batches = ImageShardLoader(heldout, 64, mode="eval", size=64, rank=0, world_size=1, shuffle=False,
                                   infinite=False)
        m = evaluate_reconstruction(vae, batches)
    m.pop("grid")
    return {**m, "train_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="training image shards (64 px, the demo's)")
    ap.add_argument("--heldout", required=True, help="held-out image shards")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for every variant")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with Recorder("dvae_quality") as rec:
        for name in args.variants:
            m = run_variant(name, args.shards, args.heldout, args.ranks, args.overrides)
            common = {"variant": name, "overrides": VARIANTS[name] + args.overrides, "ranks": args.ranks,
                      "heldout_images": m["images"], "load_avg_1min_at_start": round(load, 2)}
            rec.add(f"{name}_psnr", m["psnr"], unit="dB", ssim=round(m["ssim"], 4), **common)
            rec.add(f"{name}_codes_used_fraction", m["codes_used_fraction"], unit="fraction",
                    codes_used=m["codes_used"], perplexity=round(m["perplexity"], 1), **common)
            rec.add(f"{name}_train_wall_s", m["train_wall_s"], unit="s", **common)
            load = os.getloadavg()[0]


if __name__ == "__main__":
    main()
