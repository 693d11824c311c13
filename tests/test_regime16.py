"""The 16-bit model-state regime on 2 gloo ranks under DeepSpeed ZeRO-3 (#14): bf16 parameter
partitions, bf16 gradients and Adam moments for the matrices, fp32 masters and moments for the
paper's fp32 set (AdamW16), fp16 branches with block scales; the loss tracks the fp32-master run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.multirank import run_ranks

STEPS = 12
JSON_16BIT = Path(__file__).resolve().parent.parent / "dalle_ds" / "ds_configs" / "zero3_fp16_v100_16bit.json"


def _train(regime: str) -> dict:
    from dalle_ds.config import ModelConfig, OptimConfig, PrecisionConfig
    from dalle_ds.models.prior import Prior, keep_fp32, no_decay
    from dalle_ds.parallel import block_scaling as precision
    from dalle_ds.parallel.dist import all_reduce_values
    from dalle_ds.parallel.engine import OptimSpec, build_engine

    rank = torch.distributed.get_rank()
    mcfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, text_len=8, text_vocab_size=64, image_grid=4,
                       image_vocab_size=32, conv_kernel=3, attention="sparse", activation_checkpointing=True)
    pcfg = PrecisionConfig(allow_fp16_on_cpu=True, branch_dtype="float16")
    spec = OptimSpec.from_optim(OptimConfig(micro_batch_size=2, lr=3e-3, weight_decay=0.045))
    if regime == "16bit":
        ds = json.loads(JSON_16BIT.read_text())
    else:
        ds = {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True, "loss_scale": 1.0}}
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    mode, ds = precision.resolve_ds_config(ds, pcfg)
    if mode == "bf16" and pcfg.branch_dtype == "float16":
        mode = "fp16_block16"
    torch.manual_seed(0)
    eng = build_engine(lambda: Prior(mcfg), ds, spec, no_decay=no_decay, keep_fp32=keep_fp32)
    scaler = precision.attach(eng.model, pcfg, 2)
    precision.install(eng, scaler)
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randint(0, 64, (2, 8), generator=gen), torch.randint(0, 32, (2, 16), generator=gen))
               for _ in range(4)]
    losses = []
    for step in range(STEPS):
        text, codes = batches[step % len(batches)]
        loss, _ = eng(text, codes)
        eng.engine_step(loss)
        losses.append(all_reduce_values([float(loss.detach())])[0] / 2)
    opt = eng.optimizer.optimizer  # the client optimizer DeepSpeed steps
    groups = {g.get("name"): g for g in opt.param_groups}
    kinds = set()  # (moment dtype, has an fp32 master) of each flat sub-group DeepSpeed stepped
    for st in opt.state.values():
        if "exp_avg" in st:
            kinds.add((str(st["exp_avg"].dtype), str(st["master"].dtype) if "master" in st else None))
    return {"mode": mode, "losses": losses, "optimizer": type(opt).__name__,
            "param_dtypes": sorted({str(p.ds_tensor.dtype) for p in eng.model.parameters()}),
            "groups": sorted(groups), "kinds": sorted(kinds, key=str), "skipped": eng.skipped_updates}


def _both() -> dict:
    from dalle_ds.parallel.dist import init_distributed

    init_distributed()
    return {"16bit": _train("16bit"), "fp32_master": _train("fp32_master")}


def test_16bit_regime_runs_and_tracks_the_fp32_master_regime():
    r = run_ranks(_both, world_size=2, timeout_s=400, extra_env={"OMP_NUM_THREADS": "1"})[0]
    a, b = r["16bit"], r["fp32_master"]
    assert a["mode"] == "fp16_block16" and b["mode"] == "fp16_block"
    assert a["optimizer"] == "AdamW16" and b["optimizer"] == "AdamW"
    assert a["param_dtypes"] == ["torch.bfloat16"] and b["param_dtypes"] == ["torch.float32"]
    assert a["groups"] == ["decay", "fp32_decay", "fp32_no_decay"]
    # 16-bit moments for the matrices; fp32 master, m, v for the fp32 set
    assert set(a["kinds"]) == {("torch.bfloat16", None), ("torch.float32", "torch.float32")}
    assert a["losses"][-1] < a["losses"][0] and b["losses"][-1] < b["losses"][0]
    for x, y in zip(a["losses"], b["losses"]):
        assert abs(x - y) <= 0.02 * y, (a["losses"], b["losses"])
