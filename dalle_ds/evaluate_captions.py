"""The demo's held-out report: train the CLIPs, sample for held-out captions with reranking, write
the grids, and print the shapes caption-match rates with 95% intervals, per caption kind and attribute.

    python -m dalle_ds.evaluate_captions --run runs/demo --checkpoint runs/demo/prior/export \\
        --dvae runs/demo/dvae/export [--tokenizer runs/demo/tokenizer.json] [--shards runs/demo/shards]

Held-out pool (``--heldout``, default ``RUN/heldout_shards``: ``make_shapes_corpus --split heldout``,
scenes whose caption *meaning* is held out from every training corpus), read in shard order and
split by distinct caption: the first ``--dev-captions`` are the *dev* captions (for choosing sampling
settings while developing: ``--split dev``), the next ``--captions`` the *test* captions that are
reported, and the ``--references`` images after them the references for FID / IS. A pool sample
whose json says ``split`` other than ``heldout`` is refused. Without the folder, held-out scenes are
drawn fresh (``make_sample(..., split="heldout")``, ``--heldout-seed``).

Overlap. Every training caption (the prior's token shards, from ``RUN/prior/config.yaml``, and the
CLIP's shards) is compared with the evaluated captions by string and by meaning
(``shapes_scorer.caption_key``); the counts are printed and stored, and any overlap exits with
status 3 (``--allow-overlap`` reports it and goes on).

Rates (``dalle_ds.evaluation.stats``), per caption: the prior samples ``-n`` candidates, the reranker
CLIP keeps the best ``--keep``.
- *without reranking*: the mean over all M x N candidates (what one random sample scores), with a
  caption-cluster bootstrap interval; *first candidate*: candidate 0 only (Wilson, n = M);
- *rerank top-1*: the CLIP's pick (Wilson, n = M); *top-k*: the kept ones (bootstrap);
- *any of N*: a caption with at least one matching candidate: the most a perfect reranker could pick.
Per caption kind (one object / two with a relation / two joined by "and") and per attribute
(count, colour, shape, size, position of a single object, relation of a pair, background), for all
candidates and for the top-1. Ceilings: the scorer on the real test images and on their dVAE
reconstructions (the most a perfect prior could score).

FID / IS (CLIP image features, blur radii 0, 2, 4, 8) of the kept samples against the references and
the CLIP score are judged by a *second* CLIP (``--judge-clip``, default ``RUN/clip_judge``), trained
separately (seed ``--judge-seed``, its own shuffle, in a parallel process) on the same training
shards; the reranker-judged CLIP score is reported too, labelled. ``--no-judge`` skips the judge and
labels the distribution metrics "reranker-judged". Writes ``OUT/grid.png`` (one row per caption: the
kept samples, best first), ``OUT/candidates_<i>.png``, ``OUT/kept/`` and ``OUT/demo_eval.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_ds.evaluation.stats import cluster_bootstrap, fmt, rate
from dalle_ds.sampling.generate import SamplingSettings, generate
from dalle_ds.sampling.grids import save_grid, to_pil
from dalle_ds.sampling.pipeline import Pipeline

EXIT_OVERLAP = 3
KIND_NAMES = {"single": "one object", "pair_relation": "two objects + relation", "pair_and": "two objects, 'and'"}
ATTR_NAMES = {"count": "count", "colour": "colour", "kind": "shape", "size": "size", "position": "position",
              "relation": "relation", "background": "background"}


def heldout(seed: int, count: int, size: int, offset: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Fresh held-out shapes-corpus scenes: images (count, 3, size, size) in [0, 1] and their captions."""
    from data_prep.make_shapes_corpus import make_sample

    images, captions = [], []
    for i in range(offset, offset + count):
        png, caption, _ = make_sample(seed, i, size, split="heldout")
        with Image.open(io.BytesIO(png)) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
        captions.append(caption)
    return torch.stack(images).float().div(255), captions


