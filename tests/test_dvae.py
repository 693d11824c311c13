"""dVAE in one process: loss terms against hand-computed values, schedules, EMA, shapes, input errors."""

from __future__ import annotations

import math

import pytest
import torch

from dalle_ds.config import DVAEConfig, DVAETrainConfig
from dalle_ds.models.dvae import DiscreteVAE, save_dvae
from dalle_ds.models.dvae_io import load_dvae
from dalle_ds.models.dvae_loss import (DVAELossSpec, codebook_usage, dvae_loss, gumbel_noise, gumbel_softmax,
                                       histogram_usage, kl_to_uniform, logit_laplace_nll, map_pixels,
                                       marginal_kl_to_uniform, mse_psnr, unmap_pixels)
from dalle_ds.models.dvae_loss import psnr as dvae_psnr
from dalle_ds.training.ema import EMA
from dalle_ds.training.schedules import DVAESchedule, cosine

SMALL = DVAEConfig(channels=3, n_hid=8, n_blk_per_group=1, group_count=3, codebook_size=16, n_init=8)


# ---------------------------------------------------------------- loss terms


def test_pixel_mapping_is_eps_0_1_and_round_trips():
    x = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(map_pixels(x), torch.tensor([0.1, 0.3, 0.9]))
    assert torch.allclose(unmap_pixels(map_pixels(x)), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


def test_logit_laplace_nll_hand_values():
    y = torch.tensor([0.5, 0.9])
    mu = torch.tensor([0.0, 0.0])
    ln_b = torch.tensor([0.0, math.log(2.0)])
    got = logit_laplace_nll(y, mu, ln_b)
    # y=0.5, b=1: ln2 + 0 + ln .5 + ln .5 + |0 - 0| = -ln 2
    # y=0.9, b=2: ln2 + ln2 + ln .9 + ln .1 + |ln 9| / 2
    want = [-math.log(2), 2 * math.log(2) + math.log(0.9) + math.log(0.1) + math.log(9) / 2]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_logit_laplace_density_integrates_to_one():
    y = torch.linspace(1e-4, 1 - 1e-4, 200001, dtype=torch.float64)
    mu, ln_b = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)
    p = torch.exp(-logit_laplace_nll(y, mu, ln_b))
    assert abs(float(torch.trapezoid(p, y)) - 1.0) < 2e-3


def test_kl_to_uniform_hand_values():
    uniform = torch.zeros(1, 4, 1, 1)
    assert float(kl_to_uniform(uniform)) == pytest.approx(0.0, abs=1e-7)
    two = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)  # q = (3/4, 1/4)
    want = 0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(2)
    assert float(kl_to_uniform(two)) == pytest.approx(want, abs=1e-6)
    peaked = torch.tensor([100.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert float(kl_to_uniform(peaked)) == pytest.approx(math.log(4), abs=1e-5)


def test_dvae_loss_is_per_pixel_sum_of_nll_plus_beta_kl():
    y = torch.tensor([0.5, 0.9, 0.1, 0.3, 0.7, 0.5, 0.2, 0.8]).view(2, 1, 2, 2)  # B=2, C=1, 2x2
    mu = torch.zeros_like(y)
    ln_b = torch.zeros_like(y)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]).view(2, 2, 1, 1)  # one position per image
    loss, terms = dvae_loss(y, mu, ln_b, logits, beta=2.0)
    nll_sum = sum(math.log(2) + math.log(v) + math.log(1 - v) + abs(math.log(v / (1 - v)))
                  for v in y.flatten().tolist())
    kl_sum = (0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(2)) + 0.0
    pixels = 2 * 4  # batch x C*H*W
    assert float(terms["nll"]) == pytest.approx(nll_sum / pixels, abs=1e-6)
    assert float(terms["kl"]) == pytest.approx(kl_sum / pixels, abs=1e-6)
    assert float(loss) == pytest.approx((nll_sum + 2.0 * kl_sum) / pixels, abs=1e-6)


def test_marginal_kl_is_kl_of_the_batch_mean_distribution():
    mirrored = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)  # (3/4,1/4), (1/4,3/4)
    assert float(marginal_kl_to_uniform(mirrored)) == pytest.approx(0.0, abs=1e-6)  # the mean is uniform
    assert float(kl_to_uniform(mirrored).mean()) > 0.1  # though each position is not
    same = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1).expand(2, 2, 2, 2)
    want = 0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(2)
    assert float(marginal_kl_to_uniform(same)) == pytest.approx(want, abs=1e-6)


