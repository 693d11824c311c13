"""Evaluate generated images against reference images: FID and IS (also after a Gaussian blur of
radius 1..8 applied to both sets, as in the paper), CLIP score, and the shapes caption-match rate.

    python -m dalle_ds.evaluate --samples runs/demo/samples --reference 'runs/demo/heldout/shard-*.tar' \\
        --clip runs/demo/clip [--inception-weights inception-2015-12-05.pt] [--radii 0,1,2,4,8] [--json out.json]

``--samples``: a folder of .png/.jpg images with same-named .txt captions (what dalle_ds.sample
writes) or image shards. ``--reference``: image shards (or such a folder). References are
centre-cropped to the samples' resolution so a blur radius means the same on both sets.
Features come from the Inception TorchScript file when given, else the CLIP image encoder
(``--clip``); the output names the extractor (see dalle_ds/evaluation/metrics.py). The CLIP score needs
``--clip``. The caption-match rate (dalle_ds.evaluation.shapes_scorer) is reported when the samples' captions
are shapes-corpus captions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_ds.cli_args import Parser, run
from dalle_ds.parallel.dist import default_device
from dalle_ds.data.shards import IMAGE_SUFFIXES, captioned_images
from dalle_ds.evaluation import metrics


def load_folder(folder: str | Path, size: int | None = None, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, H, W) in [0, 1] and captions from a folder of images with same-named .txt files."""
    images, captions = [], []
    for p, caption in captioned_images(folder, limit):
        captions.append(caption)
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images of several sizes {sorted(shapes)}; pass a size")
    return torch.stack(images).float().div(255), captions


def load_images(spec: str, size: int | None, limit: int | None) -> tuple[torch.Tensor, list[str]]:
    """A folder of images + .txt captions, or image shards (centre crop to ``size``)."""
    if Path(spec).is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(spec).rglob("*")):
        return load_folder(spec, size, limit)
    from dalle_ds.data.loaders import ImageShardLoader

    if size is None:
        raise ValueError(f"{spec}: image shards need an image size")
    loader = ImageShardLoader(spec, 64, mode="eval", size=size, rank=0, world_size=1, shuffle=False, infinite=False)
    images, captions = [], []
    for batch in loader:
        images.append(batch["images"])
        captions += batch["captions"]
        if limit and len(captions) >= limit:
            break
    if not captions:
        raise ValueError(f"{spec}: no samples")
    return torch.cat(images)[:limit], captions[:limit]


def shapes_rates(images: torch.Tensor, captions: list[str]) -> dict[str, float] | None:
    """Caption-match rates when the captions are shapes-corpus captions, else None."""
    from dalle_ds.evaluation.shapes_scorer import attribute_rates

    rates = attribute_rates(list(images), captions)
    return rates if rates["understood"] > 0 else None


def evaluate(samples: torch.Tensor, captions: list[str], reference: torch.Tensor, extractor,
             radii: list[float], scorer=None, is_splits: int = 10) -> dict:
    out: dict = {"extractor": extractor.name, "samples": int(samples.shape[0]), "reference": int(reference.shape[0]),
                 "image_size": int(samples.shape[-1]), "fid": {}, "is": {}}
    for r in radii:
        fake, real = metrics.gaussian_blur(samples, r), metrics.gaussian_blur(reference, r)
        out["fid"][str(r)] = metrics.fid(extractor, real, fake)
        mean, std = metrics.inception_score(extractor, fake, is_splits)
        out["is"][str(r)] = {"mean": mean, "std": std}
    if scorer is not None:
        from dalle_ds.sampling.rerank import clip_score

        out["clip_score"] = clip_score(scorer, samples, captions)
    rates = shapes_rates(samples, captions)
    if rates is not None:
        out["shapes"] = rates
    return out


def parse_radii(text: str) -> list[float]:
    try:
        radii = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--radii {text!r}: expected comma-separated numbers, e.g. 0,1,2,4,8") from None
    if not radii or min(radii) < 0:
        raise argparse.ArgumentTypeError(f"--radii {text!r}: need at least one radius >= 0")
    return radii


def format_report(res: dict) -> str:
    lines = [f"extractor: {res['extractor']}",
             f"samples {res['samples']}, reference {res['reference']}, {res['image_size']}px"]
    for r, f in res["fid"].items():
        i = res["is"][r]
        lines.append(f"blur radius {r:>4}: FID {f:9.3f}   IS {i['mean']:.3f} +- {i['std']:.3f}")
    if "clip_score" in res:
        lines.append(f"CLIP score: {res['clip_score']:.2f}")
    if "shapes" in res:
        lines.append("shapes caption-match: " + " ".join(f"{k}={v:.3f}" for k, v in res["shapes"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", required=True, help="folder of images + .txt captions, or image shards")
    ap.add_argument("--reference", required=True, help="image shards (or a folder) to compare with")
    ap.add_argument("--inception-weights", default=None, help="TorchScript FID Inception file (local)")
    ap.add_argument("--clip", default=None, help="CLIP folder: CLIP score, and the extractor without Inception")
    ap.add_argument("--radii", type=parse_radii, default=parse_radii("0,1,2,3,4,5,6,7,8"),
                    help="blur radii, comma-separated (0 = no blur)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the samples' size")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--is-splits", type=int, default=10)
    ap.add_argument("--device", default=str(default_device()), help="default: cuda:LOCAL_RANK%%count, else cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not args.inception_weights and not args.clip:
        ap.error("need a feature extractor: --inception-weights FILE and/or --clip DIR")

    samples, captions = load_images(args.samples, args.image_size, args.max_images)
    size = args.image_size or samples.shape[-1]
    reference, ref_captions = load_images(args.reference, size, args.max_images)
    scorer = None
    if args.clip:
        from dalle_ds.sampling.rerank import ClipScorer

        scorer = ClipScorer.load(args.clip, args.device)
    extractor = metrics.load_extractor(args.inception_weights, scorer, labels=ref_captions, device=args.device)
    res = evaluate(samples, captions, reference, extractor, args.radii, scorer, args.is_splits)
    print(format_report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    raise SystemExit(run(main))