def read_pool(spec: str, size: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``limit`` samples of held-out image shards in stored order (centre crop to ``size``);
    refuses samples whose json marks them as another split."""
    from dalle_ds.data import storage
    from dalle_ds.data.augment import Augment
    from dalle_ds.data.loaders import iter_shard
    from dalle_ds.data.shards import IMAGE_EXTS

    augment = Augment("eval", size)
    images, captions = [], []
    for url in storage.expand_urls(spec):
        for s in iter_shard(url):
            meta = json.loads(s["json"]) if "json" in s else {}
            split = meta.get("split") if isinstance(meta, dict) else None
            if split not in (None, "heldout"):
                raise SystemExit(f"{url}: sample {s['__key__']!r} is from the {split!r} split, not held out "
                                 f"(draw the pool with make_shapes_corpus --split heldout)")
            ext = next(e for e in IMAGE_EXTS if e in s)
            with Image.open(io.BytesIO(s[ext])) as im:
                images.append(augment(im))
            captions.append(s["txt"].decode("utf-8").strip())
            if len(captions) >= limit:
                return torch.stack(images).float().div(255), captions
    if not captions:
        raise SystemExit(f"{spec}: no samples")
    return torch.stack(images).float().div(255), captions


def split_pool(captions: list[str], dev: int, test: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of the dev captions, the test captions (first occurrences of distinct strings, in pool
    order) and the reference images (every sample after the last test caption)."""
    seen: set[str] = set()
    firsts = []
    end = len(captions)
    for i, c in enumerate(captions):
        if c not in seen:
            seen.add(c)
            firsts.append(i)
            if len(firsts) == dev + test:
                end = i + 1
                break
    return firsts[:dev], firsts[dev:dev + test], list(range(end, len(captions)))


def training_captions(specs: list[str]) -> list[str]:
    """Every caption (``.txt``) of the training shards in ``specs`` (token or image shards)."""
    from dalle_ds.data import storage
    from dalle_ds.data.loaders import iter_shard

    out = []
    for spec in specs:
        for url in storage.expand_urls(spec):
            out += [s["txt"].decode("utf-8").strip() for s in iter_shard(url) if "txt" in s]
    return out


def overlap(evaluated: list[str], train: list[str]) -> dict:
    """How many evaluated captions occur in training by string, and by meaning (caption_key)."""
    from dalle_ds.evaluation.shapes_scorer import caption_key

    def key(c: str) -> str | None:
        try:
            return caption_key(c)
        except ValueError:
            return None

    strings = set(train)
    meanings = {key(c) for c in set(train)} - {None}
    return {"captions": len(evaluated), "training_captions": len(train), "distinct_training_captions": len(strings),
            "strings": sum(c in strings for c in evaluated),
            "meanings": sum(key(c) in meanings for c in evaluated if key(c) is not None)}


def default_training_specs(run: Path, clip_shards: str) -> list[str]:
    """The prior's token shards (``RUN/prior/config.yaml``: data.token_shards) and the CLIP's shards."""
    import yaml

    specs = []
    cfg = run / "prior" / "config.yaml"
    if cfg.is_file():
        token_shards = (yaml.safe_load(cfg.read_text()) or {}).get("data", {}).get("token_shards")
        if token_shards:
            specs.append(token_shards)
    specs.append(clip_shards)
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="demo folder (defaults below are inside it)")
    Pipeline.add_args(ap, tokenizer_default="RUN/tokenizer.json")
    ap.add_argument("--shards", default=None, help="training image shards for the CLIPs (default: RUN/shards)")
    ap.add_argument("--clip", default=None, help="reranker CLIP folder (default: RUN/clip; trained when missing)")
    ap.add_argument("--retrain-clip", action="store_true")
    ap.add_argument("--clip-steps", type=int, default=300)
    ap.add_argument("--clip-args", default="", help="extra train_clip flags for both CLIPs, e.g. '--patch 4'")
    ap.add_argument("--judge-clip", default=None, help="judge CLIP folder (default: RUN/clip_judge; trained when missing)")
    ap.add_argument("--judge-seed", type=int, default=1, help="the judge's seed (init and shuffle); the reranker's is 0")
    ap.add_argument("--no-judge", action="store_true", help="no second CLIP: FID/IS/CLIP score are reranker-judged")
    ap.add_argument("--out", default=None, help="default: RUN/eval")
    ap.add_argument("--split", choices=("test", "dev"), default="test", help="which held-out captions to evaluate")
    ap.add_argument("--dev-captions", type=int, default=64, help="distinct held-out captions kept for development")
    ap.add_argument("--captions", type=int, default=128, help="distinct held-out test captions")
    ap.add_argument("-n", type=int, default=16, help="candidates per caption")
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--references", type=int, default=256, help="held-out reference images for FID/IS")
    ap.add_argument("--heldout", default=None, help="held-out image shards (default: RUN/heldout_shards)")
    ap.add_argument("--heldout-seed", type=int, default=1000, help="draw held-out scenes when there is no --heldout")
    ap.add_argument("--train-captions", nargs="*", default=None,
                    help="training shards whose captions must not overlap (default: the prior's token shards "
                         "from RUN/prior/config.yaml and the CLIP shards)")
    ap.add_argument("--allow-overlap", action="store_true", help="report an overlap instead of exiting 3")
    ap.add_argument("--seed", type=int, default=0)
    SamplingSettings.add_args(ap)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--bootstrap", type=int, default=2000, help="caption-cluster bootstrap resamples")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads sampled 10x slower, "
                         "730 vs 7,850 image tokens/s at batch 256; 0: torch's choice)")
    return ap.parse_args(argv)


