"""PowerSGD arithmetic in one process (one node): views, QR, 16-bit clamping, error feedback, state.

The multi-rank behaviour (2 fake nodes x 2 ranks, DeepSpeed ZeRO-3) is in test_hierarchical_zero.py.
"""

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

from dalle_ds.config import PowerSGDConfig, replace
from dalle_ds.parallel.powersgd import (ExactAverager, PowerSGD, Shard, orthogonalize, split_rows, to_comm,
                               worth_compressing)


def _cfg(**kw):
    base = dict(enabled=True, rank=4, min_compression_numel=16, comm_dtype="float32")
    return replace(PowerSGDConfig(), **{**base, **kw})


def _compress_once(m, cfg, key="w"):
    """Run one PowerSGD step on a whole-matrix shard; returns (decompressed, averager)."""
    psgd = PowerSGD(cfg, group=None, num_nodes=1)
    flat = m.clone().reshape(-1)
    psgd.average_([Shard(key, flat, 0, m.shape[1])])
    return flat.view_as(m), psgd


def test_split_rows_head_rows_tail():
    s = split_rows(0, 12, 4)  # exactly three whole rows of a (., 4) matrix: no head, no tail
    assert (s.head, s.rows, s.width, s.tail) == (0, 3, 4, 0)
    s = split_rows(6, 13, 4)  # elements 6..18 of a (., 4) matrix: 6,7 | rows 2..3 (8..15) | 16,17,18
    assert (s.head, s.rows, s.width, s.tail) == (2, 2, 4, 3)
    s = split_rows(1, 2, 4)  # inside one row: all head
    assert (s.head, s.rows, s.tail) == (2, 0, 0)
    assert not worth_compressing(split_rows(0, 16, 4), rank=4, comm_bytes=2, min_numel=1)  # r = 4 = cols
    assert worth_compressing(split_rows(0, 64 * 64, 64), rank=8, comm_bytes=2, min_numel=1)
    assert not worth_compressing(split_rows(0, 64 * 64, 64), rank=8, comm_bytes=2, min_numel=10_000)
    # #15: the baseline is an fp16 exact all-reduce. 12B `proj` shard (496 x 3968) at rank 896 -> r = 496:
    # P + Q = 4.4 MB > 3.9 MB fp16 exact (< 7.9 MB fp32, so the old rule compressed it); rank 128 pays.
    proj = split_rows(0, 496 * 3968, 3968)
    assert not worth_compressing(proj, rank=896, comm_bytes=2, min_numel=1)
    assert worth_compressing(proj, rank=128, comm_bytes=2, min_numel=1)


def test_matches_torch_powersgd_hook_arithmetic():
    """Same M, Q, rank: torch's hook steps (_orthogonalize + bmm) give the same decompression."""
    torch.manual_seed(0)
    m = torch.randn(48, 40)
    cfg = _cfg(rank=6, orthogonalization_eps=1e-6)
    out, psgd = _compress_once(m, cfg)
    q0 = PowerSGD(cfg, None, 1)._q("w", 40, 6, m.device).clone()  # the same fixed Gaussian Q
    # torch's hook: p = M q; _orthogonalize(p); q = M^T p; M ~ p q^T  (batched, (1, n, r))
    mb = m.unsqueeze(0)
    p = torch.bmm(mb, q0.unsqueeze(0))
    p[0].diagonal().add_(1e-6)  # the paper's eps*I before Householder QR
    torch_psgd._orthogonalize(p, 0)
    q = torch.bmm(mb.transpose(1, 2), p)
    ref = torch.bmm(p, q.transpose(1, 2))[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(psgd.errors["w"], m - ref, rtol=1e-5, atol=1e-5)


def test_low_rank_error_respects_svd_bound():
    torch.manual_seed(1)
    u, v = torch.linalg.qr(torch.randn(64, 64)).Q, torch.linalg.qr(torch.randn(96, 64)).Q
    s = 0.7 ** torch.arange(64.0)  # decaying spectrum
    m = (u * s) @ v.T  # (64, 96)
    for r in (2, 4, 8):
        out, _ = _compress_once(m, _cfg(rank=r))
        err = torch.linalg.norm(m - out)
        optimal = torch.sqrt((s[r:] ** 2).sum())  # Eckart-Young: best rank-r error
        assert err >= optimal * (1 - 1e-4)
        assert err <= 3.0 * optimal, (r, err, optimal)  # one power step with a random Q is near-optimal here
        # decompression is the projection P P^T M: residual orthogonal to it
        assert abs(float((m - out).flatten() @ out.flatten())) < 1e-4 * float(m.norm() ** 2)
    exact_rank = torch.randn(30, 3) @ torch.randn(3, 50)
    out, _ = _compress_once(exact_rank, _cfg(rank=3))
    assert torch.linalg.norm(out - exact_rank) < 1e-4 * torch.linalg.norm(exact_rank)
    out16, _ = _compress_once(exact_rank, _cfg(rank=3, comm_dtype="float16"))
    assert torch.linalg.norm(out16 - exact_rank) < 3e-3 * torch.linalg.norm(exact_rank)


def test_orthogonalize_handles_zero_and_rank_deficient():
    q = orthogonalize(torch.zeros(10, 4), 1e-6)  # vanishing gradient: eps*I keeps QR well defined
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)
    q = orthogonalize(torch.ones(10, 1) @ torch.ones(1, 4), 1e-6)
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-4, rtol=0)


