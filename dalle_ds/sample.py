"""Sample images for captions, rerank them with CLIP, write PNG grids and a JSON record.

    python -m dalle_ds.sample --bundle runs/demo/bundle --prompt "a red circle above a blue square" -n 64 --keep 8 \\
        [--clip runs/demo/clip] [--image-prompt photo.png --prompt-rows 7] [--output runs/demo/samples]
    python -m dalle_ds.sample --checkpoint runs/tiny/export --dvae runs/demo/dvae/export \\
        --tokenizer runs/demo/tokenizer.json --prompt ...          # the parts of a bundle, one by one

For each prompt: N candidates (candidate j of prompt i uses seed ``--seed + i * N + j``), decoded
with the dVAE, scored against the caption with the CLIP folder when given (best ``--keep`` kept,
best first), else the first ``--keep``. Writes ``OUT/grid_<i>.png`` (the kept samples; with
``--all-grid`` also ``OUT/all_<i>.png``, every candidate), ``OUT/kept/<i>_<rank>.png`` + ``.txt`` per
kept sample (the image-folder layout ``dalle_ds.evaluate --samples OUT/kept`` and
``dalle_ds.evaluation.shapes_scorer`` read) and ``OUT/samples.json``.

Image completion (``--image-prompt``): the prompt image is centre-cropped and resized to the dVAE's
input size, encoded, and the top ``--prompt-rows`` rows of its codes are kept (paper: 15 of 32;
default scaled to the grid); the prior samples the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dalle_ds import cli_args
from dalle_ds.parallel.dist import default_device
from dalle_ds.sampling.generate import SamplingSettings, default_prompt_rows
from dalle_ds.sampling.grids import save_grid, to_pil
from dalle_ds.sampling.pipeline import Pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = cli_args.Parser(description=__doc__.split("\n\n")[0])
    Pipeline.add_args(ap)
    ap.add_argument("--prompt", action="append", default=[], help="a caption (repeat for several)")
    ap.add_argument("--prompts-file", default=None, help="one caption per line")
    ap.add_argument("-n", type=int, default=64, help="candidates per caption")
    ap.add_argument("--keep", type=int, default=8, help="best candidates kept after reranking")
    ap.add_argument("--clip", default=None, help="CLIP for reranking: a folder (Hugging Face or dalle_ds/train_clip.py) "
                                                 "or a Hugging Face model id in the local cache")
    ap.add_argument("--image-prompt", default=None, help="image whose top rows of codes are kept (completion)")
    ap.add_argument("--prompt-rows", type=int, default=None, help="rows kept (default: 15/32 of the grid)")
    SamplingSettings.add_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="candidates sampled at once")
    ap.add_argument("--device", default=str(default_device()), help="default: cuda:LOCAL_RANK%%count, else cpu")
    cli_args.add_output(ap, default="samples")
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
    settings = SamplingSettings.from_args(args)
    pipe = Pipeline.from_args(args, batch_size=args.batch_size)
    g = pipe.prior.cfg.image_grid
    prompt_codes, rows = None, None
    if args.image_prompt:
        rows = args.prompt_rows or default_prompt_rows(g)
        prompt_codes = pipe.prompt_codes(args.image_prompt, rows)
    out = Path(args.output)
    (out / "kept").mkdir(parents=True, exist_ok=True)
    record = {"bundle": args.bundle, "checkpoint": args.checkpoint, "dvae": args.dvae, "clip": args.clip, "sampling": asdict(settings),
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
    raise SystemExit(cli_args.run(lambda argv: main(argv) and 0))
