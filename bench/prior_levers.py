"""Record what each quality lever of the tiny demo bought (issue #16), from finished run folders.

    python -m bench.prior_levers --row "z3 default:runs/lev/p_z3def" --row "z3 persist:runs/lev/p_z3small" \\
        --dvae-row "dvae 32px 1000:runs/lev/dvae32_export1000:32" --note "load average 13 (shared box)" \\
        --eval-row "2400 updates:runs/long/eval_dev_2400/demo_eval.json"

A prior row reads ``RUN/metrics.jsonl`` (updates, wall seconds between the first and last logged
update, seconds per update, sequences/s), ``RUN/eval.jsonl`` (the last validation losses),
``RUN/config.yaml`` (the levers: grid, text_len, dropout, micro-batch, schedule, lr, ZeRO JSON) and,
when present, ``RUN/eval/demo_eval.json`` (caption-match with intervals). A dVAE row decodes the
first 400 held-out images through the export (``--heldout``) and scores the reconstructions: the
ceiling a perfect prior could reach with that dVAE. An eval row records one ``evaluate_captions`` report
as it is (rates with intervals, per kind and attribute). Writes ``bench/results/prior_levers-*.json``
(the harness's machine, date and command) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from bench.harness import Recorder


def prior_row(label: str, run: Path) -> dict:
    import yaml

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()] if (run / "eval.jsonl").is_file() else []
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ds = json.loads((run / "ds_config.json").read_text()) if (run / "ds_config.json").is_file() else {}
    timed = [r for r in rows if "tokens_per_s" in r]
    seq = cfg["model"]["text_len"] + cfg["model"]["image_grid"] ** 2
    tokens_per_update = cfg["optim"]["micro_batch_size"] * cfg["optim"]["grad_accum_steps"] * 2 * seq
    s_per_update = sum(tokens_per_update / r["tokens_per_s"] for r in timed) / len(timed) if timed else None
    out = {"label": label, "run": str(run), "updates": rows[-1]["step"],
           "grid": cfg["model"]["image_grid"], "text_len": cfg["model"]["text_len"],
           "bpe_dropout": cfg["data"]["bpe_dropout"], "micro_batch": cfg["optim"]["micro_batch_size"],
           "schedule": cfg["optim"].get("schedule", "plateau"), "lr": cfg["optim"]["lr"],
           "persistence_threshold": ds.get("zero_optimization", {}).get("stage3_param_persistence_threshold"),
           "s_per_update": s_per_update, "sequences_per_s": (tokens_per_update / seq / s_per_update) if s_per_update else None,
           "train_image_loss_last50": sum(r["image_loss"] for r in rows[-50:]) / len(rows[-50:]),
           "val": evals[-1] if evals else None}
    demo = run / "eval" / "demo_eval.json"
    if demo.is_file():
        d = json.loads(demo.read_text())
        out["caption_match"] = {k: d["rates"][k] for k in ("without_rerank", "rerank_top1", "any_of_n", "first_candidate")}
        out["eval_split"], out["eval_captions"] = d["split"], d["captions"]
        out["ceilings"] = d["ceilings"]
    return out


def eval_row(label: str, report: Path) -> dict:
    """One ``evaluate_captions`` report (``demo_eval.json``), e.g. a checkpoint of a longer run on the dev
    captions: the caption-match rates with intervals, per caption kind, and the sampling settings."""
    d = json.loads(report.read_text())
    return {"label": label, "report": str(report), "split": d["split"], "captions": d["captions"],
            "candidates": d["candidates"], "sampling": d["sampling"],
            "rates": {k: d["rates"][k] for k in ("without_rerank", "rerank_top1", "any_of_n", "first_candidate")},
            "kinds": {k: {r: v[r] for r in ("without_rerank", "rerank_top1", "any_of_n")} for k, v in d["kinds"].items()},
            "attributes": {k: v["all"] for k, v in d["attributes"].items()}}


def dvae_row(label: str, export: str, size: int, heldout: str, n: int = 400) -> dict:
    import torch

    from dalle_ds.evaluate_captions import read_pool
    from dalle_ds.evaluation.shapes_scorer import attribute_counts
    from dalle_ds.evaluation.stats import rate
    from dalle_ds.models.dvae_io import load_dvae

    vae = load_dvae(export).eval()
    x, caps = read_pool(heldout, size, n)
    with torch.no_grad():
        r = torch.cat([vae.decode(vae.encode(x[i:i + 100])).float() for i in range(0, len(x), 100)])
    counts = attribute_counts(list(r), caps)
    mse = float(((r - x) ** 2).mean())
    return {"label": label, "export": export, "image_size": size, "grid": size // vae.cfg.downsample,
            "step": vae.export_meta.get("step"), "psnr": 10 * math.log10(1 / mse),
            "reconstruction_caption_match": rate(*counts["match"]),
            "attributes": {k: rate(*v) for k, v in counts.items() if k not in ("match", "understood")}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", action="append", default=[], help="LABEL:RUN_DIR of a prior run")
    ap.add_argument("--eval-row", action="append", default=[], help="LABEL:DEMO_EVAL_JSON of an evaluate_captions report")
    ap.add_argument("--dvae-row", action="append", default=[], help="LABEL:EXPORT:IMAGE_SIZE of a dVAE export")
    ap.add_argument("--heldout", default="runs/lev/heldout_shards")
    ap.add_argument("--note", default="", help="conditions, e.g. the load average while the runs ran")
    ap.add_argument("--record-suffix", default="", help="bench/results/prior_levers<suffix>-*.json (keeps earlier records)")
    args = ap.parse_args(argv)
    with Recorder("prior_levers" + args.record_suffix) as rec:
        rec.add("load_average_now", os.getloadavg()[0], note=args.note)
        for spec in args.dvae_row:
            label, export, size = spec.rsplit(":", 2)
            row = dvae_row(label, export, int(size), args.heldout)
            rec.add(f"dvae/{label}", row["reconstruction_caption_match"]["rate"], unit="caption-match", **row)
            print(f"| {label} | {row['grid']}x{row['grid']} | step {row['step']} | {row['psnr']:.2f} dB | "
                  f"{row['reconstruction_caption_match']['rate']:.3f} | shape {row['attributes']['kind']['rate']:.3f} |")
        for spec in args.eval_row:
            label, report = spec.split(":", 1)
            row = eval_row(label, Path(report))
            rec.add(f"eval/{label}", row["rates"]["without_rerank"]["rate"], unit="caption-match", **row)
            print(f"| {label} | {row['split']} x {row['captions']} | "
                  + " | ".join(f"{row['rates'][k]['rate']:.3f} [{row['rates'][k]['ci95'][0]:.3f}, {row['rates'][k]['ci95'][1]:.3f}]"
                               for k in ("without_rerank", "rerank_top1", "any_of_n")) + " |")
        for spec in args.row:
            label, run = spec.split(":", 1)
            row = prior_row(label, Path(run))
            rec.add(f"prior/{label}", row["s_per_update"] or float("nan"), unit="s/update", **row)
            val = row["val"] or {}
            cm = row.get("caption_match", {})
            print(f"| {label} | {row['updates']} | {row['s_per_update']:.3f} s | {row['sequences_per_s']:.1f} | "
                  f"{val.get('image_loss', float('nan')):.3f} | "
                  + " | ".join(f"{cm[k]['rate']:.3f} [{cm[k]['ci95'][0]:.2f}, {cm[k]['ci95'][1]:.2f}]"
                               for k in ("without_rerank", "rerank_top1") if k in cm) + " |")


if __name__ == "__main__":
    main()
