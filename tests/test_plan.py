"""Planner figures against hand-computed values and the paper's facts."""

import pytest

from dalle_ds import plan
from dalle_ds.config import ConfigError, load_config
from dalle_ds.models.prior import Prior

D = 3968


def test_param_count_by_hand_and_matches_prior():
    m = load_config("paper").model
    by_hand = (64 * (12 * D * D + 13 * D)  # qkv, proj, fc, proj weights + their biases + 2 LayerNorms
               + (16384 + 2 * 256 + 8192 + 2 * 32 + 1) * D  # text tok/pos/pad, image tok/row/col, SOI
               + (16384 + 8192) * D + 2 * D)  # text and image heads, final LayerNorm
    assert by_hand == 12_292_812_416 == plan.param_count(m) == Prior.num_params(m)
    tiny = load_config("tiny").model
    assert plan.param_count(tiny) == Prior.num_params(tiny)
    assert 24.0 < 2 * by_hand / 1e9 < 25.0  # "24 GB of fp16 parameters"


def test_paper_fits_16gb_v100_only_when_sharded_8_ways(capsys):
    assert plan.main(["--config", "paper", "--nodes", "128", "--gpus-per-node", "8", "--gpu-memory", "16GB",
                      "--powersgd-rank", "896"]) == 0
    out = capsys.readouterr().out
    assert "sharded  4 ways:" in out and "sharded  8 ways:" in out
    for line in out.splitlines():
        if line.strip().startswith("sharded  4 ways") or line.strip().startswith("sharded  1 ways"):
            assert "DOES NOT FIT" in line
        if line.strip().startswith("sharded  8 ways"):
            assert line.endswith("fits")
    m = load_config("paper").model
    n = plan.param_count(m)
    paper8 = plan.memory(m, 8, 1, "paper", 896)
    # 16-bit params, grads, m, v for the matrices (8 B), fp32 for embeddings/heads/gains/biases (16 B)
    n_exact = sum(x.numel for x in plan.inventory(m) if x.exact)
    states = ("params (16-bit; fp32 exact)", "grads in error buffers", "Adam m+v (16-bit; fp32 exact)")
    assert sum(paper8[k] for k in states) == \
        pytest.approx((8 * (n - n_exact) + 16 * n_exact) / 8)
    assert paper8["checkpointed residual stream (fp32)"] == 2 * 64 * 1280 * D * 4
    ds8 = plan.memory(m, 8, 1, "deepspeed", None)  # DeepSpeed's fp32 master + moments: 16 B/param / 8
    assert sum(v for k, v in ds8.items() if k.startswith("fp")) - ds8["fp32 logits + grads"] == 16 * n / 8
    assert sum(ds8.values()) > 16 * plan.GiB  # so this layout does not fit a 16 GB V100 at node size 8


def test_deepspeed_layout_reports_does_not_fit(capsys):
    plan.main(["--config", "paper", "--nodes", "128", "--gpus-per-node", "8", "--layout", "deepspeed"])
    out = capsys.readouterr().out
    assert "DOES NOT FIT (short by" in out
    plan.main(["--config", "paper", "--nodes", "128", "--gpus-per-node", "8", "--gpu-memory", "80GB",
               "--layout", "deepspeed"])
    assert "of 80 GiB: fits" in capsys.readouterr().out


def test_table1_compression_rates():
    # 1 - 5r/(8d): one d x 4d weight, r (d + 4d) 16-bit values against 4 d^2 fp32 values
    assert plan.table1_compression(1920, 512) == pytest.approx(1 - 5 * 512 / (8 * 1920))
    for _, d, r, paper in plan.PAPER_TABLE1:
        assert abs(plan.table1_compression(d, r) - paper) < 0.006, (d, r)


def test_communication_by_hand():
    m = load_config("paper").model
    n = plan.param_count(m)
    c = plan.communication(m, 8, 128, 896)
    assert c["intra_node_bytes"] == pytest.approx(3 * 2 * n * 7 / 8)
    assert c["cross_node_exact_bytes"] == pytest.approx(4 * n / 8)
    assert c["cross_node_exact_wire_bytes"] == pytest.approx(2 * 127 / 128 * 4 * n / 8)
    assert 0.4 < c["compression_rate"] < 0.86  # row shards of 1/8 compress less than whole matrices
    # a (64, 32) weight over 2 ranks at rank 4: each shard is (32, 32) -> 4 (32 + 32) 2-byte values
    assert plan.shard_comm(plan.Matrix("w", 64, 32, 1, False), 2, 4, min_numel=1) == (512, 32 * 32 * 4)
    # a (3, 5) weight over 2 ranks, rank 1: shard 0 = row 0 + 3 elements, shard 1 = 2 elements + row 2;
    # P + Q of one row (1 x (1 + 5) x 2 = 12 B) do not beat its fp16 exact all-reduce (10 B): exact in 16 bit
    psgd, exact = plan.shard_comm(plan.Matrix("w", 3, 5, 1, False), 2, 1, min_numel=1)
    assert exact == 15 / 2 * 4 and psgd == ((10 + 3 * 4) + (10 + 2 * 4)) / 2
    assert plan.shard_comm(plan.Matrix("e", 64, 32, 1, True), 2, 4) == (32 * 32 * 4, 32 * 32 * 4)


def test_bad_arguments_name_the_flag():
    with pytest.raises(ConfigError, match="--node-size=3"):
        plan.main(["--config", "tiny", "--nodes", "2", "--gpus-per-node", "8", "--node-size", "3"])
    with pytest.raises(ConfigError, match="--gpu-memory='lots'"):
        plan.parse_size("lots")
    assert plan.parse_size("16GB") == 16 * plan.GiB and plan.parse_size("512MiB") == 512 * 1024**2
