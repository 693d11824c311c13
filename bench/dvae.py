"""dVAE throughput: training images/s (tiny preset, 1 and 2 ranks, DeepSpeed on gloo) and encode
images/s at 256 px with the paper-size encoder, dalle_ds vs OpenAI's ``dall_e.Encoder`` on the same
weights in the same process.

    python -m bench.dvae --shards 'runs/demo/shards/shard-{000000..000007}.tar' [--steps 60] [--encode_batch 2]

Training rate: images per second between the first logged step (after warm-up) and the last one,
read from the run's metrics.jsonl (``elapsed_s``), so start-up and the first steps are excluded.
The machine is shared: figures are noisy, the load average at the start is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from bench.harness import Recorder, timeit
from tests.multirank import run_ranks


def _train(run_dir: str, shards: str, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    from dalle_ds.train_dvae import main

    main(["--config", "tiny", "--deepspeed_config", "ds_configs/dvae.json", f"run.dir={run_dir}",
          f"data.image_shards={shards}", f"dvae_train.max_steps={steps}", f"logging.every_steps={steps // 3}",
          f"logging.image_every_steps={10 * steps}", f"checkpoint.every_steps={10 * steps}",
          "logging.progress_bar=false", "logging.tensorboard=false"])


def train_rate(shards: str, steps: int, ranks: int, cores: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_train, world_size=ranks, args=(tmp, shards, steps, max(1, cores // ranks)), timeout_s=1800)
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        cfg_batch = int(json.loads((Path(tmp) / "ds_config.json").read_text())["train_batch_size"])
    a, b = lines[0], lines[-1]  # first line is after steps//3 warm-up updates
    return (b["step"] - a["step"]) * cfg_batch / (b["elapsed_s"] - a["elapsed_s"]), cfg_batch


def encode_rates(batch: int, repeat: int) -> tuple[float, float, float]:
    import dall_e

    from dalle_ds.convert_openai_dvae import convert

    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=256, vocab_size=8192).eval()
    dec = dall_e.Decoder(n_hid=256, n_init=128, vocab_size=8192).eval()
    vae = convert(enc, dec)
    x = torch.rand(batch, 3, 256, 256)
    with torch.no_grad():
        diff = float((vae.logits(x) - enc(dall_e.map_pixels(x))).abs().max())
        ours = timeit(lambda: vae.encode(x), warmup=1, repeat=repeat)
        theirs = timeit(lambda: enc(dall_e.map_pixels(x)).argmax(1), warmup=1, repeat=repeat)
    return batch / ours, batch / theirs, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="image shards of the tiny preset (64 px)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--encode_batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    with Recorder("dvae") as rec:
        for ranks in (1, 2):
            rate, batch = train_rate(args.shards, args.steps, ranks, cores)
            rec.add(f"train_images_per_s_{ranks}rank", rate, unit="images/s", preset="tiny", ranks=ranks,
                    train_batch_size=batch, steps=args.steps, threads_per_rank=max(1, cores // ranks),
                    load_avg_1min_at_start=round(load, 2))
        ours, theirs, diff = encode_rates(args.encode_batch, args.repeat)
        common = {"image_size": 256, "batch": args.encode_batch, "n_hid": 256, "codebook": 8192,
                  "max_abs_logit_diff": diff, "threads": torch.get_num_threads(),
                  "load_avg_1min_at_start": round(load, 2)}
        rec.add("encode_images_per_s_dalle_ds", ours, unit="images/s", **common)
        rec.add("encode_images_per_s_openai", theirs, unit="images/s", **common)


if __name__ == "__main__":
    main()