def test_to_comm_clamps_infinities():
    x = torch.tensor([float("inf"), -float("inf"), 1e6, 1.0, float("nan")])
    y = to_comm(x, torch.float16)
    assert y[0] == 65504 and y[1] == -65504 and y[2] == 65504 and y[3] == 1 and torch.isnan(y[4])
    y = to_comm(x, torch.float16, parts=2)  # two nodes: each contributes at most max/2, the sum stays finite
    assert y[0] == 32752 and (y[:4] + y[:4]).isfinite().all()


def test_error_feedback_sum_of_updates_converges():
    """Sum of decompressed updates = sum of gradients - final error buffer, and the gap vanishes relatively."""
    torch.manual_seed(2)
    base = torch.randn(32, 3) @ torch.randn(3, 24)  # gradients are roughly low rank, plus noise
    psgd = PowerSGD(_cfg(rank=4, comm_dtype="float16"), None, 1)
    sum_true, sum_sent, rel = torch.zeros(32, 24), torch.zeros(32, 24), []
    for t in range(60):
        g = base + 0.5 * torch.randn(32, 24)
        flat = g.clone().reshape(-1)
        psgd.average_([Shard("w", flat, 0, 24)])
        sum_true += g
        sum_sent += flat.view(32, 24)
        torch.testing.assert_close(sum_true - sum_sent, psgd.errors["w"], rtol=1e-4, atol=1e-3)
        rel.append(float(torch.linalg.norm(sum_true - sum_sent) / torch.linalg.norm(sum_true)))
    assert rel[-1] < 0.1 and rel[-1] < rel[4] / 3, rel[::10]


def test_exact_shards_and_partial_rows_are_not_compressed():
    torch.manual_seed(3)
    psgd = PowerSGD(_cfg(rank=2, comm_dtype="float16"), None, 1)
    g = torch.randn(50)  # a shard starting mid-row of a (., 8) matrix: head 3, rows 5 (40), tail 7
    emb = torch.randn(64)
    flat, flat_emb = g.clone(), emb.clone()
    psgd.average_([Shard("w", flat, 5, 8), Shard("emb", flat_emb, 0, 8, exact=True)])
    assert torch.equal(flat[:3], g[:3]) and torch.equal(flat[43:], g[43:]) and torch.equal(flat_emb, emb)
    assert not torch.equal(flat[3:43], g[3:43])  # the (5, 8) block went through rank 2
    st = psgd.stats()  # one "step" not yet closed: close it
    psgd.end_step()
    st = psgd.stats()
    # payload: P (5x2) + Q (8x2) in fp16 with one fp32 scale scalar each, exact 3 + 7 + 64 + 1 flag in fp32
    assert st["cross_node_bytes_per_step"] == (10 + 16) * 2 + 2 * 4 + (3 + 7 + 64 + 1) * 4
    assert st["cross_node_bytes_uncompressed_per_step"] == (50 + 64) * 4
    assert st["compressed_numel_per_step"] == 40 and st["exact_numel_per_step"] == 74


