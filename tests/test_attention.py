"""The attention backends agree with the dense masked reference in outputs and gradients."""

import warnings

import pytest
import torch

from dalle_ds.models.attention import BlockSparseAttention, build_backend
from dalle_ds.models.masks import build_mask, image_pattern, stream_mask

CASES = [  # kind, text_len, grid, conv kernel
    ("row", 5, 4, 3), ("column", 5, 4, 3), ("conv", 5, 4, 3),
    ("row", 8, 8, 5), ("column", 8, 8, 5), ("conv", 8, 8, 5),
    ("conv", 3, 8, 3), ("conv", 1, 4, 5), ("row", 1, 2, 3),
]


def _qkv(text_len, grid, batch=2, heads=3, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, text_len + grid * grid, dim)
    return [torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3)]


def _out_and_grads(backend, q, k, v):
    out = backend(q, k, v)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)  # a non-trivial upstream grad
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return out.detach(), grads


@pytest.mark.parametrize("kind,text_len,grid,kernel", CASES)
def test_sparse_matches_dense_outputs_and_gradients(kind, text_len, grid, kernel):
    q, k, v = _qkv(text_len, grid)
    ref_out, ref_grads = _out_and_grads(build_backend("dense", kind, text_len, grid, kernel), q, k, v)
    out, grads = _out_and_grads(build_backend("sparse", kind, text_len, grid, kernel), q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5, msg=f"d{name} differs for {kind}")


def test_sparse_accepts_strided_inputs_like_the_model_gives():
    # The prior passes q, k, v as permuted views of one (B, S, 3, H, D) projection.
    text_len, grid, b, h, d = 4, 4, 2, 2, 8
    qkv = torch.randn(b, text_len + grid * grid, 3, h, d, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    for kind in ("row", "column", "conv"):
        dense = build_backend("dense", kind, text_len, grid, 3)(q, k, v)
        sparse = build_backend("sparse", kind, text_len, grid, 3)(q, k, v)
        torch.testing.assert_close(sparse, dense)
        g1, = torch.autograd.grad(dense.pow(2).sum(), qkv)
        g2, = torch.autograd.grad(sparse.pow(2).sum(), qkv)
        torch.testing.assert_close(g2, g1)


def test_sparse_gradcheck_float64():
    q, k, v = _qkv(3, 4, batch=1, heads=1, dim=4, dtype=torch.float64)
    for kind in ("row", "column", "conv"):
        backend = build_backend("sparse", kind, 3, 4, 3)
        assert torch.autograd.gradcheck(lambda a, b, c: backend(a, b, c), (q, k, v))


def test_sparse_skips_masked_work():
    # Keys per image query: T + W instead of S (W = own block + `back` blocks).
    t, g = 64, 32
    assert build_backend("sparse", "row", t, g, 11).window == 2 * g
    assert build_backend("sparse", "column", t, g, 11).window == g
    conv = build_backend("sparse", "conv", t, g, 11)
    assert conv.before == 5 * g + 5 and conv.window == 7 * g
    assert t + conv.window < (t + g * g) / 3


def test_sparse_rejects_masks_it_cannot_serve():
    t, g = 3, 4
    img = image_pattern("row", g)
    with pytest.raises(ValueError, match="causal in that order"):
        BlockSparseAttention(stream_mask(img.t().contiguous(), t), t, g)  # anti-causal image part
    with pytest.raises(ValueError, match="causal in that order"):
        BlockSparseAttention(build_mask("row", t, g), t, g, transposed=True)  # row mask in column order
    mask = build_mask("row", t, g)
    mask[t + 5, 0] = False
    with pytest.raises(ValueError, match="see all the text"):
        BlockSparseAttention(mask, t, g)
    with pytest.raises(ValueError, match="q, k, v of shape"):
        build_backend("sparse", "row", t, g, 3)(*[torch.zeros(1, 1, 7, 4)] * 3)
    with pytest.raises(ValueError, match="model.attention='xla'"):
        build_backend("xla", "row", t, g, 3)


@pytest.mark.parametrize("kind,text_len,grid,kernel", CASES[:6])
def test_flex_forward_matches_dense_on_cpu(kind, text_len, grid, kernel):
    q, k, v = _qkv(text_len, grid)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = build_backend("flex", kind, text_len, grid, kernel)(q, k, v)
        ref = build_backend("dense", kind, text_len, grid, kernel)(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_refuses_backward_on_cpu_naming_the_setting():
    q, k, v = _qkv(3, 4)
    with pytest.raises(NotImplementedError, match="model.attention='flex'"):
        build_backend("flex", "row", 3, 4, 3)(q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention forward+backward needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_flex_matches_dense_forward_and_backward_on_cuda(kind):
    text_len, grid, kernel = 64, 32, 11  # 1088 tokens: not a multiple of flex's 128-token blocks
    q, k, v = _qkv(text_len, grid, batch=2, heads=4, dim=64, device="cuda")
    ref_out, ref_grads = _out_and_grads(build_backend("dense", kind, text_len, grid, kernel), q, k, v)
    for name in ("flex", "sparse"):
        out, grads = _out_and_grads(build_backend(name, kind, text_len, grid, kernel), q, k, v)
        torch.testing.assert_close(out, ref_out, rtol=2e-3, atol=2e-3)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, rtol=2e-3, atol=2e-3)


def test_flex_refuses_cuda_below_sm80_naming_the_evidence(monkeypatch):
    """V100 (sm_70): FlexAttention's Triton kernels have no tensor-core path below sm_80 (#14)."""
    from dalle_ds.models import attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    with pytest.raises(RuntimeError, match=r"sm_70.*triton-lang/triton#5066.*model.attention=sparse"):
        build_backend("flex", "row", 3, 4, 3)
    attention.check_flex_device("cpu")  # CPU: nothing to check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    build_backend("flex", "row", 3, 4, 3)  # A100 and newer: allowed


def test_paper_preset_uses_sparse_attention_and_16bit_branches():
    from dalle_ds.config import load_config

    cfg = load_config("paper")
    assert cfg.model.attention == "sparse" and cfg.precision.branch_dtype == "float16"