def _clip_cmd(args, shards: str, tokenizer: str, out: Path, size: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "dalle_ds.train_clip", "--shards", shards, "--tokenizer", tokenizer, "--out", str(out),
            "--steps", str(args.clip_steps), "--image-size", str(size), "--seed", str(seed), *args.clip_args.split()]


def train_clips(args, run: Path, shards: str, tokenizer: str, size: int) -> tuple[Path, Path | None]:
    """The reranker (seed 0) and the judge (``--judge-seed``), each trained when missing; two 1-thread
    processes side by side (train_clip runs one thread: the second core would idle)."""
    clip_dir = Path(args.clip or run / "clip")
    judge_dir = None if args.no_judge else Path(args.judge_clip or run / "clip_judge")
    jobs = []
    if args.retrain_clip or not (clip_dir / "config.json").is_file():
        jobs.append(("reranker", _clip_cmd(args, shards, tokenizer, clip_dir, size, args.seed)))
    if judge_dir is not None and (args.retrain_clip or not (judge_dir / "config.json").is_file()):
        jobs.append(("judge", _clip_cmd(args, shards, tokenizer, judge_dir, size, args.judge_seed)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    procs = []
    for name, cmd in jobs:
        print(f"demo_eval: training the {name} CLIP on {shards} ({args.clip_steps} steps)", flush=True)
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if name == "judge" else None)))
    for name, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"demo_eval: training the {name} CLIP failed (exit {p.returncode})")
    return clip_dir, judge_dir


def breakdown(rows: list[list[bool]], top1: list[bool], any_n: list[bool], iters: int) -> dict:
    """The rates of one group of captions (rows: per caption, its candidates' matches)."""
    k_all, n_all = sum(map(sum, rows)), sum(map(len, rows))
    lo, hi = cluster_bootstrap(rows, iters) if rows else (0.0, 1.0)
    return {"captions": len(rows),
            "without_rerank": {"k": k_all, "n": n_all, "rate": k_all / max(n_all, 1), "ci95": [round(lo, 4), round(hi, 4)],
                               "interval": "caption-cluster bootstrap"},
            "first_candidate": rate(sum(r[0] for r in rows), len(rows)),
            "rerank_top1": rate(sum(top1), len(top1)),
            "any_of_n": rate(sum(any_n), len(any_n))}


def attribute_table(scores: list[list], top1_idx: list[int], iters: int) -> dict:
    """Per attribute: all candidates (k/n, caption-cluster bootstrap) and the reranked top-1 (Wilson)."""
    from dalle_ds.evaluation.shapes_scorer import ATTRIBUTES, attribute_checks

    checks = [[attribute_checks(s) for s in row] for row in scores]
    out = {}
    for attr in ATTRIBUTES:
        rows = [[c[attr] for c in row] for row in checks if attr in row[0]]
        if not rows:
            continue
        top = [row[j][attr] for row, j in zip(checks, top1_idx) if attr in row[0]]
        k, n = sum(map(sum, rows)), sum(map(len, rows))
        lo, hi = cluster_bootstrap(rows, iters)
        out[attr] = {"all": {"k": k, "n": n, "rate": k / n, "ci95": [round(lo, 4), round(hi, 4)]},
                     "top1": rate(sum(top), len(top))}
    return out


