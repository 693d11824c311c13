"""AdamW16: stochastic rounding is unbiased, the fp32 set follows torch's AdamW, small updates survive (#14)."""

from __future__ import annotations

import pytest
import torch

from dalle_ds.training.adamw16 import AdamW16, stochastic_round_to_bf16_, uses_16bit_state


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    x = torch.full((200_000,), 1.0 + 3 * 2**-10, dtype=torch.float32)  # between two bf16 values (ulp 2^-7)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out, x, torch.Generator().manual_seed(0))
    vals = set(out.float().unique().tolist())
    assert vals == {1.0, 1.0 + 2**-7}
    assert out.float().mean().item() == pytest.approx(x[0].item(), abs=2e-5)
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -2.0])
    out2 = torch.empty_like(special, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out2, special, None)
    assert out2.float().tolist() == special.tolist()


def _pair(dtype, fp32_master):
    torch.manual_seed(0)
    w = torch.randn(64, 32) * 0.02
    w = w.to(dtype).float()  # zero.Init creates 16-bit parameters directly: both start from them
    ref = torch.nn.Parameter(w.clone())
    mine = torch.nn.Parameter(w.clone().to(dtype))
    kw = dict(lr=1e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.045)
    return ref, mine, torch.optim.AdamW([ref], **kw), AdamW16([{"params": [mine], "fp32_master": fp32_master}], **kw)


@pytest.mark.parametrize("dtype,fp32_master", [(torch.float32, False), (torch.bfloat16, True)])
def test_fp32_state_follows_torch_adamw(dtype, fp32_master):
    ref, mine, opt_ref, opt = _pair(dtype, fp32_master)
    for i in range(20):
        g = (torch.randn(64, 32) * 1e-3).to(dtype).float()  # DeepSpeed hands the optimizer 16-bit gradients
        ref.grad, mine.grad = g.clone(), g.clone().to(dtype)
        opt_ref.step()
        opt.step()
    master = opt.state[mine].get("master", mine)
    torch.testing.assert_close(master.float(), ref.detach(), rtol=0, atol=1e-6 if dtype == torch.bfloat16 else 1e-7)
    assert opt.state[mine]["exp_avg"].dtype == torch.float32


def test_16bit_matrices_keep_small_updates_that_round_to_nearest_drops():
    """lr 1.4e-5 (4.5e-4 halved 5 times) on |w| ~ 0.02: each update is below half a bf16 ulp."""
    torch.manual_seed(0)
    w = (torch.rand(4096) * 0.01 + 0.02)
    p = torch.nn.Parameter(w.clone().to(torch.bfloat16))
    ref = torch.nn.Parameter(p.detach().float().clone())
    kw = dict(lr=1.4e-5, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.0)
    opt, opt_ref = AdamW16([p], **kw), torch.optim.AdamW([ref], **kw)
    rtn = p.detach().clone()
    for _ in range(50):
        p.grad = torch.ones_like(p)
        ref.grad = torch.ones_like(ref)
        opt.step()
        opt_ref.step()
        rtn = (rtn.float() - 1.4e-5).to(torch.bfloat16)  # round to nearest: stuck
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    moved_ref = (ref.detach() - w.to(torch.bfloat16).float()).mean()
    moved_sr = (p.detach().float() - w.to(torch.bfloat16).float()).mean()
    assert torch.equal(rtn, w.to(torch.bfloat16))  # what round-to-nearest would have done
    assert moved_sr.item() == pytest.approx(moved_ref.item(), rel=0.05)


def test_replicas_with_the_same_stream_round_identically():
    outs = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.full((1000,), 0.02, dtype=torch.bfloat16))
        opt = AdamW16([p], lr=1e-5, seed=7)
        opt.sr_stream = 3
        p.grad = torch.ones_like(p)
        opt.step()
        outs.append(p.detach().clone())
    assert torch.equal(outs[0], outs[1])


def test_regime_is_read_from_the_deepspeed_json():
    assert uses_16bit_state({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                      "bf16_optimizer_states": True}})
    assert not uses_16bit_state({"bf16": {"enabled": True}})
    assert not uses_16bit_state({"fp16": {"enabled": True}})
