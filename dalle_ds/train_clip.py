"""Train the project's own small CLIP on the image shards, for reranking and evaluation offline.

    python -m dalle_ds.train_clip --shards 'runs/demo/shards/shard-{000000..000007}.tar' \\
        --tokenizer runs/demo/tokenizer.json --out runs/demo/clip --steps 400

A ``transformers.CLIPModel`` with a small ``CLIPConfig`` (ViT over ``--image-size`` images with
``--patch``-pixel patches; a causal text transformer over the project's BPE tokens), trained with
the symmetric contrastive loss on in-batch pairs; one process, plain torch (a few-million-parameter
helper model: no DeepSpeed). Images come through ``ImageShardLoader(mode="eval")`` (centre crop,
no flip: the captions say left and right). The folder is written with ``save_pretrained`` plus
the offline processor (``dalle_ds_clip.json`` + ``tokenizer.json``, see dalle_ds/sampling/rerank.py)
and ``train_log.json``; ``ClipScorer.load(folder)`` reads it back. Reads top to bottom: parse ->
build -> train -> close; logs like the other trainers (dalle_ds.training.logger): ``train step N:
loss=...`` lines, ``metrics.jsonl`` in the folder, TensorBoard with ``--tensorboard``. No
checkpoints: a short helper run is simply restarted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dalle_ds import cli_args
from dalle_ds.parallel.dist import print0
from dalle_ds.sampling.rerank import ClipScorer, ProjectClipProcessor
from dalle_ds.training.logger import MetricsLogger
from dalle_ds.training.loop import EXIT_COMPLETED, TrainLoop

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def small_clip_config(vocab_size: int, context_length: int = 32, image_size: int = 64, width: int = 128,
                      layers: int = 2, heads: int = 4, patch: int = 8, embed_dim: int = 64):
    from transformers import CLIPConfig

    if image_size % patch:
        raise ValueError(f"--image-size {image_size} must be a multiple of --patch {patch}")
    text = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=context_length, projection_dim=embed_dim,
                pad_token_id=0, bos_token_id=2, eos_token_id=0)  # pooled at the first [PAD] (clip_rerank)
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=patch, projection_dim=embed_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def build_clip(processor: ProjectClipProcessor, seed: int = 0, **arch):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    cfg = small_clip_config(processor.vocab_size, processor.context_length, processor.image_size, **arch)
    return CLIPModel(cfg)


def train(model, processor: ProjectClipProcessor, batches, steps: int, lr: float = 5e-4, progress: bool = True,
          log: MetricsLogger | None = None, log_every: int = 50) -> list[float]:
    """Contrastive training for ``steps`` batches of ``{"images", "captions"}``; returns the losses.

    Every ``log_every`` steps (and the last) a ``train`` row: mean loss since the previous row, lr,
    images/s; to ``log`` (default: stdout and, with ``progress``, a bar)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    log = log or MetricsLogger(None, tensorboard=False, progress_bar=progress)
    loop = TrainLoop(steps, log, desc="clip")
    model.train()
    losses: list[float] = []
    it = iter(batches)
    for step in loop:
        batch = next(it)
        lr_now = sched.get_last_lr()[0]
        out = model(pixel_values=processor.images(batch["images"]), return_loss=True,
                    **processor.text(batch["captions"]))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        if step % log_every == 0 or step == steps:
            n, seconds = loop.timer.window()
            log.log(step, {"loss": sum(losses[-n:]) / n, "lr": lr_now,
                           "images_per_s": n * len(batch["captions"]) / max(seconds, 1e-9)})
    model.eval()
    return losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = cli_args.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="image shards (paths, braces, globs, dirs, s3://)")
    ap.add_argument("--tokenizer", required=True, help="the project's tokenizer.json")
    cli_args.add_output(ap, required=True, help="folder to write (save_pretrained + processor)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--context-length", type=int, default=32)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--log-every", type=int, default=50, help="steps per metrics row / log line")
    ap.add_argument("--tensorboard", action="store_true", help="also write TensorBoard to OUT/tb")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine more threads oversubscribe and run ~20x slower)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dalle_ds.data.loaders import ImageShardLoader

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # -- build
    processor = ProjectClipProcessor(args.tokenizer, args.context_length, args.image_size, MEAN, STD)
    model = build_clip(processor, args.seed, width=args.width, layers=args.layers, heads=args.heads,
                       patch=args.patch, embed_dim=args.embed_dim)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"clip: {n_params / 1e6:.2f}M parameters, {args.steps} steps x batch {args.batch_size}, "
          f"images {args.image_size}px, text {args.context_length} tokens (vocab {processor.vocab_size})")
    loader = ImageShardLoader(args.shards, args.batch_size, mode="eval", size=args.image_size, rank=0, world_size=1,
                              num_workers=args.workers, seed=args.seed, shuffle=True, infinite=True)
    out = Path(args.output)
    log = MetricsLogger(out, tensorboard=args.tensorboard, progress_bar="auto")  # out/metrics.jsonl (+ out/tb)
    # -- train
    t0 = time.time()
    losses = train(model, processor, loader, args.steps, args.lr, log=log, log_every=args.log_every)
    # -- close: the folder ClipScorer.load reads, and a summary
    model.save_pretrained(str(out))
    processor.save(out)
    summary = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "params": n_params,
               "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
               "seconds": round(time.time() - t0, 1), "shards": args.shards, "args": vars(args)}
    (out / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    print0(f"clip: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} in {summary['seconds']} s; "
           f"saved {out}")
    ClipScorer.load(out)  # the folder loads back offline
    return EXIT_COMPLETED


if __name__ == "__main__":
    sys.exit(cli_args.run(main))
