"""A hierarchical run resumes on another number of nodes of the same size (#15 item 5): dalle_ds/train.py
on 2 fake nodes x 2 gloo ranks (PowerSGD across nodes), resumed from its step-2 checkpoint on 1 node
(2 ranks, exact averaging: the error buffers are dropped with a warning), then on 2 nodes again (the
buffers start from zero with a warning). The global batch holds (optim.global_batch_size), so the
resized legs read the samples the uninterrupted run reads: the first resumed loss is the
uninterrupted run's, the data positions after step 6 are the same, and the losses continue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multirank import free_port
from tests.test_train_prior import make_token_corpus

ROOT = Path(__file__).resolve().parent.parent


def _launch(run_dir: Path, data: Path, world: int, max_steps: int, log: str) -> list[subprocess.Popen]:
    port = str(free_port())
    args = [sys.executable, str(ROOT / "dalle_ds/train.py"), "--deepspeed_config",
            str(ROOT / "ds_configs/zero3_fp32_cpu.json"), "--config", "tiny", f"run.dir={run_dir}",
            f"data.token_shards={data}/shard-{{000000..000003}}.tar", f"data.tokenizer={data}/tokenizer.json",
            "data.bpe_dropout=0.1", "data.num_workers=0",
            "optim.micro_batch_size=2", "optim.global_batch_size=16",
            "optim.warmup_steps=2", f"optim.max_steps={max_steps}", "checkpoint.every_steps=2",
            "checkpoint.keep_last=3", "logging.every_steps=1", "logging.progress_bar=false",
            "logging.tensorboard=false",
            "logging.validate_every_steps=0", "logging.image_every_steps=1000",
            "powersgd.enabled=true", "powersgd.node_size=2", "powersgd.rank=4", "powersgd.min_compression_numel=1024"]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % 2),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
        out = open(run_dir.parent / f"{log}.rank{rank}.log", "w")
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def _run(run_dir: Path, data: Path, world: int, max_steps: int, log: str) -> str:
    procs = _launch(run_dir, data, world, max_steps, log)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=400))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    text = (run_dir.parent / f"{log}.rank0.log").read_text()
    if codes != [0] * world:
        logs = "\n".join((run_dir.parent / f"{log}.rank{r}.log").read_text()[-3000:] for r in range(world))
        pytest.fail(f"{log}: ranks exited {codes}:\n{logs}")
    return text


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _positions(checkpoint: Path) -> dict[int, object]:
    """Every virtual rank's loader position in a checkpoint (whichever rank held it)."""
    states = torch.load(checkpoint / "project" / "all_ranks.pt", weights_only=False)["data"]
    return {int(v): s for state in states for v, s in state["loaders"].items()}


def test_two_nodes_one_node_two_nodes(tmp_path):
    data = tmp_path / "tokens"
    make_token_corpus(data, shards=4, per_shard=16)
    # A: uninterrupted, 2 nodes x 2 ranks, 6 updates of 16 samples (96 > the corpus's 64: an epoch boundary)
    run_a = tmp_path / "a"
    _run(run_a, data, 4, 6, "a")
    a = _losses(run_a)
    assert sorted(a) == list(range(1, 7))
    # B: A's step-2 checkpoint resumed on 1 node (2 ranks, each reads 2 virtual ranks, accumulates 4)
    run_b = tmp_path / "b"
    (run_b / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_a / "checkpoints" / "step_00000002", run_b / "checkpoints" / "step_00000002")
    (run_b / "checkpoints" / "latest").write_text("step_00000002\n")
    log_b = _run(run_b, data, 2, 4, "b")
    assert "saved by 4 ranks (2 nodes of 2), resuming on 2 (1 node)" in log_b, log_b[-3000:]
    assert "WARNING the checkpoint's PowerSGD error buffers are dropped" in log_b, log_b[-3000:]
    # C: B's step-4 checkpoint resumed on 2 nodes again
    log_c = _run(run_b, data, 4, 6, "c")
    assert "WARNING the checkpoint has no error buffers" in log_c, log_c[-3000:]
    b = _losses(run_b)
    assert sorted(b) == [3, 4, 5, 6], b
    # same parameters and the same 16 samples: the first resumed update's loss is the uninterrupted one
    assert b[3] == pytest.approx(a[3], rel=1e-5), (a, b)
    for step in (4, 5, 6):  # then exact averaging on one node vs PowerSGD: close, not equal
        assert b[step] == pytest.approx(a[step], rel=0.05), (step, a, b)
    assert b[6] < a[1] - 0.3, (a, b)  # training went on (no restart)
    # exactly-once: after 6 updates every virtual rank is where the uninterrupted run's is
    assert _positions(run_b / "checkpoints" / "step_00000006") == _positions(run_a / "checkpoints" / "step_00000006")
    # one copy of the model state: node 0's two partitions only, in every checkpoint
    for run, tag in ((run_a, "step_00000006"), (run_b, "step_00000004"), (run_b, "step_00000006")):
        optim = sorted(p.name for p in (run / "checkpoints" / tag).glob("*optim_states.pt"))
        assert optim == [f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(2)], (tag, optim)
    # the export CLI reads such a checkpoint: node 0's partitions are the whole model
    out = tmp_path / "bundle"
    subprocess.run([sys.executable, "-m", "dalle_ds.export", str(run_b), str(out)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}, capture_output=True)
    from safetensors.torch import load_file

    from dalle_ds.config import ModelConfig
    from dalle_ds.models.prior import Prior
    from dalle_ds.parallel.checkpoint import consolidated_state_dict

    tensors = load_file(str(out / "model.safetensors"))
    reference = consolidated_state_dict(run_b / "checkpoints", "step_00000006")
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    model = Prior(ModelConfig(**json.loads((out / "config.json").read_text())))
    model.load_state_dict(tensors)  # strict: every parameter, the right shapes
