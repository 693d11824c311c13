"""The demo's last stage: train the tiny CLIP, sample for held-out captions with reranking, write
the grids, and print the shapes caption-match rate with and without reranking.

    python -m dalle_ds.evaluate_captions --run runs/demo --checkpoint runs/demo/prior/export \\
        --dvae runs/demo/dvae/export [--tokenizer runs/demo/tokenizer.json] [--shards 'runs/demo/shards/*.tar']

Held-out captions: the first ``--captions`` samples of ``--heldout`` (image shards or a folder of
images + .txt; default ``RUN/heldout_shards``, which ``make demo`` draws with another corpus seed),
the next ``--references`` samples are the reference images. Without that folder, scenes are drawn
fresh by data_prep/make_shapes_corpus.py with ``--heldout-seed``. Either way neither the captions'
scenes nor their images were trained on. For each of
``--captions`` captions the prior samples ``-n`` candidates (sampled together across captions in
batches of ``--batch-size``), the CLIP keeps the best ``--keep``.

Caption-match rates (dalle_ds.evaluation.shapes_scorer): *without reranking* is the mean over all candidates
(what one random sample scores), *with reranking* the rate of the CLIP's top-1, and of its top-k.
Also FID / IS (CLIP image encoder; blur radii 0, 2, 4, 8) of the top-k against held-out reference
images, and the CLIP score. Writes ``OUT/grid.png`` (one row per caption: the kept samples, best
first), ``OUT/candidates_<i>.png``, ``OUT/kept/`` (images + captions) and ``OUT/demo_eval.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_ds.sampling.grids import save_grid, to_pil
from dalle_ds.sampling.pipeline import Pipeline
from dalle_ds.sampling.generate import SamplingSettings, generate


def heldout(seed: int, count: int, size: int, offset: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Fresh shapes-corpus scenes: images (count, 3, size, size) in [0, 1] and their captions."""
    from data_prep.make_shapes_corpus import make_sample

    images, captions = [], []
    for i in range(offset, offset + count):
        png, caption, _ = make_sample(seed, i, size)
        with Image.open(io.BytesIO(png)) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
        captions.append(caption)
    return torch.stack(images).float().div(255), captions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="demo folder (defaults below are inside it)")
    Pipeline.add_args(ap, tokenizer_default="RUN/tokenizer.json")
    ap.add_argument("--shards", default=None, help="image shards for the CLIP (default: RUN/shards)")
    ap.add_argument("--clip", default=None, help="CLIP folder (default: RUN/clip; trained when missing)")
    ap.add_argument("--retrain-clip", action="store_true")
    ap.add_argument("--clip-steps", type=int, default=300)
    ap.add_argument("--out", default=None, help="default: RUN/eval")
    ap.add_argument("--captions", type=int, default=16, help="held-out captions")
    ap.add_argument("-n", type=int, default=16, help="candidates per caption")
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--references", type=int, default=256, help="held-out reference images for FID/IS")
    ap.add_argument("--heldout", default=None, help="held-out image shards or folder (default: RUN/heldout_shards)")
    ap.add_argument("--heldout-seed", type=int, default=1000, help="draw held-out scenes when there is no --heldout")
    ap.add_argument("--seed", type=int, default=0)
    SamplingSettings.add_args(ap)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from dalle_ds.evaluation import metrics
    from dalle_ds.sampling.rerank import clip_score, rerank
    from dalle_ds.evaluation.shapes_scorer import score

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    tokenizer = args.tokenizer or str(run / "tokenizer.json")
    clip_dir = Path(args.clip or run / "clip")
    out = Path(args.out or run / "eval")
    t_start = time.time()

    # 1. the CLIP: the project's small one, trained on the same shards
    from dalle_ds.models.dvae_io import load_dvae

    size = load_dvae(args.dvae).cfg.downsample * json.loads(Path(args.checkpoint, "config.json").read_text())["image_grid"]
    if args.retrain_clip or not (clip_dir / "config.json").is_file():
        from dalle_ds import train_clip

        print(f"demo_eval: training the CLIP on {args.shards or run / 'shards'} ({args.clip_steps} steps)")
        train_clip.main(["--shards", str(args.shards or run / "shards"), "--tokenizer", tokenizer, "--out",
                         str(clip_dir), "--steps", str(args.clip_steps), "--image-size", str(size)])
    pipe = Pipeline(args.checkpoint, args.dvae, tokenizer, str(clip_dir))

    # 2. sample every caption's candidates, batched across captions
    heldout_spec = args.heldout or (str(run / "heldout_shards") if (run / "heldout_shards").is_dir() else None)
    if heldout_spec:
        from dalle_ds.evaluate import load_images

        pool, pool_caps = load_images(heldout_spec, size, args.captions + args.references)
        if len(pool_caps) <= args.captions + 1:
            raise SystemExit(f"{heldout_spec}: {len(pool_caps)} samples; need more than --captions {args.captions} + 1")
        captions, ref, ref_caps = pool_caps[:args.captions], pool[args.captions:], pool_caps[args.captions:]
        print(f"demo_eval: held-out captions and {len(ref_caps)} references from {heldout_spec}")
    else:
        _, captions = heldout(args.heldout_seed, args.captions, size)
        ref, ref_caps = heldout(args.heldout_seed, args.references, size, offset=args.captions)
    settings = SamplingSettings.from_args(args)
    rows = [(i, j) for i in range(len(captions)) for j in range(args.n)]
    text = pipe.tokenizer.encode(captions)  # (M, T)
    images = []
    t0 = time.time()
    for b in range(0, len(rows), args.batch_size):
        chunk = rows[b:b + args.batch_size]
        idx = torch.tensor([i for i, _ in chunk])
        seeds = [args.seed + i * args.n + j for i, j in chunk]
        codes = generate(pipe.prior, text[idx], seeds, settings, progress=True)
        images.append(pipe.vae.decode(codes).float().cpu())
        print(f"demo_eval: sampled {b + len(chunk)}/{len(rows)} candidates ({time.time() - t0:.0f} s)")
    images_t = torch.cat(images).view(len(captions), args.n, *images[0].shape[1:])  # (M, N, 3, H, W)
    sample_seconds = time.time() - t0

    # 3. rerank, score, write
    out.mkdir(parents=True, exist_ok=True)
    (out / "kept").mkdir(exist_ok=True)
    records, kept, kept_caps = [], [], []
    all_match = top1_match = topk_match = 0
    for i, caption in enumerate(captions):
        cands = images_t[i]
        order, scores = rerank(pipe.scorer, cands, caption, args.keep)
        matches = [score(img, caption).match for img in cands]
        all_match += sum(matches)
        top1_match += matches[order[0]]
        topk_match += sum(matches[j] for j in order.tolist())
        save_grid(cands, out / f"candidates_{i:03d}.png")
        for r, j in enumerate(order.tolist()):
            to_pil(cands[j]).save(out / "kept" / f"{i:03d}_{r:02d}.png")
            (out / "kept" / f"{i:03d}_{r:02d}.txt").write_text(caption + "\n")
        kept.append(cands[order])
        kept_caps += [caption] * args.keep
        records.append({"caption": caption, "seeds": [args.seed + i * args.n + j for j in order.tolist()],
                        "scores": [float(scores[j]) for j in order.tolist()], "kept_match": [matches[j] for j in order.tolist()],
                        "candidate_match": matches})
    kept_t = torch.cat(kept)  # (M * k, 3, H, W)
    save_grid(kept_t, out / "grid.png", cols=args.keep)
    m = len(captions)
    rates = {"without_rerank": all_match / (m * args.n), "rerank_top1": top1_match / m,
             f"rerank_top{args.keep}": topk_match / (m * args.keep)}

    # 4. distribution metrics of the kept samples against held-out references (CLIP features)
    extractor = metrics.load_extractor(None, pipe.scorer, labels=ref_caps)
    dist = {"extractor": extractor.name, "fid": {}, "is": {}}
    for radius in (0, 2, 4, 8):
        fake, real = metrics.gaussian_blur(kept_t, radius), metrics.gaussian_blur(ref, radius)
        dist["fid"][str(radius)] = metrics.fid(extractor, real, fake)
        dist["is"][str(radius)] = metrics.inception_score(extractor, fake)[0]
    dist["clip_score"] = clip_score(pipe.scorer, kept_t, kept_caps)
    dist["clip_score_references"] = clip_score(pipe.scorer, ref, ref_caps)
    ref_match = sum(score(img, c).match for img, c in zip(ref, ref_caps)) / len(ref_caps)

    result = {"captions": m, "candidates": args.n, "keep": args.keep, "caption_match": rates,
              "caption_match_references": ref_match, "metrics": dist, "sample_seconds": round(sample_seconds, 1),
              "image_tokens_per_s": round(m * args.n * pipe.prior.cfg.image_len / sample_seconds, 1),
              "seconds": round(time.time() - t_start, 1), "prompts": records}
    (out / "demo_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"demo_eval: {m} held-out captions x {args.n} candidates, CLIP keeps {args.keep}; grids in {out}")
    print(f"demo_eval: caption-match without reranking {rates['without_rerank']:.3f} | with reranking: "
          f"top-1 {rates['rerank_top1']:.3f}, top-{args.keep} {rates[f'rerank_top{args.keep}']:.3f} "
          f"| real held-out images {ref_match:.3f}")
    print(f"demo_eval: {dist['extractor']}: FID " + " ".join(f"r{r}={v:.2f}" for r, v in dist["fid"].items())
          + f"; IS (r0) {dist['is']['0']:.2f}; CLIP score {dist['clip_score']:.1f} "
          f"(references {dist['clip_score_references']:.1f})")
    return result


if __name__ == "__main__":
    main()
