"""dalle_ds/train.py end to end on 2 ranks (processes launched like srun/torchrun would, gloo, CPU):
the tiny preset's loss falls on real token shards; a run stopped at step s and resumed reaches 2s
with exactly the losses of an uninterrupted run; SIGTERM to one rank -> every rank checkpoints,
writes REQUEUE and exits 75, then resumes to COMPLETED; the log line, metrics.jsonl and the
TensorBoard tags follow the trainer skeleton's convention; the exported model loads."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.multirank import free_port
from tests.test_trainer import parse_line

ROOT = Path(__file__).resolve().parent.parent
GRID, CODEBOOK, TEXT_LEN, TEXT_VOCAB = 16, 512, 32, 512
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_token_corpus(folder: Path, shards: int = 4, per_shard: int = 32) -> None:
    """Token shards whose codes depend on the caption (a colour picks the code range, a shape the
    pattern), a manifest, and a byte-level BPE tokenizer trained on the captions."""
    from data_prep.train_text_tokenizer import build, pad_vocab

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    captions, listed = [], []
    for s in range(shards):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(per_shard):
                c, k = rng.integers(len(COLORS)), rng.integers(len(SHAPES))
                caption = f"a {COLORS[c]} {SHAPES[k]} on a plain background"
                yy, xx = np.mgrid[:GRID, :GRID]
                pattern = [(yy + xx) % 4, yy % 4, xx % 4, (yy * xx) % 4][k]
                codes = (16 * c + pattern + rng.integers(0, 2, (GRID, GRID))).astype("<u2")
                key = f"s{s:02d}_{i:04d}"
                _add(tar, f"{key}.codes", codes.tobytes())
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"source": "synthetic"}).encode())
                captions.append(caption)
        listed.append({"name": name, "samples": per_shard})
    (folder / "manifest.json").write_text(json.dumps(
        {"shards": listed, "grid_size": GRID, "codebook_size": CODEBOOK, "dvae_hash": "synthetic"}))
    tok, trainer = build(TEXT_VOCAB, min_frequency=1)
    tok.train_from_iterator(captions, trainer)
    tok, _ = pad_vocab(tok, TEXT_VOCAB)
    tok.save(str(folder / "tokenizer.json"))


def _launch(run_dir: Path, data: Path, max_steps: int, log_name: str, every: int = 5) -> list[subprocess.Popen]:
    """Two ranks started the way srun/torchrun start them (env vars), gloo on CPU."""
    port = str(free_port())
    args = [sys.executable, str(ROOT / "dalle_ds/train.py"), "--deepspeed_config",
            str(ROOT / "ds_configs/zero3_fp32_cpu.json"), "--config", "tiny",
            f"run.dir={run_dir}", f"data.token_shards={data}/shard-{{000000..000003}}.tar",
            f"data.tokenizer={data}/tokenizer.json", "data.bpe_dropout=0.1", "data.num_workers=1",
            "optim.micro_batch_size=4", "optim.warmup_steps=3", f"optim.max_steps={max_steps}",
            f"checkpoint.every_steps={every}", "checkpoint.keep_last=2", "logging.every_steps=5",
            "logging.progress_bar=false", f"logging.tensorboard={str(log_name == 'a').lower()}"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
        log = open(run_dir.parent / f"{log_name}.rank{rank}.log", "w")
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def _wait(procs: list[subprocess.Popen], run_dir: Path, log_name: str, timeout: float = 150) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(c not in (0, 75) for c in codes):
        logs = "\n".join((run_dir.parent / f"{log_name}.rank{r}.log").read_text()[-3000:] for r in range(2))
        pytest.fail(f"ranks exited {codes}:\n{logs}")
    return codes


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _check_logs(run_dir: Path, rank0_log: Path) -> None:
    """stdout: `train step N: loss=...` on logging steps; metrics.jsonl: a row per update, throughput
    and per-rank memory on logging steps; TensorBoard: `train/...` tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dalle_ds.train import ECHO_KEYS

    lines = [p for p in map(parse_line, rank0_log.read_text().splitlines()) if p]
    assert [(split, step) for split, step, _ in lines] == [("train", 5), ("train", 10)], rank0_log.read_text()[-3000:]
    for _, _, kv in lines:
        assert list(kv) == [k for k in ECHO_KEYS if k in kv] and {"loss", "tokens_per_s", "memory_mb"} <= kv.keys()
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert {"loss", "text_loss", "image_loss", "lr", "grad_norm", "applied"} <= rows[1].keys()
    assert "tokens_per_s" not in rows[4] and len(rows[5]["memory_mb"]) == 2 and rows[10]["tokens_per_s"] > 0
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/image_loss", "train/tokens_per_s", "train/memory_mb/rank1"} <= tags, tags
    assert all(t.startswith("train/") for t in tags), tags


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    make_token_corpus(folder)
    return folder


def test_tiny_prior_trains_resumes_exactly_and_stops_on_sigterm(corpus, tmp_path):
    from dalle_ds.parallel.checkpoint import export, load_export, read_latest
    from dalle_ds.config import ModelConfig
    from dalle_ds.models.prior import Prior

    # A: uninterrupted reference run of 10 updates
    run_a = tmp_path / "a"
    assert _wait(_launch(run_a, corpus, 10, "a"), run_a, "a") == [0, 0]
    a = _losses(run_a)
    assert sorted(a) == list(range(1, 11))
    assert a[10] < a[1] - 0.8, a  # the loss falls (from ~ln 512 = 6.2)
    assert (run_a / "ds_config.json").is_file() and (run_a / "config.yaml").is_file()
    assert read_latest(run_a / "checkpoints") == "step_00000010"
    assert (run_a / "COMPLETED").read_text() == "10\n" and not (run_a / "REQUEUE").exists()
    _check_logs(run_a, tmp_path / "a.rank0.log")

    # C: SIGTERM to rank 1 only, once step 2 is logged: both ranks checkpoint and exit 75
    run_c = tmp_path / "c"
    procs = _launch(run_c, corpus, 1000, "c", every=1000)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_c / "metrics.jsonl").is_file() or len(_losses(run_c)) < 2:
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait(procs, run_c, "c") == [75, 75]
    s = max(_losses(run_c))
    assert read_latest(run_c / "checkpoints") == f"step_{s:08d}"
    assert 2 <= s < 10, s
    assert (run_c / "REQUEUE").read_text() == f"{s}\n" and not (run_c / "COMPLETED").exists()

    # resume C to step 2s: the same losses as the uninterrupted run, to the last bit (fp32)
    assert _wait(_launch(run_c, corpus, 2 * s, "c2"), run_c, "c2") == [0, 0]
    c = _losses(run_c)
    assert sorted(c) == list(range(1, 2 * s + 1))
    assert (run_c / "COMPLETED").read_text() == f"{2 * s}\n" and not (run_c / "REQUEUE").exists()
    for step in range(1, min(2 * s, 10) + 1):
        assert c[step] == a[step], (step, c[step], a[step])

    # export A's last checkpoint: loads strictly into a Prior built from the exported config
    model_cfg = yaml.safe_load((run_a / "config.yaml").read_text())["model"]  # the resolved YAML
    out = export(run_a / "checkpoints", tmp_path / "export", model_cfg)
    tensors, config = load_export(out)
    model = Prior(ModelConfig(**config))
    model.load_state_dict(tensors)
    assert Prior.num_params(model.cfg) == sum(t.numel() for t in tensors.values())
