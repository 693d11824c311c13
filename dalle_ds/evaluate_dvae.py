"""Evaluate a dVAE export on held-out image shards: PSNR, SSIM, MSE, codebook usage, a grid PNG.

    python -m dalle_ds.evaluate_dvae --checkpoint runs/tiny/export --shards 'data/heldout/shard-{000000..000000}.tar'

Reconstructions go through the tokens the prior will see: argmax codes (no Gumbel noise), then
the decoder's mu, unmapped to [0, 1]. Images are centre-cropped ("eval" augmentation) to the
size the export was trained at (``--image-size``, default: the export's ``data.image_size``).
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle_ds.cli_args import Parser, run  # noqa: E402
from dalle_ds.data import storage  # noqa: E402
from dalle_ds.evaluation.reconstruction import evaluate_reconstruction  # noqa: E402
from dalle_ds.models.dvae_io import load_dvae  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    from dalle_ds.data.loaders import ImageShardLoader

    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="dVAE export folder (model.safetensors + config.json), local or s3://")
    ap.add_argument("--shards", required=True, help="held-out image shards (paths, braces, globs, s3://)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the export's data.image_size")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--grid", default=None, help="PNG path (default: CHECKPOINT/eval_grid.png, ./ for s3://)")
    ap.add_argument("--json", default=None, help="also write the metrics here")
    args = ap.parse_args(argv)

    vae = load_dvae(args.checkpoint)
    size = args.image_size or vae.export_meta.get("image_size")
    if size is None:
        raise SystemExit(f"{args.checkpoint}/config.json has no image_size: pass --image_size")
    loader = ImageShardLoader(args.shards, args.batch_size, mode="eval", size=size, rank=0, world_size=1,
                              shuffle=False, infinite=False)
    grid_path = args.grid or ("eval_grid.png" if storage.is_s3(args.checkpoint)
                              else os.path.join(args.checkpoint, "eval_grid.png"))
    metrics = evaluate_reconstruction(vae, loader, args.max_images, grid_path)
    metrics.pop("grid")
    print(f"images {metrics['images']}  PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}  "
          f"MSE {metrics['mse']:.6f}  codes used {metrics['codes_used']}/{vae.cfg.codebook_size} "
          f"({100 * metrics['codes_used_fraction']:.1f}%)  perplexity {metrics['perplexity']:.1f}")
    print(f"grid: {grid_path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    raise SystemExit(run(main))
