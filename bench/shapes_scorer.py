"""The shapes corpus generator's speed and the scorer's accuracy on clean, degraded and mismatched pairs.

    PYTHONPATH=. python -m bench.shapes_scorer [--count 1000]

Generates a 64x64 corpus (timed: images/s), then scores it with its own captions on the clean
images and on degraded copies (Gaussian blur + noise, JPEG, a 2x down/up-sample like a soft
decoder; 4x is harsh: small shapes become ~3 px), and with mismatched captions (shuffled across
images; colour words swapped).
Figures are match rates in [0, 1]; timings are wall-clock on a shared machine (noisy).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bench.harness import Recorder
from dalle_ds.evaluation import shapes_scorer as ss
from data_prep.make_shapes_corpus import make_corpus


def blur_noise(im: Image.Image, radius: float, sigma: float, seed: int) -> Image.Image:
    a = np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    a = a + np.random.default_rng(seed).normal(0.0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as out:
        return out.convert("RGB")


def down_up(im: Image.Image, factor: int) -> Image.Image:
    w, h = im.size
    return im.resize((w // factor, h // factor), Image.BILINEAR).resize((w, h), Image.BICUBIC)


def swap_colours(caption: str, rng: random.Random) -> str:
    named = [w for w in caption.split() if w in ss.PALETTE]
    new = dict(zip(named, rng.sample([c for c in ss.PALETTE if c not in named], len(named))))
    return " ".join(new.get(w, w) for w in caption.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="images scored per condition")
    ap.add_argument("--generate", type=int, default=4000, help="images generated for the speed figure")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Recorder("shapes_scorer") as rec:
        t0, c0 = time.perf_counter(), time.process_time()
        make_corpus(Path(tmp), args.generate, size=64, seed=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rec.add("generate_images_per_s", args.generate / wall, unit="img/s", count=args.generate, size=64, workers=1)
        rec.add("generate_cpu_s", cpu, unit="s", count=args.generate, size=64,
                note="process CPU time, less load-sensitive")
        index = json.loads((Path(tmp) / "index.json").read_text())["samples"][: args.count]
        images = []
        for s in index:
            with Image.open(Path(tmp) / s["image"]) as im:
                images.append(im.convert("RGB"))
        captions = [s["caption"] for s in index]

        t0 = time.perf_counter()
        scenes = [ss.detect(im) for im in images]
        rec.add("detect_ms_per_image", 1000 * (time.perf_counter() - t0) / len(images), unit="ms", size=64)
        rec.add("match_clean", ss.caption_match_rate(scenes, captions), n=len(images))
        degraded = {
            "match_blur1_noise8": lambda im, i: blur_noise(im, 1.0, 8.0, i),
            "match_blur1.5_noise12": lambda im, i: blur_noise(im, 1.5, 12.0, i),
            "match_jpeg75": lambda im, i: jpeg(im, 75),
            "match_jpeg50_blur1_noise4": lambda im, i: jpeg(blur_noise(im, 1.0, 4.0, i), 50),
            "match_down2_up2": lambda im, i: down_up(im, 2),
            "match_down4_up4": lambda im, i: down_up(im, 4),
        }
        for name, fn in degraded.items():
            rates = ss.attribute_rates([fn(im, i) for i, im in enumerate(images)], captions)
            rec.add(name, rates["match"], n=len(images), kind_rate=round(rates["kind"], 4))
        rng = random.Random(0)
        order = list(range(len(captions)))
        while any(i == j for i, j in enumerate(order)):
            rng.shuffle(order)
        rec.add("match_shuffled_captions", ss.caption_match_rate(scenes, [captions[j] for j in order]), n=len(images))
        rec.add("match_colour_swapped", ss.caption_match_rate(scenes, [swap_colours(c, rng) for c in captions]),
                n=len(images))


if __name__ == "__main__":
    main()