def test_nonfinite_gradient_skips_and_keeps_error_buffer():
    torch.manual_seed(4)
    psgd = PowerSGD(_cfg(rank=2, comm_dtype="float16"), None, 1)
    flat = torch.randn(16 * 8)
    psgd.average_([Shard("w", flat, 0, 8)])
    e_before = psgd.errors["w"].clone()
    bad = torch.randn(16 * 8)
    bad[5] = float("inf")
    psgd.average_([Shard("w", bad, 0, 8)])
    assert torch.isnan(bad).all()  # the step is non-finite everywhere: DeepSpeed skips it under fp16
    assert torch.equal(psgd.errors["w"], e_before)  # not contaminated, so not zeroed either
    good = torch.randn(16 * 8)
    psgd.average_([Shard("w", good, 0, 8)])
    assert torch.isfinite(good).all() and psgd.stats()["skipped_nonfinite"] == 1
    assert psgd.stats()["error_buffer_resets"] == 0


def test_state_dict_round_trip_gives_same_next_update():
    torch.manual_seed(5)
    cfg = _cfg(rank=3, comm_dtype="bfloat16", warm_start=True)
    a = PowerSGD(cfg, None, 1, seed=7)
    for _ in range(3):
        a.average_([Shard("w", torch.randn(20 * 12), 0, 12)])
    b = PowerSGD(cfg, None, 1, seed=99)  # a different seed: Q must come from the state
    b.load_state_dict(a.state_dict())
    g = torch.randn(20 * 12)
    ga, gb = g.clone(), g.clone()
    a.average_([Shard("w", ga, 0, 12)])
    b.average_([Shard("w", gb, 0, 12)])
    assert torch.equal(ga, gb) and torch.equal(a.errors["w"], b.errors["w"])
    with pytest.raises(ValueError, match="rank=3"):
        PowerSGD(replace(cfg, rank=4), None, 1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="exact"):
        ExactAverager(None, 1).load_state_dict(a.state_dict())


def test_fixed_q_is_identical_across_instances_and_not_resampled():
    cfg = _cfg(rank=2)
    a, b = PowerSGD(cfg, None, 2), PowerSGD(cfg, None, 2)
    cpu = torch.device("cpu")
    qa = a._q("layer.0.w", 16, 2, cpu)
    assert torch.equal(qa, b._q("layer.0.w", 16, 2, cpu))  # every node draws the same Q
    assert a._q("layer.1.w", 16, 2, cpu) is qa  # one fixed Q per width, shared by the shards
    assert a._q("layer.1.w", 24, 2, cpu).shape == (24, 2)
    a.num_nodes = 1
    a.average_([Shard("layer.0.w", torch.randn(16 * 16), 0, 16)])
    assert torch.equal(a._q("layer.0.w", 16, 2, cpu), qa)  # warm_start=False: Q stays fixed
    w = PowerSGD(_cfg(rank=2, warm_start=True), None, 1)
    q0 = w._q("layer.0.w", 16, 2, cpu).clone()
    w.average_([Shard("layer.0.w", torch.randn(16 * 16), 0, 16)])
    assert not torch.equal(w.qs["layer.0.w"], q0)  # warm start: Q is the last all-reduced Q


# ---------------------------------------------------------------- 16-bit P/Q at cluster scale (#15)

def _simulated_allreduce(parts, comm_dtype, k):
    """The averager's factor all-reduce over ``k`` simulated nodes, arithmetically in one process:
    the MAX all-reduce of max-abs, each node's encoded 16-bit payload, a sequential 16-bit sum (what a
    ring reduction in the comm dtype does), decode. fp32: the plain mean."""
    from dalle_ds.parallel.powersgd import comm_scale_log2, decode_factor, encode_factor

    if comm_dtype == torch.float32:
        return sum(parts) / k
    maxabs = torch.stack([p.abs().amax() for p in parts]).amax().reshape(1)
    s = comm_scale_log2(maxabs, comm_dtype, k).item()
    total = torch.zeros(parts[0].shape, dtype=comm_dtype)
    for p in parts:
        total += encode_factor(p, s, comm_dtype, k)
    return decode_factor(total, s, k)


