"""The planner's model-state bytes against the live DeepSpeed ZeRO-3 engine (#14): 2 gloo ranks, a
scaled-down prior whose matrices exceed the persistence threshold, one optimizer step (optimizer
state is lazy), each regime: fp32 master (zero3_fp16_v100.json + block scaling), 16-bit
(zero3_fp16_v100_16bit.json, AdamW16), and 16-bit + PowerSGD across 2 one-rank nodes with the error
buffers beside the gradients and in host memory (powersgd.error_buffer_device=host, the paper preset's).
Every item (parameter partitions, persistent parameters, separate masters, gradient partitions,
optimizer state, error buffers on the device and on the host, Q) and the total must be within 5% of the
plan, on each rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

DS_DIR = Path(__file__).resolve().parent.parent / "dalle_ds" / "ds_configs"
MODEL = ["model.n_layers=2", "model.d_model=128", "model.n_heads=2", "model.text_len=8",
         "model.text_vocab_size=64", "model.image_vocab_size=32", "dvae.codebook_size=32", "model.conv_kernel=3",
         "model.attention=sparse", "data.image_size=16", "model.image_grid=4", "optim.micro_batch_size=2", "precision.allow_fp16_on_cpu=true",
         "precision.branch_dtype=float16", "powersgd.rank=4", "powersgd.min_compression_numel=64"]
REGIMES = {"fp32_master": ("zero3_fp16_v100.json", False), "16bit": ("zero3_fp16_v100_16bit.json", False),
           "16bit_powersgd": ("zero3_fp16_v100_16bit.json", "gpu"),
           "16bit_powersgd_host": ("zero3_fp16_v100_16bit.json", "host")}


def _cfg(powersgd: bool | str):
    from dalle_ds.config import load_config

    over = MODEL + (["powersgd.enabled=true", "powersgd.node_size=1", f"powersgd.error_buffer_device={powersgd}"]
                    if powersgd else [])
    return load_config("tiny", over)


def _ds(name: str) -> dict:
    ds = json.loads((DS_DIR / name).read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 1000  # gains/biases whole, matrices split
    return ds


def _measure() -> dict:
    from dalle_ds.models.prior import Prior, keep_fp32, no_decay
    from dalle_ds.parallel import block_scaling as precision
    from dalle_ds.parallel import hierarchy
    from dalle_ds.parallel.dist import init_distributed
    from dalle_ds.parallel.engine import OptimSpec, build_engine, model_state_bytes
    from dalle_ds.plan import resolve_mode

    init_distributed()
    rank = torch.distributed.get_rank()
    out = {}
    for regime, (name, psgd) in REGIMES.items():
        cfg = _cfg(psgd)
        mode, ds = resolve_mode(_ds(name), cfg.precision)
        hier = hierarchy.from_config(cfg.powersgd, seed=0) if psgd else None
        torch.manual_seed(0)
        eng = build_engine(lambda: Prior(cfg.model), ds, OptimSpec.from_optim(cfg.optim), no_decay=no_decay,
                           keep_fp32=keep_fp32, **(hier.engine_kwargs() if hier else {}))
        scaler = precision.attach(eng.model, cfg.precision)
        precision.install(eng, scaler)
        gen = torch.Generator().manual_seed(rank)
        m = cfg.model
        text = torch.randint(1, m.text_vocab_size, (2, m.text_len), generator=gen)
        codes = torch.randint(0, m.image_vocab_size, (2, m.image_len), generator=gen)
        loss, _ = eng(text, codes)
        eng.engine_step(loss)
        local = torch.distributed.get_rank(hier.groups.intra) if hier else rank
        out[regime] = {"mode": mode, "local": local, "applied": eng.skipped_updates == 0,
                       "bytes": model_state_bytes(eng, hier.averager if hier else None)}
    return out


def test_planner_matches_the_live_engine_within_5_percent():
    from dalle_ds import plan

    results = run_ranks(_measure, world_size=2, timeout_s=600, extra_env={"OMP_NUM_THREADS": "1"})
    for rank, res in enumerate(results):
        for regime, (name, psgd) in REGIMES.items():
            got = res[regime]
            cfg = _cfg(psgd)
            r = plan.regime_of(cfg, _ds(name), nodes=1, gpus_per_node=2, node_size=1 if psgd else 2)
            assert got["mode"] == r.mode == ("fp16_block" if regime == "fp32_master" else "fp16_block16")
            assert got["applied"], (regime, rank)
            want = plan.model_state_bytes(plan.param_infos(cfg.model), r, got["local"])
            measured = got["bytes"]
            assert set(measured) == set(want)
            for key, planned in want.items():
                assert abs(measured[key] - planned) <= 0.05 * planned, (regime, rank, key, measured, want)
            total_m, total_p = sum(measured.values()), sum(want.values())
            assert abs(total_m - total_p) <= 0.05 * total_p, (regime, rank, total_m, total_p)
            if psgd:
                on_gpu, on_host = ("errors", "errors_host") if psgd == "gpu" else ("errors_host", "errors")
                assert want[on_gpu] > 0 and want["q"] > 0 and want[on_host] == measured[on_host] == 0
            if regime == "16bit":  # aliased bf16 masters; m, v 4 B/elem; fp32 set 12 B/elem
                assert want["master"] == 0 and r.optimizer == "AdamW16"


@pytest.mark.parametrize("name, mode, per_param", [("zero3_fp16_v100.json", "fp16_block", 16),
                                                    ("zero3_fp16_v100_16bit.json", "fp16_block16", 8)])
def test_regime_of_follows_the_json(name, mode, per_param):
    from dalle_ds import plan

    cfg = _cfg(False)
    r = plan.regime_of(cfg, _ds(name), nodes=1, gpus_per_node=2)
    assert r.mode == mode and r.storage + r.master + r.grad + r.moments == per_param
