"""dalle_ds/parallel/engine.py and dalle_ds/training/schedules.py: config merge and conflicts, parameter groups,
the schedule, and (on 2 real gloo ranks) ZeRO-3 partitioning, gradients equal to a one-process
reference, skip votes, falling loss and the resolved configs written by rank 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dalle_ds.config import ConfigError, ModelConfig, load_config
from dalle_ds.parallel.engine import YAML_OWNED_KEYS, OptimSpec, param_groups, resolve_ds_config
from dalle_ds.training.schedules import WarmupPlateauLR
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parent.parent
SPEC = OptimSpec(micro_batch_size=2, grad_accum_steps=3, lr=1e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.05)


def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(n_layers=2, n_heads=2, d_model=32, mlp_ratio=2, text_len=8, text_vocab_size=64,
                       image_grid=4, image_vocab_size=64, conv_kernel=3, attention="dense",
                       activation_checkpointing=False)


# ---------------------------------------------------------------- config merge (one process)


def test_resolved_config_takes_batch_sizes_from_yaml():
    static = json.loads((ROOT / "ds_configs/zero3_fp32_cpu.json").read_text())
    out = resolve_ds_config(static, SPEC, world_size=4, source="x.json")
    assert out["train_micro_batch_size_per_gpu"] == 2
    assert out["gradient_accumulation_steps"] == 3
    assert out["train_batch_size"] == 2 * 3 * 4
    assert out["zero_optimization"] == static["zero_optimization"]
    assert "train_batch_size" not in static  # the input is not modified


@pytest.mark.parametrize("key", sorted(YAML_OWNED_KEYS))
def test_yaml_owned_key_in_json_is_an_error_naming_key_and_file(key):
    static = {"zero_optimization": {"stage": 3}, key: 1}
    with pytest.raises(ConfigError, match=rf"ds_configs/mine\.json: key '{key}'"):
        resolve_ds_config(static, SPEC, 2, source="ds_configs/mine.json")


def test_fp16_loss_scale_must_stay_static_at_one():
    static = {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}
    assert resolve_ds_config(static, SPEC, 1)["fp16"]["loss_scale"] == 1.0
    static["fp16"]["loss_scale"] = 0  # dynamic
    with pytest.raises(ConfigError, match="fp16.loss_scale"):
        resolve_ds_config(static, SPEC, 1, source="v100.json")
    assert resolve_ds_config(static, SPEC, 1, fixed_fp16_loss_scale=False)["fp16"]["loss_scale"] == 0


@pytest.mark.parametrize("name", ["zero3_fp32_cpu.json", "zero3_bf16.json"])
def test_shipped_configs_hold_no_yaml_owned_keys(name):
    static = json.loads((ROOT / "ds_configs" / name).read_text())
    assert static["zero_optimization"]["stage"] == 3
    resolve_ds_config(static, SPEC, 2, source=name)  # would raise on a conflict


def test_param_groups_follow_the_predicate():
    from dalle_ds.models.prior import Prior, no_decay

    model = Prior(tiny_model_cfg())
    groups = {g["name"]: g for g in param_groups(model, 0.05, no_decay)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    plain = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert decayed and plain and not decayed & plain
    assert len(decayed) + len(plain) == len(names)
    assert all(no_decay(n) for n in plain) and not any(no_decay(n) for n in decayed)
    assert any("embed" in n for n in plain) and any(n.endswith("bias") for n in plain)
    # another predicate (the dVAE's): everything decays
    assert [g["name"] for g in param_groups(model, 0.1, lambda n, p: False)] == ["decay"]


# ---------------------------------------------------------------- schedule (one process)


def test_warmup_is_linear_and_clipping_only_during_warmup():
    s = WarmupPlateauLR(lr=1.0, warmup_steps=4, patience=2, grad_clip=4.0)
    lrs, clips = [], []
    for _ in range(6):
        lrs.append(s.lr)
        clips.append(s.grad_clip)
        s.step(1.0)
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert clips == [4.0, 4.0, 4.0, 4.0, 0.0, 0.0]


def test_halves_on_plateau_at_most_max_halvings():
    s = WarmupPlateauLR(lr=1.0, warmup_steps=0, patience=3, threshold=0.01, max_halvings=2, ema=0.0)
    for loss in (5.0, 4.0, 3.0):  # improving: no halving
        s.step(loss)
    assert s.lr == 1.0
    for _ in range(3):  # flat for `patience` updates
        s.step(3.0)
    assert s.lr == 0.5 and s.halvings == 1
    s.step(2.999)  # below the relative threshold: still a plateau
    assert s.bad_updates == 1
    for _ in range(20):
        s.step(3.0)
    assert s.halvings == 2 and s.lr == 0.25  # capped


def test_schedule_state_round_trips():
    a = WarmupPlateauLR(lr=1e-3, warmup_steps=2, patience=2, ema=0.9)
    for loss in (3.0, 2.0, 2.0, 2.0, 2.0, 2.0):
        a.step(loss)
    b = WarmupPlateauLR(lr=1e-3, warmup_steps=2, patience=2, ema=0.9)
    b.load_state_dict(a.state_dict())
    for loss in (2.0, 1.0, 1.0):
        assert a.step(loss) == b.step(loss)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(KeyError, match="nope"):
        b.load_state_dict({"nope": 1})


def test_schedule_reads_the_optim_section():
    cfg = load_config("tiny", ["optim.plateau_ema=0.5"]).optim
    s = WarmupPlateauLR.from_optim(cfg)
    assert (s.base_lr, s.warmup_steps, s.patience, s.ema, s.clip) == (cfg.lr, cfg.warmup_steps,
                                                                      cfg.plateau_patience, 0.5, cfg.grad_clip)
    with pytest.raises(ConfigError, match="optim.plateau_ema"):
        load_config("tiny", ["optim.plateau_ema=1.5"])


# ---------------------------------------------------------------- ZeRO-3 on 2 gloo ranks


def _zero3_rank(run_dir: str) -> dict:
    import torch.distributed as dist

    from dalle_ds.config import Config
    from dalle_ds.parallel.dist import init_distributed
    from dalle_ds.parallel.engine import build_engine, gathered_state_dict, named_full_grads
    from dalle_ds.models.prior import Prior, no_decay

    info = init_distributed()
    torch.manual_seed(0)
    mcfg = tiny_model_cfg()
    spec = OptimSpec(micro_batch_size=2, grad_accum_steps=1, lr=3e-3, betas=(0.9, 0.96), eps=1e-8,
                     weight_decay=0.05)
    seen_before = []
    engine = build_engine(lambda: Prior(mcfg), str(ROOT / "ds_configs/zero3_fp32_cpu.json"), spec,
                          no_decay=no_decay, before_initialize=[lambda m, c: seen_before.append(c["train_batch_size"])],
                          run_dir=run_dir, run_config=Config())
    out = {"seen_before": seen_before}
    local, total = engine.param_numel()
    out["local"], out["total"], out["expected_total"] = local, total, Prior.num_params(mcfg)
    out["outside_forward_numel"] = sum(p.numel() for p in engine.model.parameters())

    # one global batch of 4; rank r takes rows 2r, 2r+1
    g = torch.Generator().manual_seed(7)
    text = torch.randint(0, 64, (4, mcfg.text_len), generator=g)
    codes = torch.randint(0, 64, (4, mcfg.image_len), generator=g)
    mine = slice(2 * info.rank, 2 * info.rank + 2)

    full = gathered_state_dict(engine.model)
    ref = Prior(mcfg)
    ref.load_state_dict(full)
    ref_loss, _ = ref.loss(text, codes)
    ref_loss.backward()
    loss, _ = engine(text[mine], codes[mine])
    engine.backward(loss)
    grads = named_full_grads(engine)
    out["max_grad_err"] = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    out["max_grad"] = max(p.grad.abs().max().item() for p in ref.parameters())
    out["first_applied"] = engine.step()

    # a skip vote from one rank skips the update everywhere; parameters stay put
    before = gathered_state_dict(engine.model)
    loss, _ = engine(text[mine], codes[mine])
    out["skip_applied"] = engine.engine_step(loss, skip=(info.rank == 1))
    after = gathered_state_dict(engine.model)
    out["skip_changed"] = max((before[k] - after[k]).abs().max().item() for k in before)
    # a before_step hook vote does the same
    engine.before_step.append(lambda e: True)
    loss, _ = engine(text[mine], codes[mine])
    out["hook_applied"] = engine.engine_step(loss)
    engine.before_step.clear()

    losses = []
    for _ in range(8):
        loss, _ = engine(text[mine], codes[mine])
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / 2)
        engine.engine_step(loss)
    out["losses"] = losses
    out["skipped"] = engine.skipped_updates
    engine.set_lr(0.125)
    out["lrs"] = [g["lr"] for g in engine.optimizer.param_groups]
    return out


def test_zero3_two_ranks_partition_gradients_skips_and_learning(tmp_path):
    res = run_ranks(_zero3_rank, 2, args=(str(tmp_path / "run"),), timeout_s=200)
    for r in res:
        assert r["seen_before"] == [4]  # before_initialize saw the resolved config
        assert r["total"] == r["expected_total"]
        assert abs(r["local"] - r["total"] / 2) <= 0.02 * r["total"]  # ~1/N stored per rank
        assert r["outside_forward_numel"] == 0  # parameters really are partitioned
        assert r["max_grad_err"] <= 1e-5 * max(1.0, r["max_grad"]), r["max_grad_err"]
        assert r["first_applied"] and not r["skip_applied"] and not r["hook_applied"]
        assert r["skip_changed"] == 0.0
        assert r["skipped"] == 2
        assert r["losses"][-1] < r["losses"][0] - 0.3, r["losses"]
        assert r["lrs"] and all(lr == 0.125 for lr in r["lrs"])
    assert res[0]["losses"] == res[1]["losses"]
    written = json.loads((tmp_path / "run/ds_config.json").read_text())
    assert written["train_batch_size"] == 4 and written["zero_optimization"]["stage"] == 3
    assert (tmp_path / "run/config.yaml").is_file()
    assert math.isfinite(res[0]["losses"][-1])
