"""Sample images for captions, rerank them with CLIP, write PNG grids and a JSON record.

    python -m dalle_ds.sample --checkpoint runs/tiny/export --dvae runs/demo/dvae/export \\
        --tokenizer runs/demo/tokenizer.json --prompt "a red circle above a blue square" -n 64 --keep 8 \\
        [--clip runs/demo/clip] [--image-prompt photo.png --prompt-rows 7] [--out runs/demo/samples]

For each prompt: N candidates (candidate j of prompt i uses seed ``--seed + i * N + j``), decoded
with the dVAE, scored against the caption with the CLIP folder when given (best ``--keep`` kept,
best first), else the first ``--keep``. Writes ``OUT/grid_<i>.png`` (the kept samples; with
``--all-grid`` also ``OUT/all_<i>.png``, every candidate), ``OUT/kept/<i>_<rank>.png`` + ``.txt`` per
kept sample (the image-folder layout ``dalle_ds.evaluate --samples OUT/kept`` and
``dalle_ds.shapes_score`` read) and ``OUT/samples.json``.

Image completion (``--image-prompt``): the prompt image is centre-cropped and resized to the dVAE's
input size, encoded, and the top ``--prompt-rows`` rows of its codes are kept (paper: 15 of 32;
default scaled to the grid); the prior samples the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from dalle_ds.sampling import SamplingSettings, default_prompt_rows, generate, load_prior


def grid_image(images: torch.Tensor, cols: int | None = None, pad: int = 2) -> Image.Image:
    """(B, 3, H, W) in [0, 1] -> one image, ``cols`` per row (default ~square), white gutters."""
    b, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return to_pil(grid)


def save_grid(images: torch.Tensor, path: str | Path, cols: int | None = None) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, cols).save(path)
    return Path(path)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [0, 1] (centre crop, bicubic resize)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float().div(255).unsqueeze(0)


class Pipeline:
    """Prior + dVAE + tokenizer (+ CLIP): captions in, reranked images out."""

    def __init__(self, checkpoint: str, dvae: str, tokenizer: str, clip: str | None = None,
                 device: str = "cpu", batch_size: int = 64):
        from dalle_ds.dvae import load_dvae
        from dalle_ds.tokenizer import TextTokenizer

        self.device = torch.device(device)
        self.prior = load_prior(checkpoint, self.device)
        self.vae = load_dvae(dvae).to(self.device)
        c = self.prior.cfg
        if self.vae.cfg.codebook_size != c.image_vocab_size:
            raise ValueError(f"{dvae}: codebook_size {self.vae.cfg.codebook_size} != the prior's image_vocab_size "
                             f"{c.image_vocab_size} ({checkpoint}/config.json)")
        self.tokenizer = TextTokenizer.from_file(tokenizer, c.text_len, c.text_vocab_size)
        self.image_size = c.image_grid * self.vae.cfg.downsample
        self.scorer = None
        if clip:
            from dalle_ds.clip_rerank import ClipScorer

            self.scorer = ClipScorer.load(clip, self.device)
        self.batch_size = batch_size

    def prompt_codes(self, image_path: str, rows: int) -> torch.Tensor:
        """(1, rows * G) codes of the top rows of an image."""
        g = self.prior.cfg.image_grid
        if not 1 <= rows < g:
            raise ValueError(f"--prompt-rows={rows}: must be in [1, {g - 1}] for a {g}x{g} grid")
        codes = self.vae.encode(load_image(image_path, self.image_size).to(self.device))  # (1, G, G)
        return codes.reshape(1, -1)[:, : rows * g]

    def sample(self, caption: str, n: int, keep: int, seed: int, settings: SamplingSettings,
               prompt_codes: torch.Tensor | None = None, progress: bool = False) -> dict:
        """N candidates for one caption -> kept images (keep, 3, H, W), their seeds, scores, all codes."""
        from dalle_ds.clip_rerank import rerank

        if not 1 <= keep <= n:
            raise ValueError(f"--keep={keep}: must be in [1, -n={n}]")
        seeds = [seed + j for j in range(n)]
        text = self.tokenizer.encode([caption])  # (1, T)
        codes, images = [], []
        for i in range(0, n, self.batch_size):
            s = seeds[i:i + self.batch_size]
            pc = None if prompt_codes is None else prompt_codes.expand(len(s), -1)
            c = generate(self.prior, text.expand(len(s), -1), s, settings, prompt_codes=pc, progress=progress)
            codes.append(c)
            images.append(self.vae.decode(c).float().cpu())
        codes_t, images_t = torch.cat(codes), torch.cat(images)  # (N, G*G), (N, 3, H, W)
        if self.scorer is not None:
            order, scores = rerank(self.scorer, images_t, caption, keep)
            scores = scores.cpu()
        else:
            order, scores = torch.arange(keep), None
        return {"caption": caption, "images": images_t[order], "all_images": images_t, "codes": codes_t.cpu(),
                "order": order.tolist(), "seeds": [seeds[j] for j in order.tolist()],
                "scores": None if scores is None else [float(scores[j]) for j in order.tolist()],
                "all_scores": None if scores is None else scores.tolist()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="prior export folder (model.safetensors + config.json)")
    ap.add_argument("--dvae", required=True, help="dVAE export folder")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json")
    ap.add_argument("--prompt", action="append", default=[], help="a caption (repeat for several)")
    ap.add_argument("--prompts-file", default=None, help="one caption per line")
    ap.add_argument("-n", type=int, default=64, help="candidates per caption")
    ap.add_argument("--keep", type=int, default=8, help="best candidates kept after reranking")
    ap.add_argument("--clip", default=None, help="CLIP folder for reranking (Hugging Face or dalle_ds/train_clip.py)")
    ap.add_argument("--image-prompt", default=None, help="image whose top rows of codes are kept (completion)")
    ap.add_argument("--prompt-rows", type=int, default=None, help="rows kept (default: 15/32 of the grid)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="candidates sampled at once")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="samples", help="output folder")
    ap.add_argument("--all-grid", action="store_true", help="also write a grid of every candidate")
    args = ap.parse_args(argv)
    if args.prompts_file:
        args.prompt += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
    if not args.prompt:
        ap.error("give at least one --prompt or --prompts-file")
    if args.n < 1 or not 1 <= args.keep <= args.n:
        ap.error(f"-n {args.n} --keep {args.keep}: need 1 <= keep <= n")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p).validate()
    pipe = Pipeline(args.checkpoint, args.dvae, args.tokenizer, args.clip, args.device, args.batch_size)
    g = pipe.prior.cfg.image_grid
    prompt_codes, rows = None, None
    if args.image_prompt:
        rows = args.prompt_rows or default_prompt_rows(g)
        prompt_codes = pipe.prompt_codes(args.image_prompt, rows)
    out = Path(args.out)
    (out / "kept").mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": args.checkpoint, "dvae": args.dvae, "clip": args.clip, "sampling": asdict(settings),
              "n": args.n, "keep": args.keep, "image_prompt": args.image_prompt, "prompt_rows": rows,
              "prompts": []}
    t0 = time.time()
    for i, caption in enumerate(args.prompt):
        r = pipe.sample(caption, args.n, args.keep, args.seed + i * args.n, settings, prompt_codes, progress=True)
        grid = save_grid(r["images"], out / f"grid_{i:03d}.png")
        files = []
        for rank, img in enumerate(r["images"]):
            stem = out / "kept" / f"{i:03d}_{rank:02d}"
            to_pil(img).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption + "\n")
            files.append(f"kept/{stem.name}.png")
        if args.all_grid:
            save_grid(r["all_images"], out / f"all_{i:03d}.png")
        record["prompts"].append({"caption": caption, "grid": grid.name, "files": files, "seeds": r["seeds"],
                                  "scores": r["scores"], "candidate_scores": r["all_scores"]})
        best = f", best CLIP cosine {r['scores'][0]:.3f}" if r["scores"] else ""
        print(f"[{i + 1}/{len(args.prompt)}] {caption!r}: {args.n} sampled, {args.keep} kept{best} -> {grid}")
    record["seconds"] = round(time.time() - t0, 2)
    (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'samples.json'}")
    return record


if __name__ == "__main__":
    main()