def test_fp16_factors_keep_small_gradients_on_128_nodes():
    """A 496x3968 shard (12B `proj` rows) on 128 simulated nodes: per-element gradient magnitudes
    1e-8 .. 1e2 decompress within 1% of fp32 PowerSGD (same rank, same Q) and nothing fp32 keeps is
    flushed to zero. Before #15 (factor / k cast to fp16) 1e-6 lost everything and 1e-5 lost 87%."""
    k, rows, cols, r = 128, 496, 3968, 128
    torch.manual_seed(0)
    u, v = torch.linalg.qr(torch.randn(rows, 64)).Q, torch.linalg.qr(torch.randn(cols, 64)).Q
    common = (u * (0.8 ** torch.arange(64.0))) @ v.T * 800 + torch.randn(rows, cols)  # (rows, C), shared
    common /= common.abs().mean()  # per-element magnitude 1
    ls, rs = torch.randn(k, rows, 2), torch.randn(k, cols, 2) * 0.5  # each node's own rank-2 part
    q = torch.randn(cols, r)  # the fixed Gaussian Q
    cq = common @ q

    def decompress(scale, comm_dtype):  # node i's gradient: scale * (common + ls[i] rs[i]^T)
        p = _simulated_allreduce([scale * (cq + ls[i] @ (rs[i].T @ q)) for i in range(k)], comm_dtype, k)
        p = orthogonalize(p, 1e-6)
        ctp = common.T @ p
        qn = _simulated_allreduce([scale * (ctp + rs[i] @ (ls[i].T @ p)) for i in range(k)], comm_dtype, k)
        return p @ qn.T

    for e in range(-8, 3):
        ref, out = decompress(10.0 ** e, torch.float32), decompress(10.0 ** e, torch.float16)
        rel = float((out - ref).norm() / ref.norm())
        assert rel < 0.01, (e, rel)
        assert not ((ref != 0) & (out == 0)).any(), e


def test_fp16_average_of_tiny_gradients_over_128_identical_nodes(monkeypatch):
    """Through ``average_``: 128 nodes with the same shard (the sum is 128x each payload, summed in
    the comm dtype) must give fp32 PowerSGD's result, even at 1e-8 per element."""
    from dalle_ds.parallel import powersgd

    def fake_all_reduce(t, group, num_nodes, op=torch.distributed.ReduceOp.SUM):
        if op == torch.distributed.ReduceOp.SUM:
            total = torch.zeros_like(t)
            for _ in range(num_nodes):
                total += t
            t.copy_(total)

    monkeypatch.setattr(powersgd, "_all_reduce", fake_all_reduce)
    torch.manual_seed(6)
    g = (torch.randn(96, 4) @ torch.randn(4, 80) + 0.1 * torch.randn(96, 80)) * 1e-8
    outs = {}
    for dtype in ("float32", "float16"):
        psgd = PowerSGD(_cfg(rank=8, comm_dtype=dtype), None, num_nodes=128)
        flat = g.clone().reshape(-1)
        psgd.average_([Shard("w", flat, 0, 80)])
        outs[dtype] = flat.view(96, 80)
    rel = float((outs["float16"] - outs["float32"]).norm() / outs["float32"].norm())
    assert rel < 0.01, rel
    assert not ((outs["float32"] != 0) & (outs["float16"] == 0)).any()


def test_one_node_means_no_compression_and_one_warning(capsys):
    from dalle_ds.parallel.powersgd import build_averager

    avg = build_averager(_cfg(), None, num_nodes=1)
    assert isinstance(avg, ExactAverager)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "powersgd" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0] and "1 node" in lines[0], lines
    g = torch.randn(64 * 64)
    flat = g.clone()
    avg.average_([Shard("w", flat, 0, 64)])
    assert torch.equal(flat, g)  # nothing lost
    assert isinstance(build_averager(_cfg(), None, num_nodes=2), PowerSGD)


def test_stats_report_fp32_and_fp16_exact_baselines():
    psgd = PowerSGD(_cfg(rank=4, comm_dtype="float16"), None, 1)
    psgd.average_([Shard("w", torch.randn(64 * 64), 0, 64)])
    psgd.end_step()
    st = psgd.stats()
    sent = 4 * (64 + 64) * 2 + 2 * 4 + 4  # P, Q fp16 + two scale scalars + the flag
    assert st["cross_node_bytes_per_step"] == sent
    assert st["cross_node_bytes_uncompressed_per_step"] == 64 * 64 * 4
    assert st["cross_node_bytes_fp16_exact_per_step"] == 64 * 64 * 2
    assert st["compression_rate_vs_fp32"] == pytest.approx(1 - sent / (64 * 64 * 4))
    assert st["compression_rate_vs_fp16"] == pytest.approx(1 - sent / (64 * 64 * 2))


