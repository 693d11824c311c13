"""Metrics with known answers: FID of identical / shifted / scaled feature sets, IS of uniform and
one-hot predictions, the Gaussian blur, the Inception TorchScript extractor, and the evaluate CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from dalle_ds.evaluation import metrics


def _gaussian(n=400, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ a + 1.0  # correlated, non-centred


def test_fid_of_identical_sets_is_zero():
    x = _gaussian()
    assert abs(metrics.fid_from_features(x, x.clone())) < 1e-6


def test_fid_of_shifted_and_scaled_sets_matches_the_closed_form():
    x = _gaussian()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    # Same covariance: the trace term vanishes, FID = ||mu1 - mu2||^2 exactly.
    assert metrics.fid_from_features(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    # y = 2x + shift: S_y = 4 S_x, (S_x S_y)^1/2 = 2 S_x, trace term = tr(S_x + 4 S_x - 4 S_x) = tr(S_x).
    y = 2 * x + shift
    mu_term = float((y.mean(0) - x.mean(0)).square().sum())
    tr = float(torch.cov(x.T).trace())
    assert metrics.fid_from_features(x, y) == pytest.approx(mu_term + tr, rel=1e-5)


class _Probe(nn.Module):
    """Extractor stand-in: features = mean colour per channel; log-probs chosen by the red channel."""

    name = "probe"
    num_features = 3

    def features(self, images):
        return images.mean((2, 3)).double() * 10

    def log_probs(self, images):
        k = 4
        cls = (images[:, 0].mean((1, 2)) * k).long().clamp(max=k - 1)
        return torch.nn.functional.one_hot(cls, k).double().clamp_min(1e-12).log()


def test_inception_score_known_answers():
    probe = _Probe()
    # four equally used, confident classes -> IS = 4; one class for all -> IS = 1
    imgs = torch.cat([torch.full((8, 3, 4, 4), v) for v in (0.1, 0.3, 0.6, 0.9)])
    mean, _ = metrics.inception_score(probe, imgs, splits=1)
    assert mean == pytest.approx(4.0, rel=1e-4)
    mean, _ = metrics.inception_score(probe, torch.full((16, 3, 4, 4), 0.1), splits=2)
    assert mean == pytest.approx(1.0, rel=1e-4)


def test_fid_through_an_extractor_and_after_blur():
    probe = _Probe()
    g = torch.Generator().manual_seed(0)
    a = torch.rand(32, 3, 16, 16, generator=g)
    assert metrics.fid(probe, a, a.clone()) == pytest.approx(0.0, abs=1e-6)
    b = (a + 0.2).clamp(0, 1)
    assert metrics.fid(probe, a, b) > 1.0


class _SharpnessProbe(_Probe):
    """Features = mean absolute horizontal/vertical pixel differences per channel: what a blur removes."""

    num_features = 6

    def features(self, images):
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean((2, 3))
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean((2, 3))
        return torch.cat([dx, dy], 1).double() * 10


def test_fid_grows_with_the_blur_of_the_samples():
    probe = _SharpnessProbe()
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 16, 16, generator=g)
    fids = [metrics.fid(probe, real, metrics.gaussian_blur(real.clone(), r)) for r in (0, 0.5, 1, 2)]
    assert fids[0] == pytest.approx(0.0, abs=1e-6)
    assert fids[0] < fids[1] < fids[2] < fids[3]
    # the mean-colour probe cannot see a blur: the blur keeps the mean colour (replicated edges)
    assert metrics.fid(_Probe(), real, metrics.gaussian_blur(real, 2)) < 0.05 * fids[3]


def test_gaussian_blur():
    x = torch.zeros(1, 3, 41, 41)
    x[:, :, 20, 20] = 1.0
    assert metrics.gaussian_blur(x, 0) is x
    for r in (1, 2, 4):
        y = metrics.gaussian_blur(x, r)
        assert y.sum().item() == pytest.approx(3.0, rel=1e-4)  # mass kept (far from the edges)
        profile = y[0, 0, 20]  # std of the blurred impulse along a row = radius
        pos = torch.arange(41.0) - 20
        std = float((profile / profile.sum() * pos.square()).sum().sqrt())
        assert std == pytest.approx(r, rel=0.02)
    const = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(metrics.gaussian_blur(const, 8), const)  # edges replicated, radius > side
    with pytest.raises(ValueError, match="radius"):
        metrics.gaussian_blur(const, -1)


class _FakeInception(nn.Module):
    """Has the TorchScript FID Inception interface: uint8-range input, features or probabilities."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.cls = nn.Linear(3, 7)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        m = x.mean((2, 3)) / 255.0
        if return_features:
            return self.proj(m)
        return torch.softmax(self.cls(m), -1)


def test_inception_extractor_from_a_local_torchscript_file(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    ex = metrics.load_extractor(str(path))
    assert ex.num_features == 5 and ex.name.startswith("inception:")
    imgs = torch.rand(6, 3, 8, 8)
    assert ex.features(imgs).shape == (6, 5)
    torch.testing.assert_close(ex.log_probs(imgs).exp().sum(-1), torch.ones(6))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt"):
        metrics.load_extractor(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="--clip"):
        metrics.load_extractor(None, None)


def test_evaluate_cli_on_a_folder_against_shards(tmp_path):
    from dalle_ds import evaluate
    from dalle_ds.sampling.grids import to_pil
    from tests.eval_fixtures import write_image_shards

    captions = write_image_shards(tmp_path / "ref", 24, size=32)
    # "samples": the first 12 reference images themselves, in the folder layout dalle_ds.sample writes
    ref, _ = evaluate.load_images(str(tmp_path / "ref"), 32, None)
    (tmp_path / "s").mkdir()
    for i in range(12):
        to_pil(ref[i]).save(tmp_path / "s" / f"{i:03d}.png")
        (tmp_path / "s" / f"{i:03d}.txt").write_text(captions[i])
    path = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    res = evaluate.main(["--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "ref"),
                         "--inception-weights", str(path), "--radii", "0,2", "--json", str(tmp_path / "r.json"),
                         "--device", "cpu"])
    assert res["extractor"].startswith("inception:")
    assert set(res["fid"]) == {"0.0", "2.0"} and res["samples"] == 12 and res["reference"] == 24
    assert res["shapes"]["understood"] == 1.0 and res["shapes"]["match"] > 0.8  # real corpus images match
    assert json.loads((tmp_path / "r.json").read_text())["fid"]["2.0"] == pytest.approx(res["fid"]["2.0"])
    with pytest.raises(SystemExit):
        evaluate.main(["--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "ref")])