def test_marginal_kl_gradient_pushes_down_the_dominant_code_everywhere():
    logits = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    logits[:, 0] += 4.0  # code 0 wins at every position: a collapsed codebook
    logits.requires_grad_(True)
    marginal_kl_to_uniform(logits).backward()
    assert (logits.grad[:, 0] > 0).all()  # gradient descent lowers code 0's logit at every position


def test_dvae_loss_mse_and_marginal_kl_options_hand_values():
    y = torch.tensor([0.5, 0.9, 0.1, 0.3, 0.7, 0.5, 0.2, 0.8]).view(2, 1, 2, 2)
    mu = torch.zeros_like(y)  # sigmoid(mu) = 0.5
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]]).view(2, 2, 1, 1)  # both (3/4, 1/4)
    spec = DVAELossSpec(recon="mse", mse_weight=10.0, marginal_kl_weight=3.0)
    loss, terms = dvae_loss(y, mu, torch.zeros_like(y), logits, beta=2.0, spec=spec)
    mse = sum((0.5 - v) ** 2 for v in y.flatten().tolist()) / 8
    kl_pos = 0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(2)
    kl = 2 * kl_pos / 8  # two positions over 8 subpixels
    marginal = kl_pos * 1 / 4  # the batch mean is (3/4, 1/4) too; 1 position per 4 subpixels
    assert float(terms["nll"]) == pytest.approx(10.0 * mse, abs=1e-6)
    assert float(terms["kl"]) == pytest.approx(kl, abs=1e-6)
    assert float(terms["marginal_kl"]) == pytest.approx(marginal, abs=1e-6)
    assert float(loss) == pytest.approx(10.0 * mse + 2.0 * kl + 3.0 * marginal, abs=1e-6)
    with pytest.raises(ValueError, match="recon='l2'"):
        dvae_loss(y, mu, mu, logits, 1.0, DVAELossSpec(recon="l2"))


