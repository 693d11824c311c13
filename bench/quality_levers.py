"""Caption-match on the 64 held-out *dev* captions for priors x sampling settings x reranker CLIPs
(issue #16: the levers are chosen here, never on the 128 test captions).

    python -m bench.quality_levers --run runs/demo_base --dvae runs/demo_base/dvae/export \\
        --prior "base:runs/demo_base/prior/export" --prior "cfg:runs/lev/cfg/export" \\
        --setting "t1:temperature=1" --setting "cfg3:guidance_scale=3,temperature=1" \\
        --clip "r300:runs/demo_base/clip" --clip "r900:runs/lev/clip900" --record-suffix _cfg

For every (prior, setting) the dev captions' ``-n`` candidates are sampled once (KV cache, fixed
seeds as in ``evaluate_captions``) and scored by the shapes scorer; every reranker CLIP then picks
its top-1 from the same candidates, so CLIPs are compared on identical samples. Rates with 95%
intervals (``dalle_ds.evaluation.stats``): without reranking (caption-cluster bootstrap), any of N
and each CLIP's top-1 (Wilson). Writes ``bench/results/quality_levers<suffix>-*.json`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.harness import Recorder


def parse_setting(spec: str) -> tuple[str, dict]:
    """``label:key=value,key=value`` -> (label, SamplingSettings kwargs)."""
    label, _, body = spec.partition(":")
    kwargs = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in ("temperature", "top_k", "top_p", "guidance_scale"):
            raise SystemExit(f"--setting {spec!r}: unknown key {key!r} (temperature, top_k, top_p, guidance_scale)")
        kwargs[key] = int(value) if key == "top_k" else float(value)
    return label, kwargs


def labelled(spec: str, flag: str) -> tuple[str, str]:
    label, sep, path = spec.partition(":")
    if not sep or not path:
        raise SystemExit(f"{flag} {spec!r}: expected LABEL:PATH")
    return label, path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="demo folder: heldout_shards/ and tokenizer.json")
    ap.add_argument("--dvae", required=True)
    ap.add_argument("--prior", action="append", required=True, help="LABEL:EXPORT (repeatable)")
    ap.add_argument("--setting", action="append", default=None, help="LABEL:key=value,... (repeatable)")
    ap.add_argument("--clip", action="append", required=True, help="LABEL:CLIP_FOLDER (repeatable)")
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--dev-captions", type=int, default=64)
    ap.add_argument("--captions", type=int, default=128)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record-suffix", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dalle_ds.data.tokenizer import TextTokenizer
    from dalle_ds.evaluate_captions import read_pool, split_pool
    from dalle_ds.evaluation.shapes_scorer import ATTRIBUTES, attribute_checks, compare, detect
    from dalle_ds.evaluation.stats import cluster_bootstrap, fmt, rate
    from dalle_ds.models.dvae_io import load_dvae
    from dalle_ds.sampling.generate import SamplingSettings, generate, load_prior
    from dalle_ds.sampling.rerank import ClipScorer, rerank

    run = Path(args.run)
    vae = load_dvae(args.dvae).eval()
    clips = [(label, ClipScorer.load(path)) for label, path in (labelled(c, "--clip") for c in args.clip)]
    settings = [parse_setting(s) for s in (args.setting or ["t1:temperature=1"])]
    rec = Recorder("quality_levers" + args.record_suffix)
    table = []
    for prior_label, export in (labelled(p, "--prior") for p in args.prior):
        prior = load_prior(export)
        size = vae.cfg.downsample * prior.cfg.image_grid
        want = (args.dev_captions + args.captions) * 3
        _, pool_caps = read_pool(str(run / "heldout_shards"), size, want)
        dev_idx, test_idx, _ = split_pool(pool_caps, args.dev_captions, args.captions)
        captions = [pool_caps[i] for i in (dev_idx if args.split == "dev" else test_idx)]
        tokenizer = TextTokenizer.from_file(str(run / "tokenizer.json"), prior.cfg.text_len, prior.cfg.text_vocab_size)
        text = tokenizer.encode(captions)  # (M, T)
        rows = [(i, j) for i in range(len(captions)) for j in range(args.n)]
        for set_label, kwargs in settings:
            s = SamplingSettings(**kwargs).validate()
            t0 = time.time()
            images = []
            for b in range(0, len(rows), args.batch_size):
                chunk = rows[b:b + args.batch_size]
                sel = torch.tensor([i for i, _ in chunk])
                seeds = [args.seed + i * args.n + j for i, j in chunk]
                with torch.no_grad():
                    images.append(vae.decode(generate(prior, text[sel], seeds, s)).float().clamp(0, 1))
            seconds = time.time() - t0
            cands = torch.cat(images).view(len(captions), args.n, *images[0].shape[1:])  # (M, N, 3, H, W)
            scores = [[compare(detect(img), c) for img in cands[i]] for i, c in enumerate(captions)]
            matches = [[sc.match for sc in row] for row in scores]
            checks = [attribute_checks(sc) for row in scores for sc in row]  # per candidate: attribute -> bool
            k_all = sum(map(sum, matches))
            lo, hi = cluster_bootstrap(matches)
            without = {"k": k_all, "n": len(rows), "rate": k_all / len(rows), "ci95": [round(lo, 4), round(hi, 4)]}
            any_n = rate(sum(any(r) for r in matches), len(captions))
            top1 = {}
            for clip_label, scorer in clips:
                picks = [int(rerank(scorer, cands[i], c, 1)[0][0]) for i, c in enumerate(captions)]
                top1[clip_label] = rate(sum(matches[i][p] for i, p in enumerate(picks)), len(captions))
            common = {"prior": prior_label, "export": export, "setting": set_label, "sampling": vars(s),
                      "split": args.split, "captions": len(captions), "candidates": args.n}
            rec.add("without_rerank", without["rate"], "fraction", ci95=without["ci95"], **common)
            rec.add("any_of_n", any_n["rate"], "fraction", ci95=any_n["ci95"], **common)
            for clip_label, r in top1.items():
                rec.add("rerank_top1", r["rate"], "fraction", ci95=r["ci95"], clip=clip_label, **common)
            for attr in ATTRIBUTES:  # what the candidates get right, attribute by attribute (all candidates)
                hits = [c[attr] for c in checks if attr in c]
                if hits:
                    rec.add(f"attribute/{attr}", sum(hits) / len(hits), "fraction", k=sum(hits), n=len(hits), **common)
            rec.add("sample_seconds", seconds, "s", **common)
            table.append((prior_label, set_label, fmt(without), fmt(any_n),
                          " ".join(f"{k} {fmt(v)}" for k, v in top1.items())))
    rec.save()
    print("| prior | sampling | without rerank | any of %d | rerank top-1 |" % args.n)
    print("|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