def main(argv: list[str] | None = None) -> dict:
    from dalle_ds.evaluation import metrics
    from dalle_ds.evaluation.shapes_scorer import caption_kind, compare, detect, parse_caption, score
    from dalle_ds.models.dvae_io import load_dvae
    from dalle_ds.sampling.rerank import ClipScorer, clip_score, rerank

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    tokenizer = args.tokenizer or str(run / "tokenizer.json")
    shards = str(args.shards or run / "shards")
    out = Path(args.out or run / "eval")
    t_start = time.time()
    size = load_dvae(args.dvae).cfg.downsample * json.loads(Path(args.checkpoint, "config.json").read_text())["image_grid"]

    # 1. the held-out pool: dev / test captions, references; overlap with every training caption
    heldout_spec = args.heldout or (str(run / "heldout_shards") if (run / "heldout_shards").is_dir() else None)
    want = (args.dev_captions + args.captions) * 3 + args.references
    if heldout_spec:
        pool, pool_caps = read_pool(heldout_spec, size, want)
        source = heldout_spec
    else:
        pool, pool_caps = heldout(args.heldout_seed, want, size)
        source = f"fresh held-out scenes (seed {args.heldout_seed})"
    dev_idx, test_idx, ref_idx = split_pool(pool_caps, args.dev_captions, args.captions)
    if len(test_idx) < args.captions or len(ref_idx) < 2:
        raise SystemExit(f"{source}: {len(pool_caps)} samples give {len(dev_idx)} dev + {len(test_idx)} test "
                         f"distinct captions and {len(ref_idx)} references; need {args.dev_captions} + "
                         f"{args.captions} and >= 2 (draw more held-out scenes)")
    ref_idx = ref_idx[:args.references]
    idx = test_idx if args.split == "test" else dev_idx
    captions = [pool_caps[i] for i in idx]
    real = pool[idx]
    ref, ref_caps = pool[ref_idx], [pool_caps[i] for i in ref_idx]
    train_specs = args.train_captions if args.train_captions is not None else default_training_specs(run, shards)
    train_caps = training_captions(train_specs)
    ov = overlap(captions, train_caps)
    ov["training_shards"] = train_specs
    print(f"demo_eval: {len(captions)} {args.split} captions and {len(ref_caps)} references from {source}")
    print(f"demo_eval: held-out overlap with training: {ov['strings']}/{len(captions)} caption strings, "
          f"{ov['meanings']}/{len(captions)} meanings ({ov['distinct_training_captions']:,} distinct training captions)",
          flush=True)
    if (ov["strings"] or ov["meanings"]) and not args.allow_overlap:
        print("demo_eval: held-out captions occur in training; refusing to report (--allow-overlap)", file=sys.stderr)
        raise SystemExit(EXIT_OVERLAP)

    # 2. the CLIPs: reranker and judge, trained side by side on the training shards
    clip_dir, judge_dir = train_clips(args, run, shards, tokenizer, size)
    pipe = Pipeline(args.checkpoint, args.dvae, tokenizer, str(clip_dir))
    judge = ClipScorer.load(judge_dir) if judge_dir is not None else None

    # 3. sample every caption's candidates, batched across captions
    settings = SamplingSettings.from_args(args)
    rows = [(i, j) for i in range(len(captions)) for j in range(args.n)]
    text = pipe.tokenizer.encode(captions)  # (M, T)
    images = []
    t0 = time.time()
    for b in range(0, len(rows), args.batch_size):
        chunk = rows[b:b + args.batch_size]
        sel = torch.tensor([i for i, _ in chunk])
        seeds = [args.seed + i * args.n + j for i, j in chunk]
        codes = generate(pipe.prior, text[sel], seeds, settings)
        images.append(pipe.vae.decode(codes).float().cpu())
        print(f"demo_eval: sampled {b + len(chunk)}/{len(rows)} candidates ({time.time() - t0:.0f} s)", flush=True)
    images_t = torch.cat(images).view(len(captions), args.n, *images[0].shape[1:])  # (M, N, 3, H, W)
    sample_seconds = time.time() - t0

    # 4. rerank, score, write
    out.mkdir(parents=True, exist_ok=True)
    (out / "kept").mkdir(exist_ok=True)
    records, kept, kept_caps, all_scores, match_rows, top1, topk_rows, top1_idx = [], [], [], [], [], [], [], []
    for i, caption in enumerate(captions):
        cands = images_t[i]
        order, clip_scores = rerank(pipe.scorer, cands, caption, args.keep)
        scores = [compare(detect(img), caption) for img in cands]
        matches = [s.match for s in scores]
        all_scores.append(scores)
        match_rows.append(matches)
        top1.append(matches[int(order[0])])
        top1_idx.append(int(order[0]))
        topk_rows.append([matches[j] for j in order.tolist()])
        save_grid(cands, out / f"candidates_{i:03d}.png")
        for r, j in enumerate(order.tolist()):
            to_pil(cands[j]).save(out / "kept" / f"{i:03d}_{r:02d}.png")
            (out / "kept" / f"{i:03d}_{r:02d}.txt").write_text(caption + "\n")
        kept.append(cands[order])
        kept_caps += [caption] * args.keep
        records.append({"caption": caption, "kind": caption_kind(parse_caption(caption)),
                        "seeds": [args.seed + i * args.n + j for j in order.tolist()],
                        "scores": [float(clip_scores[j]) for j in order.tolist()],
                        "kept_match": [matches[j] for j in order.tolist()], "candidate_match": matches,
                        "candidate_checks": [s.checks for s in scores]})
    kept_t = torch.cat(kept)  # (M * k, 3, H, W)
    save_grid(kept_t, out / "grid.png", cols=args.keep)
    m = len(captions)
    any_n = [any(r) for r in match_rows]
    overall = breakdown(match_rows, top1, any_n, args.bootstrap)
    topk_lo, topk_hi = cluster_bootstrap(topk_rows, args.bootstrap)
    overall[f"rerank_top{args.keep}"] = {"rate": sum(map(sum, topk_rows)) / (m * args.keep),
                                         "ci95": [round(topk_lo, 4), round(topk_hi, 4)]}
    kinds = {}
    for kind in KIND_NAMES:
        sel = [i for i, r in enumerate(records) if r["kind"] == kind]
        if sel:
            kinds[kind] = breakdown([match_rows[i] for i in sel], [top1[i] for i in sel], [any_n[i] for i in sel],
                                    args.bootstrap)
    attributes = attribute_table(all_scores, top1_idx, args.bootstrap)
    rates = {"without_rerank": overall["without_rerank"]["rate"], "rerank_top1": overall["rerank_top1"]["rate"],
             f"rerank_top{args.keep}": overall[f"rerank_top{args.keep}"]["rate"],
             "first_candidate": overall["first_candidate"]["rate"], "any_of_n": overall["any_of_n"]["rate"]}

    # 5. ceilings: the scorer on the real test images and on their dVAE reconstructions
    with torch.no_grad():
        recon = torch.cat([pipe.vae.decode(pipe.vae.encode(real[b:b + 128])).float()
                           for b in range(0, len(real), 128)])
    ceilings = {"real": rate(sum(score(x, c).match for x, c in zip(real, captions)), m),
                "dvae_reconstructions": rate(sum(score(x, c).match for x, c in zip(recon, captions)), m),
                "references": rate(sum(score(x, c).match for x, c in zip(ref, ref_caps)), len(ref_caps))}

    # 6. distribution metrics of the kept samples against held-out references, judged by the second CLIP
    assessor = judge if judge is not None else pipe.scorer
    extractor = metrics.load_extractor(None, assessor, labels=ref_caps)
    dist = {"judge": "judge CLIP (separately trained, seed %d; not the reranker)" % args.judge_seed
            if judge is not None else "reranker-judged (no second CLIP)",
            "extractor": extractor.name, "fid": {}, "is": {}}
    for radius in (0, 2, 4, 8):
        fake, reals = metrics.gaussian_blur(kept_t, radius), metrics.gaussian_blur(ref, radius)
        dist["fid"][str(radius)] = metrics.fid(extractor, reals, fake)
        dist["is"][str(radius)] = metrics.inception_score(extractor, fake)[0]
    dist["clip_score"] = clip_score(assessor, kept_t, kept_caps)
    dist["clip_score_references"] = clip_score(assessor, ref, ref_caps)
    dist["clip_score_reranker_judged"] = clip_score(pipe.scorer, kept_t, kept_caps)

    result = {"split": args.split, "captions": m, "candidates": args.n, "keep": args.keep, "overlap": ov,
              "sampling": vars(settings), "caption_match": rates, "rates": overall, "kinds": kinds,
              "attributes": attributes, "ceilings": ceilings,
              "caption_match_references": ceilings["references"]["rate"], "metrics": dist,
              "sample_seconds": round(sample_seconds, 1),
              "image_tokens_per_s": round(m * args.n * pipe.prior.cfg.image_len / sample_seconds, 1),
              "seconds": round(time.time() - t_start, 1), "prompts": records}
    (out / "demo_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print_report(result, out)
    return result


def print_report(r: dict, out: Path) -> None:
    n, k, m = r["candidates"], r["keep"], r["captions"]
    ov = r["overlap"]
    sp = r["sampling"]
    print(f"demo_eval: caption-match, {m} held-out {r['split']} captions x {n} candidates (CLIP keeps {k}); overlap "
          f"with training {ov['strings']} strings / {ov['meanings']} meanings; grids in {out}")
    print(f"demo_eval: sampling temperature {sp['temperature']}, top-k {sp['top_k']}, top-p {sp['top_p']}, "
          f"guidance scale {sp.get('guidance_scale', 1.0)}" + ("" if sp.get("guidance_scale", 1.0) != 1.0 else " (off)"))
    print(f"demo_eval: caption-match without reranking {fmt(r['rates']['without_rerank'])} | with reranking: top-1 "
          f"{fmt(r['rates']['rerank_top1'])}, top-{k} {r['caption_match'][f'rerank_top{k}']:.3f} "
          f"| any of {n} {fmt(r['rates']['any_of_n'])} | real held-out images {r['ceilings']['real']['rate']:.3f}")
    w = 34
    print(f"{'':{w}}{'without rerank':26}{'rerank top-1':26}{'first candidate':26}any of {n}")
    groups = [("all", r["rates"])] + [(f"{KIND_NAMES[kd]} (n={v['captions']})", v) for kd, v in r["kinds"].items()]
    for name, g in groups:
        print(f"{name:{w}}{fmt(g['without_rerank']):26}{fmt(g['rerank_top1']):26}{fmt(g['first_candidate']):26}"
              f"{fmt(g['any_of_n'])}")
    print(f"{'attribute':{w}}{'all candidates (k/n)':34}{'rerank top-1 (k/n)':34}")
    for attr, v in r["attributes"].items():
        a, t = v["all"], v["top1"]
        print(f"{ATTR_NAMES[attr]:{w}}{fmt(a) + ' ' + str(a['k']) + '/' + str(a['n']):34}"
              f"{fmt(t) + ' ' + str(t['k']) + '/' + str(t['n']):34}")
    c = r["ceilings"]
    print(f"ceilings (scorer on the real test images / their dVAE reconstructions): {c['real']['rate']:.3f} / "
          f"{fmt(c['dvae_reconstructions'])}")
    d = r["metrics"]
    print(f"demo_eval: {d['judge']}: FID " + " ".join(f"r{rad}={v:.2f}" for rad, v in d["fid"].items())
          + f"; IS (r0) {d['is']['0']:.2f}; CLIP score {d['clip_score']:.1f} (references "
          f"{d['clip_score_references']:.1f}); reranker-judged CLIP score {d['clip_score_reranker_judged']:.1f}")


if __name__ == "__main__":
    main()
