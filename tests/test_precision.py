"""fp16 per-resblock gradient scaling (dalle_ds/parallel/block_scaling.py): the paper's motivation, the overflow
filter, the scale update rule and the DeepSpeed precision modes. One process, tiny shapes."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalle_ds.parallel import block_scaling as precision
from dalle_ds.config import ConfigError, PrecisionConfig


# ---------------------------------------------------------------- a deep tiny residual model
# Same convention as dalle_ds/models/prior.py: h = h + branch_fn(branch, h, idx), idx 2*layer / 2*layer+1.


class _GradBoost(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``boost`` (to provoke an fp16 overflow)."""

    @staticmethod
    def forward(ctx, x, boost):
        ctx.boost = boost
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.boost, None


class AttnBranch(nn.Module):
    """Pre-LN causal self-attention; a fixed fp32 output gain sets how large its gradients are."""

    def __init__(self, d: int, heads: int, gain: float):
        super().__init__()
        self.ln, self.qkv, self.proj, self.heads = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.register_buffer("gain", torch.tensor(gain))
        self.boost = 1.0

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        return self.proj(_GradBoost.apply(o, self.boost)).float() * self.gain  # gain applied in fp32


class MLPBranch(nn.Module):
    def __init__(self, d: int, gain: float):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("gain", torch.tensor(gain))
        self.boost = 1.0

    def forward(self, x):
        return self.fc2(_GradBoost.apply(F.gelu(self.fc1(self.ln(x))), self.boost)).float() * self.gain