def _host_vs_gpu_buffers() -> dict:
    """On one gloo rank of 2 (each rank one node): the same 4 steps of bf16 gradient shards (a 16-bit
    regime's grad buffer; a non-finite step, a shard with head/tail pieces, an exact shard) through
    PowerSGD with the error buffers beside the gradients and in host memory."""
    from dalle_ds.parallel.dist import init_distributed

    init_distributed()
    rank = torch.distributed.get_rank()
    cfg = _cfg(rank=3, comm_dtype="float16", min_compression_numel=16)
    averagers = {where: PowerSGD(replace(cfg, error_buffer_device=where), None, 2, seed=3) for where in ("gpu", "host")}
    outs: dict[str, list[torch.Tensor]] = {w: [] for w in averagers}
    for step in range(4):
        gen = torch.Generator().manual_seed(100 * step + rank)
        grads = [torch.randn(24 * 10, generator=gen), torch.randn(5 + 12 * 8 + 3, generator=gen) * 1e-3,
                 torch.randn(30, generator=gen)]
        if step == 2 and rank == 1:
            grads[0][7] = float("inf")  # one node overflows: both placements skip, E untouched
        for where, avg in averagers.items():
            flats = [g.to(torch.bfloat16) for g in grads]
            avg.average_buckets_([[Shard("a", flats[0], 0, 10), Shard("b", flats[1], 3, 8)],
                                  [Shard("bias", flats[2], 0, 30, exact=True)]])
            avg.end_step()
            outs[where].append(torch.cat(flats).float().numpy().copy())  # numpy: pickled by value
    host = averagers["host"]
    return {"outs": outs, "errors": {w: {k: v.numpy().copy() for k, v in a.errors.items()}
                                     for w, a in averagers.items()},
            "host_devices": sorted({e.device.type for e in host.errors.values()}),
            "host_pinned": sorted({bool(e.is_pinned()) for e in host.errors.values()}),
            "stats": {w: a.stats() for w, a in averagers.items()}}


def test_host_error_buffers_give_identical_results_on_two_gloo_nodes():
    """powersgd.error_buffer_device=host (the paper preset's) against gpu (beside the gradients), 2 real
    gloo ranks as 2 nodes: every averaged gradient and every error buffer equal bit for bit, skipped step
    included; the host buffers are CPU tensors, pinned exactly when CUDA exists."""
    from tests.multirank import run_ranks

    for res in run_ranks(_host_vs_gpu_buffers, world_size=2, timeout_s=300):
        outs = {w: [torch.from_numpy(a) for a in res["outs"][w]] for w in ("gpu", "host")}
        for a, b in zip(outs["gpu"], outs["host"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bit for bit
        assert torch.isnan(outs["gpu"][2]).all() and torch.isfinite(outs["gpu"][3]).all()
        assert not torch.equal(outs["gpu"][0], outs["gpu"][1])
        assert res["errors"]["gpu"].keys() == res["errors"]["host"].keys() == {"a", "b"}
        for key, e in res["errors"]["gpu"].items():
            e = torch.from_numpy(e)
            assert torch.equal(e, torch.from_numpy(res["errors"]["host"][key])) and e.abs().sum() > 0
        assert res["host_devices"] == ["cpu"] and res["host_pinned"] == [torch.cuda.is_available()]
        assert res["stats"]["host"]["error_buffer_device"] == "host"
        assert res["stats"]["gpu"]["skipped_nonfinite"] == res["stats"]["host"]["skipped_nonfinite"] == 1


def test_host_error_buffers_survive_a_state_dict_round_trip():
    """A host-placed averager's state loads into either placement and gives the same next update; a
    loaded buffer is placed (host memory) at its first use."""
    torch.manual_seed(6)
    host = PowerSGD(_cfg(rank=2, error_buffer_device="host"), None, 1, seed=1)
    for _ in range(2):
        host.average_([Shard("w", torch.randn(16 * 8), 0, 8)])
    g = torch.randn(16 * 8)
    results = []
    for where in ("gpu", "host"):
        other = PowerSGD(_cfg(rank=2, error_buffer_device=where), None, 1, seed=1)
        other.load_state_dict(host.state_dict())
        flat = g.clone()
        other.average_([Shard("w", flat, 0, 8)])
        assert other.errors["w"].device.type == "cpu" and other.errors["w"].dtype == torch.float32
        results.append((flat, other.errors["w"]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
