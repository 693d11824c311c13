"""fp16 block scaling on 2 real gloo ranks through dalle_ds.parallel.engine (DeepSpeed ZeRO-3): the tiny
prior's loss tracks the fp32 run, and an overflow on one rank skips the update on both."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

STEPS = 8
SKIP_AT = 5  # the update at this step sees an induced overflow on rank 1 only
LOSS_TOL = 1e-3  # |loss_fp16 - loss_fp32| at every step (measured ~5e-5 here)


def _train(mode_name: str, steps: int, induce_overflow: bool) -> dict:
    from dalle_ds.parallel import block_scaling as precision
    from dalle_ds.config import ModelConfig, OptimConfig, PrecisionConfig
    from dalle_ds.parallel.engine import OptimSpec, build_engine, gathered_state_dict
    from dalle_ds.models.prior import Prior, no_decay

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mcfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, text_len=8, text_vocab_size=64, image_grid=4,
                       image_vocab_size=32, conv_kernel=3, attention="sparse", activation_checkpointing=True)
    pcfg = PrecisionConfig(allow_fp16_on_cpu=True)
    spec = OptimSpec.from_optim(OptimConfig(micro_batch_size=2, lr=3e-3, weight_decay=0.0))
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "fp16": {"enabled": mode_name == "fp16", "loss_scale": 1.0}, "steps_per_print": 10**9}
    mode, ds = precision.resolve_ds_config(ds, pcfg)
    torch.manual_seed(0)
    eng = build_engine(lambda: Prior(mcfg), ds, spec, no_decay=no_decay)
    scaler = None
    if mode == "fp16_block":
        scaler = precision.attach(eng.model, pcfg, data_parallel_size=world)
        precision.install(eng, scaler)
    partitioned = all(hasattr(p, "ds_tensor") and p.ds_tensor.dtype == torch.float32 for p in eng.model.parameters())

    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank, same in both runs
    batches = [(torch.randint(0, 64, (2, 8), generator=gen), torch.randint(0, 32, (2, 16), generator=gen))
               for _ in range(4)]
    losses, applied, same_params_over_skip = [], [], None
    for step in range(steps):
        text, codes = batches[step % len(batches)]
        loss, _ = eng(text, codes)
        boost = induce_overflow and step == SKIP_AT and rank == 1
        if boost:
            scaler.scales[1] = 2.0**60  # rank 1's mlp00 gradient overflows fp16 this step only
        before = gathered_state_dict(eng.model) if induce_overflow and step == SKIP_AT else None
        applied.append(eng.engine_step(loss))
        if boost:
            scaler._refresh()
        if before is not None:
            after = gathered_state_dict(eng.model)
            same_params_over_skip = all(torch.equal(before[k], after[k]) for k in before)
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        losses.append(float(t) / world)
    return {
        "mode": mode, "losses": losses, "applied": applied, "partitioned_fp32": partitioned,
        "skipped": eng.skipped_updates, "same_params_over_skip": same_params_over_skip,
        "scaler": None if scaler is None else scaler.state_dict(),
        "stats": None if scaler is None else scaler.stats(),
    }


def _both_runs() -> dict:
    from dalle_ds.parallel.dist import init_distributed

    init_distributed()
    fp32 = _train("fp32", STEPS, induce_overflow=False)
    fp16 = _train("fp16", STEPS, induce_overflow=False)
    skip = _train("fp16", SKIP_AT + 2, induce_overflow=True)
    return {"fp32": fp32, "fp16": fp16, "skip": skip}


def test_zero3_fp16_block_scaling_tracks_fp32_and_skips_together():
    results = run_ranks(_both_runs, world_size=2, timeout_s=240, extra_env={"OMP_NUM_THREADS": "1"})
    r0 = results[0]
    fp32, fp16 = r0["fp32"], r0["fp16"]
    assert fp32["mode"] == "fp32" and fp16["mode"] == "fp16_block"
    # ZeRO-3 really partitions, and DeepSpeed keeps fp32 master parameters under fp16 block scaling.
    assert fp16["partitioned_fp32"] and fp32["partitioned_fp32"]
    # No overflow in the plain run: every update applied, the loss tracks fp32 and goes down.
    assert all(fp16["applied"]) and fp16["skipped"] == 0
    diffs = [abs(a - b) for a, b in zip(fp16["losses"], fp32["losses"])]
    assert max(diffs) < LOSS_TOL, (fp16["losses"], fp32["losses"])
    assert fp16["losses"][4] < fp16["losses"][0] - 0.05  # same batch, 4 updates later
    assert fp16["scaler"]["log2_scale"] == pytest.approx([13 + STEPS / 1000] * 4)  # A = 1: start 2^13 at any M, grown

    # An overflow on rank 1 only: both ranks skip that update (flags all-reduced), the parameters
    # do not move, only mlp00's scale backs off, and the following update is applied.
    for r in results:
        s = r["skip"]
        assert s["applied"] == [True] * SKIP_AT + [False, True], s["applied"]
        assert s["skipped"] == 1 and s["same_params_over_skip"] is True
        assert s["scaler"]["overflow_counts"] == [0, 1, 0, 0]
        assert s["stats"]["precision/skipped_step_rate"] == 1 / (SKIP_AT + 2)
    assert results[0]["skip"]["scaler"] == results[1]["skip"]["scaler"]
    scales = results[0]["skip"]["scaler"]["log2_scale"]
    assert abs(scales[1] - (13 + SKIP_AT / 1000 - 0.5 + 1 / 1000)) < 1e-9
    assert abs(scales[0] - (13 + (SKIP_AT + 2) / 1000)) < 1e-9