class DeepResidual(nn.Module):
    """fp32 input/output projections (the 'embeddings'), 2*n_layers fp16-able branches."""

    def __init__(self, n_layers: int = 6, d: int = 16, gains_log2: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.cfg = SimpleNamespace(n_layers=n_layers)
        gains = torch.linspace(*gains_log2, 2 * n_layers).exp2().tolist()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.branches = nn.ModuleList(AttnBranch(d, 2, gains[i]) if i % 2 == 0 else MLPBranch(d, gains[i])
                                      for i in range(2 * n_layers))
        self.branch_fn = lambda branch, h, idx: branch(h)

    def set_branch_fn(self, fn):
        self.branch_fn = fn

    def forward(self, x):
        h = self.inp(x)  # (B, T, D) fp32 residual stream
        for idx, branch in enumerate(self.branches):
            h = h + self.branch_fn(branch, h, idx)
        return self.out(h)

    def loss(self, x, y):
        return F.mse_loss(self(x), y)


def branch_grads(model: DeepResidual, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.loss(x, y).backward()
    return [torch.cat([p.grad.flatten() for p in b.parameters()]) for b in model.branches]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def set_scales(scaler: precision.BlockScaler, log2: list[float]) -> None:
    scaler.load_state_dict({**scaler.state_dict(), "log2_scale": [float(v) for v in log2]})


def overflow_flags(scaler, model, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model.loss(x, y).backward()
    scaler.check_overflow()
    flags = scaler._last_flags.clone()
    scaler._clear_flags()
    return flags


CFG = PrecisionConfig()


@pytest.fixture(scope="module")
def deep():
    # Branch output gains 2^-36 (first branch) .. 2^2 (last): the gradient entering the first
    # branches is ~2^38 times smaller than the one entering the last (the paper's failure mode:
    # blocks nearest the input see tiny gradients), too wide for fp16 with one scale.
    torch.manual_seed(0)
    model = DeepResidual(n_layers=6, d=16, gains_log2=(-36.0, 2.0))
    x, y = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    return model, x, y


def test_per_branch_scales_fix_the_underflow_one_global_scale_cannot(deep):
    model, x, y = deep
    ref = branch_grads(model, x, y)  # fp32 everywhere
    assert ref[0].abs().max() < 1e-9 < 1e-1 < ref[-1].abs().max()  # gradient shrinks strongly with depth

    m16 = copy.deepcopy(model)
    scaler = precision.attach(m16, CFG, data_parallel_size=1)
    n = scaler.n_branches
    candidates = range(24, -1, -1)  # log2 scales up to the paper's clamp 2^24 (M = 1)
    # Best single scale: the largest with no overflow anywhere.
    global_log2 = None
    for c in candidates:
        set_scales(scaler, [c] * n)
        if not overflow_flags(scaler, m16, x, y).any():
            global_log2 = c
            break
    assert global_log2 is not None and global_log2 < 20  # the large-gradient branches cap it
    # Best per-branch scales: each the largest without overflow in that branch (others at the global one).
    per = [float(global_log2)] * n
    for i in range(n):
        for c in candidates:
            trial = [float(global_log2)] * n
            trial[i] = c
            set_scales(scaler, trial)
            if not overflow_flags(scaler, m16, x, y)[i]:
                per[i] = c
                break
    assert per[0] == 24 and per[-1] <= global_log2 + 1

    set_scales(scaler, [global_log2] * n)
    g_global = branch_grads(m16, x, y)
    assert not scaler.check_overflow()
    scaler._clear_flags()
    set_scales(scaler, per)
    g_block = branch_grads(m16, x, y)
    assert not scaler.check_overflow()

    # One global scale: the first branch's gradients are badly underflowed (mostly exact zeros).
    nonzero = ref[0] != 0
    assert rel_err(g_global[0], ref[0]) > 0.5
    assert (g_global[0][nonzero] == 0).float().mean() > 0.5
    # Per-branch scales: every branch within 5% of fp32 (fp16 rounding ~1e-3 except where the
    # 2^24 clamp still limits the first branch), the first branch included.
    errs = [rel_err(a, b) for a, b in zip(g_block, ref)]
    assert max(errs) < 0.05, errs
    assert max(errs[2:]) < 5e-3, errs
    # Gains, biases, embeddings stay fp32: parameters and gradients.
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in m16.parameters())


def test_overflow_in_one_branch_is_filtered_and_skips_only_that_scale(deep):
    model, x, y = deep
    torch.manual_seed(1)
    model = DeepResidual(n_layers=4, d=16)  # gains 1: init scale 2^13 does not overflow
    ref = branch_grads(model, x, y)
    m16 = copy.deepcopy(model)
    scaler = precision.attach(m16, CFG, data_parallel_size=1)
    branch_grads(m16, x, y)
    assert not scaler.check_overflow()
    assert scaler.update() is False  # one ordinary step
    before = scaler.log2_scale.clone()
    clean = branch_grads(m16, x, y)  # at the scales of the overflow step below
    assert not scaler.check_overflow()

    j = 4  # an attention branch in the middle
    m16.branches[j].boost = 1e4  # its internal gradient x 2^13 x 1e4 > 65504: Inf in fp16
    grads = branch_grads(m16, x, y)
    m16.branches[j].boost = 1.0
    assert scaler.check_overflow()  # the step must be skipped
    assert scaler._last_flags.nonzero().flatten().tolist() == [j]
    assert all(torch.isfinite(g).all() for g in grads)  # filtered: nothing non-finite leaves a branch
    for i in range(j + 1, len(grads)):  # branches after j (backward runs them first): untouched
        assert torch.equal(grads[i], clean[i])
        assert rel_err(grads[i], ref[i]) < 5e-3
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m16.parameters())

    assert scaler.update() is True
    after = scaler.log2_scale
    assert after[j] == pytest.approx(before[j] - 0.5)  # / sqrt(2)
    others = [i for i in range(scaler.n_branches) if i != j]
    assert torch.allclose(after[others], before[others] + 1 / 1000)
    assert scaler.skipped == 1 and scaler.overflow_counts.tolist() == [int(i == j) for i in range(scaler.n_branches)]

    # The next step proceeds: no overflow, gradients match fp32 again.
    grads = branch_grads(m16, x, y)
    assert not scaler.check_overflow()
    assert scaler.update() is False
    assert max(rel_err(a, b) for a, b in zip(grads, ref)) < 5e-3
    stats = scaler.stats()
    assert stats["precision/skipped_step_rate"] == pytest.approx(1 / 3)
    assert stats[f"precision/overflows/{precision.branch_name(j)}"] == 1.0
    assert stats["precision/scale_log2_min"] == pytest.approx(float(after.min()))


def _run(scaler: precision.BlockScaler, overflow_at: dict[int, list[int]], steps: int) -> list[bool]:
    skipped = []
    for _ in range(steps):
        for idx in overflow_at.get(scaler.updates, []):
            scaler.flag(idx, torch.tensor(True))
        skipped.append(scaler.update())
    return skipped


def test_update_rule_growth_backoff_hysteresis_clamps_and_state():
    cfg = PrecisionConfig()
    s = precision.BlockScaler(4, cfg, data_parallel_size=2)
    assert s.scales == [2.0**13] * 4  # 2^13 with A = 1 accumulation step: M = 2 ranks moves nothing (#15)

    # Growth: 1000 finite updates double every scale.
    assert _run(s, {}, 1000) == [False] * 1000
    assert s.log2_scale.tolist() == pytest.approx([14.0] * 4)

    # Back-off: overflow in branch 1 -> / sqrt(2), step skipped; others keep growing.
    assert _run(s, {1000: [1]}, 1) == [True]
    assert float(s.log2_scale[1]) == pytest.approx(13.5) and float(s.log2_scale[0]) == pytest.approx(14.001)

    # Hysteresis: another overflow within 125 updates skips but does not decrease ...
    _run(s, {1000 + 124: [1]}, 124)
    assert s.updates == 1125 and float(s.log2_scale[1]) == pytest.approx(13.5 + 123 / 1000)
    assert s.skipped == 2
    # ... 125 updates after the last decrease it may decrease again.
    _run(s, {1125: [1]}, 1)
    assert float(s.log2_scale[1]) == pytest.approx(13.5 + 123 / 1000 - 0.5)

    # Clamps: [A*2^7, A*2^24].
    s2 = precision.BlockScaler(2, PrecisionConfig(backoff_hysteresis=0, backoff_log2=4.0), data_parallel_size=2)
    _run(s2, {k: [0] for k in range(10)}, 10)
    assert float(s2.log2_scale[0]) == 7.0
    s3 = precision.BlockScaler(1, PrecisionConfig(init_scale_log2=23.9995), data_parallel_size=1)
    _run(s3, {}, 5)
    assert s3.scales == [2.0**24]

    # State round trip: a restored scaler continues identically (hysteresis memory included).
    state = s.state_dict()
    r = precision.BlockScaler(4, cfg, data_parallel_size=2)
    r.load_state_dict(copy.deepcopy(state))
    plan = {s.updates + 3: [1, 2], s.updates + 10: [1]}
    assert _run(s, plan, 20) == _run(r, plan, 20)
    assert torch.equal(s.log2_scale, r.log2_scale) and s.state_dict() == r.state_dict()
    # Another number of ranks M changes nothing; other accumulation steps A shift by log2(A'/A);
    # a pre-#15 state (scales offset by log2 M, no grad_accum_steps) is shifted down by log2 M.
    r4 = precision.BlockScaler(4, cfg, data_parallel_size=4)
    r4.load_state_dict(s.state_dict())
    assert torch.equal(r4.log2_scale, s.log2_scale)
    a4 = precision.BlockScaler(4, cfg, data_parallel_size=2, grad_accum_steps=4)
    a4.load_state_dict(s.state_dict())
    assert torch.allclose(a4.log2_scale, s.log2_scale + 2) and a4.max_log2 == 26.0
    old = {k: v for k, v in s.state_dict().items() if k != "grad_accum_steps"}
    old["log2_scale"] = [v + 1 for v in old["log2_scale"]]  # written by M = 2 before #15
    r4.load_state_dict(old)
    assert torch.allclose(r4.log2_scale, s.log2_scale)
    with pytest.raises(ValueError, match="n_branches=4"):
        precision.BlockScaler(6, cfg).load_state_dict(s.state_dict())


def test_resolve_ds_config_modes():
    v100 = {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True, "loss_scale": 1.0}}
    cpu_ok = PrecisionConfig(allow_fp16_on_cpu=True)
    mode, ds = precision.resolve_ds_config(v100, cpu_ok)
    assert mode == "fp16_block" and ds["fp16"] == {"enabled": False} and v100["fp16"]["enabled"]
    assert precision.resolve_ds_config(v100, PrecisionConfig(block_scaling=False, allow_fp16_on_cpu=True))[0] == "fp16"
    assert precision.resolve_ds_config({"bf16": {"enabled": True}}, CFG)[0] == "bf16"
    assert precision.resolve_ds_config({}, CFG)[0] == "fp32"
    with pytest.raises(ConfigError, match="fp16.loss_scale=0"):
        precision.resolve_ds_config({"fp16": {"enabled": True, "loss_scale": 0}}, cpu_ok)