def test_gumbel_softmax_is_reproducible_and_sharpens_with_tau():
    logits = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    a = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(5))
    b = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.allclose(a.sum(1), torch.ones(2, 3, 3))
    cold = gumbel_softmax(logits, 1e-3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(cold.argmax(1), a.argmax(1))  # same noise, same winner
    assert float(cold.max(1).values.min()) > 0.9
    with pytest.raises(ValueError, match="tau=0"):
        gumbel_softmax(logits, 0)


def test_gumbel_noise_has_the_gumbel_law_and_samples_the_softmax():
    # Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, variance pi^2 / 6; and the Gumbel-max trick:
    # argmax(logits + g) is distributed as softmax(logits), which is what the relaxation relies on.
    g = gumbel_noise(torch.empty(1_000_000), torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
    assert float(g.mean()) == pytest.approx(0.5772, abs=0.005)
    assert float(g.var()) == pytest.approx(math.pi**2 / 6, rel=0.01)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = logits + gumbel_noise(torch.empty(200_000, 4), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws.argmax(1), minlength=4).double() / 200_000
    assert torch.allclose(freq, torch.softmax(logits.double(), 0), atol=0.005)


def test_metrics_hand_values():
    x = torch.zeros(1, 1, 2, 2)
    mse, psnr = mse_psnr(x, torch.full_like(x, 0.1))
    assert mse == pytest.approx(0.01) and psnr == pytest.approx(20.0)
    perplexity, used = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert perplexity == pytest.approx(2.0) and used == 0.5
    assert histogram_usage(torch.tensor([2, 0, 2, 0])) == (pytest.approx(2.0), 0.5)
    assert dvae_psnr(0.01) == pytest.approx(20.0) and dvae_psnr(0.0) == pytest.approx(120.0)


# ---------------------------------------------------------------- schedules, EMA


def test_cosine_endpoints_midpoint_and_hold():
    assert cosine(0, 1.0, 0.0625, 100) == 1.0
    assert cosine(50, 1.0, 0.0625, 100) == pytest.approx((1.0 + 0.0625) / 2)
    assert cosine(100, 1.0, 0.0625, 100) == pytest.approx(0.0625)
    assert cosine(10_000, 1.0, 0.0625, 100) == pytest.approx(0.0625)
    values = [cosine(s, 1e-4, 1.25e-6, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="step=-1"):
        cosine(-1, 1, 0, 10)


def test_dvae_schedule_follows_the_paper():
    s = DVAESchedule(DVAETrainConfig())  # paper defaults
    assert s.beta(0) == 0.0 and s.beta(2500) == pytest.approx(3.3) and s.beta(5000) == pytest.approx(6.6)
    assert s.beta(10**6) == pytest.approx(6.6)
    assert s.tau(0) == 1.0 and s.tau(150_000) == pytest.approx(1 / 16)
    assert s.lr(0) == 1e-4 and s.lr(1_200_000) == pytest.approx(1.25e-6)
    assert s(0) == {"beta": 0.0, "tau": 1.0, "lr": 1e-4}


def test_ema_update_and_state_round_trip():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)  # 0.75 * 0 + 0.25 * 4
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.0))
    other = EMA(torch.nn.Linear(2, 1, bias=False), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.75 and other.num_updates == 1
    target = torch.nn.Linear(2, 1, bias=False)
    other.copy_to(target)
    assert torch.allclose(target.weight, torch.ones(1, 2))
    with pytest.raises(KeyError, match="differ"):
        ema.update(torch.nn.Linear(2, 1))  # has a bias the EMA does not track


# ---------------------------------------------------------------- model shapes and input errors


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return DiscreteVAE(SMALL).eval()


def test_encode_decode_shapes_and_range(vae):
    images = torch.rand(3, 3, 32, 32)
    codes = vae.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    out = vae.decode(codes)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(vae.decode(codes.view(3, 64)), out)  # row-major flat codes
    assert vae.logits(images).dtype == torch.float32


def test_forward_gives_finite_loss_and_gradients(vae):
    vae.train()
    loss, terms = vae(torch.rand(2, 3, 16, 16), tau=0.5, beta=1.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and terms["recon"].shape == (2, 3, 16, 16) and terms["codes"].shape == (2, 4, 4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    vae.zero_grad()
    vae.eval()


@pytest.mark.parametrize("images, match", [
    (torch.rand(3, 32, 32), r"\(B, 3, H, W\) tensor, got shape \(3, 32, 32\)"),
    (torch.rand(1, 1, 32, 32), r"got shape \(1, 1, 32, 32\)"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating dtype.*torch.uint8"),
    (torch.rand(1, 3, 30, 32), "divisible by the downsampling factor 4, got 30x32"),
    (torch.rand(1, 3, 32, 32) * 255, r"values must lie in \[0, 1\], got min .* max 2"),
    (torch.full((1, 3, 32, 32), float("nan")), r"values must lie in \[0, 1\]"),
])
def test_bad_images_are_refused_with_the_offending_value(vae, images, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(images)


@pytest.mark.parametrize("codes, match", [
    (torch.zeros(1, 8, 8), r"integer .* got shape \(1, 8, 8\) dtype torch.float32"),
    (torch.zeros(1, 10, dtype=torch.long), "N=10 is not a square"),
    (torch.full((1, 4, 4), 16), r"values must lie in \[0, 16\), got min 16 max 16"),
    (torch.full((1, 4, 4), -1), r"got min -1"),
])
def test_bad_codes_are_refused_with_the_offending_value(vae, codes, match):
    with pytest.raises(ValueError, match=match):
        vae.decode(codes)


def test_export_round_trip(vae, tmp_path):
    meta = save_dvae(vae, str(tmp_path / "exp"), extra={"image_size": 32})
    back = load_dvae(str(tmp_path / "exp"))
    assert back.cfg == SMALL and meta["image_size"] == 32 and len(meta["weights_sha256"]) == 64
    assert back.export_meta == {**meta, "dvae_hash": meta["weights_sha256"]} and not back.training
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(back.logits(x), vae.logits(x))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_dvae(str(tmp_path))
    other = save_dvae(DiscreteVAE(SMALL), str(tmp_path / "other"))
    (tmp_path / "exp" / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(ValueError, match="mixes two exports"):
        load_dvae(str(tmp_path / "exp"))
    assert other["weights_sha256"] != meta["weights_sha256"]
