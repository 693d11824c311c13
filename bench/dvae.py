"""dVAE throughput: training images/s (tiny preset, 1 and 2 ranks, DeepSpeed on gloo) and encode
images/s at 256 px with the paper-size encoder, dalle_ds vs OpenAI's ``dall_e.Encoder`` on the same
weights in the same process.

    python -m bench.dvae --shards 'runs/demo/shards/shard-{000000..000007}.tar' [--steps 60] [--encode_batch 2]
    python -m bench.dvae --step-variants-only      # the tiny dVAE's update, NCHW vs channels-last, two Gumbel draws

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


def step_variants(batch: int, repeat: int) -> dict[str, float]:
    """Median ms per tiny-dVAE update (forward, backward, Adam) on one thread, in one process, for the
    activation layout (NCHW vs channels-last input) x the Gumbel draw (``exponential_`` vs ``gumbel_noise``),
    interleaved so that the ratios share the machine's state."""
    import torch.nn.functional as F

    from dalle_ds.config import load_config
    import dalle_ds.models.dvae as dvae_module
    from dalle_ds.models import dvae_loss
    from dalle_ds.models.dvae import DiscreteVAE

    def exponential_softmax(logits, tau, dim=1, generator=None):  # the draw used before 2026-12-03
        return F.softmax((logits - torch.empty_like(logits).exponential_(generator=generator).log()) / tau, dim=dim)

    cfg = load_config("tiny")
    torch.manual_seed(0)
    x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size)
    variants = [(layout, draw) for layout in ("nchw", "channels_last") for draw in ("exponential", "loglog")]
    times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
    original = dvae_loss.gumbel_softmax
    models = {k: DiscreteVAE(cfg.dvae) for k in variants}
    optims = {k: torch.optim.AdamW(m.parameters(), 1e-4) for k, m in models.items()}
    try:
        for _ in range(repeat + 1):  # the first round warms up
            for (layout, draw), model in models.items():
                dvae_module.gumbel_softmax = exponential_softmax if draw == "exponential" else original
                inp = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
                g = torch.Generator().manual_seed(1)
                seconds = timeit(lambda: _update(model, optims[(layout, draw)], inp, g), warmup=1, repeat=3)
                times[(layout, draw)].append(seconds)
    finally:
        dvae_module.gumbel_softmax = original
    return {f"{layout}+{draw}": 1000 * sorted(t[1:])[len(t[1:]) // 2] for (layout, draw), t in times.items()}


def _update(model, optim, images, generator) -> None:
    loss, _ = model(images, 1.0, 1.0, generator=generator)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()


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
    ap.add_argument("--shards", default=None, help="image shards of the tiny preset (64 px)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--encode_batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--step-batch", type=int, default=16, help="images per update in the step-variant timing")
    ap.add_argument("--step-variants-only", action="store_true", help="only the in-process step-variant timing")
    args = ap.parse_args()
    if args.step_variants_only:
        torch.set_num_threads(1)
        with Recorder("dvae_step") as rec:
            ms = step_variants(args.step_batch, args.repeat)
            base = ms["nchw+exponential"]
            for name, value in ms.items():
                rec.add(f"update_ms_{name}", value, unit="ms", batch=args.step_batch, threads=1,
                        speedup_vs_nchw_exponential=round(base / value, 3),
                        load_avg_1min_at_start=round(os.getloadavg()[0], 2))
        return
    if not args.shards:
        ap.error("--shards is required (unless --step-variants-only)")
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