def test_fp16_without_fp16_hardware_needs_the_opt_in(monkeypatch):
    # The answer must not depend on the host: pretend it lacks fp16 (CPUs without AVX512-FP16/AMX), then has it.
    v100 = {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True, "loss_scale": 1.0}}
    monkeypatch.setattr(precision, "fp16_supported", lambda: False)
    with pytest.raises(ConfigError, match="precision.allow_fp16_on_cpu"):
        precision.resolve_ds_config(v100, CFG)
    monkeypatch.setattr(precision, "fp16_supported", lambda: True)
    assert precision.resolve_ds_config(v100, CFG)[0] == "fp16_block"


def test_v100_config_file_declares_fp16_with_unit_loss_scale():
    import json
    from pathlib import Path

    cfg = json.loads((Path(__file__).parents[1] / "ds_configs" / "zero3_fp16_v100.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    mode, ds = precision.resolve_ds_config(cfg, PrecisionConfig(allow_fp16_on_cpu=True))
    assert mode == "fp16_block" and not ds["fp16"]["enabled"]


def test_attach_refuses_shared_parameters_and_bad_indices():
    model = DeepResidual(n_layers=1, d=8)
    model.branches[1].ln = model.branches[0].ln  # one LayerNorm in two branches
    precision.attach(model, CFG)
    with pytest.raises(RuntimeError, match="shared by branches attn00 and mlp00"):
        model.loss(torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    scaler = precision.BlockScaler(2, CFG)
    fn = precision._Attachment(scaler)
    with pytest.raises(IndexError, match="idx=2"):
        fn(nn.Identity(), torch.zeros(1), 2)
