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


def _state(m, ds_name, nodes=128, gpus=8):
    cfg = load_config("paper")
    r = plan.regime_of(cfg, plan._load_json(plan._ds_config_path(ds_name)), nodes, gpus)
    return r, plan.model_state_bytes(plan.param_infos(cfg.model), r, 0)


def test_paper_regimes_by_hand():
    """Model state per GPU of what train.py runs (node size 8), against hand counts: N params, X of them
    in the fp32 set (gains, biases, embeddings, heads), every partition ceil(numel / 8)."""
    m = load_config("paper").model
    infos = plan.param_infos(m)
    n = sum(x.numel for x in infos)
    parts = sum(-(-x.numel // 8) for x in infos)
    x32 = sum(-(-x.numel // 8) for x in infos if x.fp32set)
    assert n == plan.param_count(m) and parts - n / 8 < 8 * len(infos)
    r, st = _state(m, "zero3_fp16_v100_16bit.json")
    assert (r.mode, r.optimizer, r.storage, r.master, r.grad) == ("fp16_block16", "AdamW16", 2, 0, 2)
    assert st["params"] == st["grads"] == 2 * parts and st["master"] == 0
    assert st["optimizer"] == 4 * (parts - x32) + 12 * x32  # bf16 m, v; fp32 master + m + v for the fp32 set
    assert st["params"] + st["grads"] + st["optimizer"] == pytest.approx(12.50e9, rel=0.01)
    # PowerSGD (128 nodes): fp32 error buffers of the compressed row blocks (qkv 1488 and fc 1984 rows of
    # 3968 per GPU; attn.proj and mlp.proj shards are cheaper in fp16 exact), one fixed Q of 3968 x 896;
    # the paper preset keeps the buffers in host memory (powersgd.error_buffer_device=host)
    assert st["errors_host"] == 64 * (1488 + 1984) * D * 4 and st["q"] == D * 896 * 4 and st["errors"] == 0
    cfg_gpu = load_config("paper", ["powersgd.error_buffer_device=gpu"])
    r_gpu = plan.regime_of(cfg_gpu, plan._load_json(plan._ds_config_path("zero3_fp16_v100_16bit.json")), 128, 8)
    st_gpu = plan.model_state_bytes(infos, r_gpu, 0)
    assert st_gpu["errors"] == st["errors_host"] and st_gpu["errors_host"] == 0
    # the GPU's working block for host buffers: the largest compressed block, fc's 1984 x 3968 fp32
    assert plan.buffer_bytes(m, r)["PowerSGD fp32 working block (largest)"] == 1984 * D * 4
    r, st = _state(m, "zero3_fp16_v100.json")  # fp32 master: DeepSpeed in fp32, torch AdamW, 16 B/param
    assert (r.mode, r.optimizer, r.storage, r.master, r.grad) == ("fp16_block", "AdamW", 4, 0, 4)
    assert st["params"] + st["grads"] + st["optimizer"] == 16 * parts
    r, st = _state(m, "zero3_fp16_v100_16bit.json", nodes=1)  # one node: nothing crosses, no error buffers
    assert r.powersgd is None and st["errors"] == st["q"] == 0


PAPER_ON_V100 = ["--config", "paper", "--nodes", "128", "--gpus-per-node", "8", "--gpu-memory", "16GB"]


def _gpu_total(out: str) -> float:
    return float(out.split("total on the GPU")[1].split("GB")[0])


def test_paper_on_v100_16gb_fits_with_host_error_buffers(capsys):
    """The layout the paper preset runs (16-bit regime, PowerSGD error buffers in pinned host memory)
    fits a 16 GB V100; the error buffers are reported as host memory, outside the GPU's total."""
    for argv in (PAPER_ON_V100, PAPER_ON_V100 + ["--ds-config", "zero3_fp16_v100_16bit.json"]):
        assert plan.main(argv) == 0
        out = capsys.readouterr().out
        assert "mode fp16_block16, AdamW16" in out and "attention sparse" in out
        assert "GB of 17.18 GB: FITS" in out
        assert "PowerSGD error buffers (fp32, GPU)                             0.000 GB" in out
        assert "PowerSGD error buffers (fp32, pinned host) 3.527 GB; 28.2 GB per node" in out
        assert 14.9 < _gpu_total(out) < 15.1


def test_paper_does_not_fit_with_less_memory_or_gpu_error_buffers(capsys):
    plan.main(PAPER_ON_V100[:-1] + ["15GB"])  # 15 GiB: the same 15.0 GB no longer fit
    assert "GB of 16.11 GB: DOES NOT FIT (short by" in capsys.readouterr().out
    plan.main(PAPER_ON_V100 + ["powersgd.error_buffer_device=gpu"])  # the buffers back on the GPU: +3.53 GB
    out = capsys.readouterr().out
    assert "DOES NOT FIT (short by 3.35 GB)" in out and 18.5 < _gpu_total(out) < 18.6
    assert "PowerSGD error buffers (fp32, GPU)                             3.527 GB" in out
    # one node (no PowerSGD): the same regime fits with the buffers' placement moot
    plan.main(PAPER_ON_V100[:2] + ["--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "16GB"])
    assert ": FITS" in capsys.readouterr().out


def test_fp32_master_regime_needs_room(capsys):
    plan.main(["--config", "paper", "--ds-config", "zero3_fp16_v100.json", "--nodes", "128", "--gpus-per-node", "8"])
    assert "DOES NOT FIT (short by" in capsys.readouterr().out
    plan.main(["--config", "paper", "--ds-config", "zero3_fp16_v100.json", "--nodes", "128", "--gpus-per-node", "8",
               "--gpu-memory", "80GB"])
    assert ": FITS" in capsys.readouterr().out


def test_activations_by_hand():
    cfg = load_config("paper")
    r = plan.regime_of(cfg, plan._load_json(plan._ds_config_path("zero3_fp16_v100_16bit.json")), 128, 8)
    acts = plan.activation_bytes(cfg.model, r)
    assert acts["residual checkpoints (per layer)"] == 64 * 1280 * D * 2  # one per layer, bf16 residual stream
    assert acts["heads' fp32 weight copies"] == (16384 + 8192) * D * 4


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
