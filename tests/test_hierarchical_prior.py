"""The tiny prior through dalle_ds.parallel.engine on 2 fake nodes x 2 gloo ranks: flat ZeRO-3 vs hierarchical
exact (equal), and hierarchical PowerSGD vs exact (loss within a stated margin after N steps)."""

import dataclasses

import torch

from tests.multirank import run_ranks

STEPS = 12


def synthetic_batch(cfg, step, rank, batch=2):
    """Arithmetic-progression captions and images: learnable in a few steps."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    a = torch.randint(1, cfg.text_vocab_size, (batch, 1), generator=g)
    c = torch.randint(0, cfg.image_vocab_size, (batch, 1), generator=g)
    text = (a + torch.arange(cfg.text_len)) % (cfg.text_vocab_size - 1) + 1  # (B, T), no padding
    codes = (c + 3 * torch.arange(cfg.image_len)) % cfg.image_vocab_size  # (B, N)
    return text, codes


def _run(mode, cfg, steps):
    from dalle_ds.parallel import hierarchy as hierarchical_zero
    from dalle_ds.parallel.engine import OptimSpec, build_engine
    from dalle_ds.models.prior import Prior, no_decay

    pcfg = dataclasses.replace(cfg.powersgd, enabled=mode == "powersgd", hierarchical=mode != "flat",
                               node_size=2, rank=32, min_compression_numel=1024)
    hier = hierarchical_zero.from_config(pcfg, seed=cfg.run.seed)
    kwargs = hier.engine_kwargs() if hier else {}
    torch.manual_seed(0)
    spec = OptimSpec(micro_batch_size=2, grad_accum_steps=1, lr=2e-3, betas=(0.9, 0.96), eps=1e-8,
                     weight_decay=0.0)
    eng = build_engine(lambda: Prior(cfg.model), "ds_configs/zero3_fp32_cpu.json", spec, no_decay=no_decay,
                       **kwargs)
    eng.set_grad_clip(4.0)
    rank = torch.distributed.get_rank()
    losses, norms = [], []
    for step in range(steps):
        loss, _ = eng(*synthetic_batch(cfg.model, step, rank))
        eng.engine_step(loss)
        losses.append(loss.item())
        norms.append(eng.grad_norm)
    return {"losses": losses, "norms": norms, "stats": hier.stats() if hier else None}


def _prior_modes():
    from dalle_ds.config import load_config
    from dalle_ds.parallel.dist import init_distributed

    init_distributed()
    cfg = load_config("tiny", ["model.attention=dense"])
    out = {"flat": _run("flat", cfg, 2), "exact": _run("exact", cfg, STEPS)}
    out["powersgd"] = _run("powersgd", cfg, STEPS)
    return out


def test_tiny_prior_hierarchical_exact_and_powersgd():
    out = run_ranks(_prior_modes, 4, node_size=2, timeout_s=300)
    for o in out:
        n = len(o["flat"]["losses"])
        torch.testing.assert_close(torch.tensor(o["exact"]["losses"][:n]), torch.tensor(o["flat"]["losses"]),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.tensor(o["exact"]["norms"][:n]), torch.tensor(o["flat"]["norms"]),
                                   rtol=1e-6, atol=0)
        s = o["powersgd"]["stats"]
        assert s["steps"] == STEPS and s["compression_rate"] > 0.5 and s["skipped_nonfinite"] == 0, s
    # Stated margin: after STEPS updates the PowerSGD loss (rank 32 = d/4; the paper: 896 ~ d/4.4),
    # averaged over the last 3 steps and all ranks, is within 20% of the exact run's loss drop from its
    # start (measured 11%: 6.264 -> exact 4.593, PowerSGD 4.781; a fixed Q lags early in training).
    def avg(mode, sl):
        vals = [v for o in out for v in o[mode]["losses"][sl]]
        return sum(vals) / len(vals)

    start, exact, psgd = avg("exact", slice(0, 1)), avg("exact", slice(-3, None)), avg("powersgd", slice(-3, None))
    print(f"tiny prior after {STEPS} steps: start {start:.3f} exact {exact:.3f} powersgd {psgd:.3f}")
    assert exact < start - 1.0, (start, exact)  # the exact run learns
    assert psgd < exact + 0.20 * (start - exact), (start, exact, psgd)
