"""The trainer skeleton (dalle_ds/training/{logger,loop,flops}.py), in one process without DeepSpeed:
the logger's line, files and TensorBoard tags; the CLIP trainer writes the same line as the others;
a signal -> checkpoint -> REQUEUE -> exit 75, then a resume to COMPLETED (in-process and as a real
process signalled from outside); MFU denominators from recorded peaks; the library imports nothing
from bench/."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dalle_ds.parallel.checkpoint import EXIT_CHECKPOINTED, Checkpointer, read_latest
from dalle_ds.training.logger import MetricsLogger, format_line
from dalle_ds.training.loop import EXIT_COMPLETED, TrainLoop

ROOT = Path(__file__).resolve().parents[1]
# The one stdout line every trainer writes: "<split> step <n>: k=v k=v ..."
LINE_RE = re.compile(r"^(train|eval) step (\d+): ((?:[\w/]+=\S+)(?: [\w/]+=\S+)*)$")


def parse_line(line: str, timing: bool = False) -> tuple[str, int, dict[str, str]] | None:
    """(split, step, the metric key-values); ``timing``: keep the logger's elapsed= / eta= suffix too."""
    m = LINE_RE.match(line.strip())
    if not m:
        return None
    kv = dict(kv.split("=", 1) for kv in m.group(3).split())
    return m.group(1), int(m.group(2)), kv if timing else {k: v for k, v in kv.items() if k not in TIMING_KEYS}


TIMING_KEYS = ("elapsed", "eta")


def test_format_line_is_split_step_then_key_values():
    values = {"loss": 3.14159, "memory_mb": [512.0, 600.25], "applied": True, "lr": 3e-4,
              "tokens_per_s": 12500.4, "grad_norm": float("nan"), "text": "skipped"}
    keys = ["loss", "lr", "tokens_per_s", "memory_mb", "absent", "applied", "grad_norm"]
    line = format_line("train", 7, values, keys)
    assert line == "train step 7: loss=3.142 lr=0.0003 tokens_per_s=12500 memory_mb=600.2 applied=True grad_norm=nan"
    assert parse_line(line) == ("train", 7, {"loss": "3.142", "lr": "0.0003", "tokens_per_s": "12500",
                                             "memory_mb": "600.2", "applied": "True", "grad_norm": "nan"})
    assert format_line("eval", 2, {"psnr": 31.0}) == "eval step 2: psnr=31"


def test_logger_writes_jsonl_per_split_and_prefixed_tensorboard_tags(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, tensorboard=True, echo_keys=["loss", "lr"])
    log.log(1, {"loss": 2.5, "lr": 1e-3, "applied": True}, echo=False)
    log.log(2, {"loss": 2.0, "lr": 1e-3, "memory_mb": [10.0, 12.0], "powersgd/rank": 4})
    log.log(2, {"psnr": 30.5, "images": 48}, split="eval")
    with pytest.raises(ValueError, match="split='test'"):
        log.log(3, {"loss": 1.0}, split="test")
    log.close()

    out = capsys.readouterr().out.splitlines()
    assert out == ["train step 2: loss=2 lr=0.001", "eval step 2: psnr=30.5 images=48"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "lr": 1e-3, "applied": True},
                    {"step": 2, "loss": 2.0, "lr": 1e-3, "memory_mb": [10.0, 12.0], "powersgd/rank": 4}]
    assert [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [
        {"step": 2, "psnr": 30.5, "images": 48}]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "train/lr", "train/applied", "train/memory_mb/rank0", "train/memory_mb/rank1",
                    "train/powersgd/rank", "eval/psnr", "eval/images"}, tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]


def test_prior_dvae_and_clip_trainers_log_the_same_line(tmp_path, capsys):
    """The dVAE and prior pick their line's keys (loss first) from their metrics.jsonl names; the
    CLIP trainer, run here on a stand-in model, writes the same kind of line and row."""
    from dalle_ds import train, train_clip, train_dvae

    for keys in (train.ECHO_KEYS, train_dvae.ECHO_KEYS):
        assert keys[0] == "loss" and len(set(keys)) == len(keys)
        line = format_line("train", 10, {k: 1.5 for k in keys}, keys)
        assert parse_line(line) == ("train", 10, {k: "1.5" for k in keys})

    class Out:
        def __init__(self, loss):
            self.loss = loss

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, pixel_values, return_loss, input_ids):
            return Out(((pixel_values.mean((2, 3)) * self.w).sum(1) - input_ids.float().mean(1)).pow(2).mean())

    class Processor:
        def images(self, x):
            return x

        def text(self, captions):
            return {"input_ids": torch.tensor([[len(c)] for c in captions])}

    batch = {"images": torch.rand(4, 3, 2, 2), "captions": ["a", "bb", "ccc", "dddd"]}
    log = MetricsLogger(tmp_path, tensorboard=False)
    losses = train_clip.train(Model(), Processor(), iter(lambda: batch, None), steps=7, lr=0.1, log=log, log_every=3)
    assert len(losses) == 7
    lines = [parse_line(x) for x in capsys.readouterr().out.splitlines()]
    expected = [("train", n, ["images_per_s", "loss", "lr"]) for n in (3, 6, 7)]
    assert [(s, n, sorted(kv)) for s, n, kv in lines] == expected
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert rows[0]["loss"] == pytest.approx(sum(losses[:3]) / 3) and rows[2]["loss"] == pytest.approx(losses[6])


class FakeDeepSpeed:
    """What Checkpointer needs of a DeepSpeed engine: save/load a tag folder."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "model.txt").write_text(json.dumps(client_state))

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        return str(Path(root) / tag), json.loads((Path(root) / tag / "model.txt").read_text())


class FakeEngine:
    ds = FakeDeepSpeed()


class Counter:
    """A stateful object the checkpoint carries (stands for the data position)."""

    def __init__(self):
        self.seen = 0

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


@pytest.fixture
def restore_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _loop(run: Path, max_steps: int, counter: Counter, saves: list[int]) -> TrainLoop:
    ckpt = Checkpointer(FakeEngine(), run / "checkpoints", every_steps=4, keep_last=2)
    ckpt.register_stateful("data", counter)
    loop = TrainLoop(max_steps, MetricsLogger(run, tensorboard=False), ckpt=ckpt, run_dir=run)
    loop.on_save(saves.append)
    return loop


def test_signal_checkpoints_writes_requeue_and_exits_75_then_resumes_to_completed(tmp_path, restore_signal_handlers):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "COMPLETED").write_text("99\n")  # left by an earlier run: cleared at start
    counter, saves, steps = Counter(), [], []
    loop = _loop(run, 20, counter, saves)
    assert loop.resume() is None and loop.step == 0 and not (run / "COMPLETED").exists()
    for step in loop:
        steps.append(step)
        counter.seen += 1
        if step == 6:
            os.kill(os.getpid(), signal.SIGUSR1)  # acted on at this step's boundary
    assert steps == [1, 2, 3, 4, 5, 6] and loop.step == 6
    assert loop.exit_code == EXIT_CHECKPOINTED == 75
    assert saves == [4, 6]
    assert (run / "REQUEUE").read_text() == "6\n" and not (run / "COMPLETED").exists()
    assert read_latest(run / "checkpoints") == "step_00000006"

    counter2, saves2, steps2 = Counter(), [], []
    loop2 = _loop(run, 10, counter2, saves2)
    assert loop2.resume()["step"] == 6 and loop2.step == 6 and counter2.seen == 6
    assert not (run / "REQUEUE").exists()
    for step in loop2:
        steps2.append(step)
        counter2.seen += 1
    assert steps2 == [7, 8, 9, 10] and loop2.exit_code == EXIT_COMPLETED == 0
    assert saves2 == [8, 10]  # cadence, then the last step
    assert (run / "COMPLETED").read_text() == "10\n" and not (run / "REQUEUE").exists()
    assert read_latest(run / "checkpoints") == "step_00000010"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000008", "step_00000010"]  # keep_last=2


def test_loop_without_checkpointer_counts_and_times():
    loop = TrainLoop(3, MetricsLogger(None, tensorboard=False))
    seen = []
    for step in loop:
        seen.append(step)
        time.sleep(0.01)
    steps, seconds = loop.timer.window()
    assert seen == [1, 2, 3] and loop.exit_code == EXIT_COMPLETED and loop.step == 3
    assert steps == 3 and seconds >= 0.03
    with pytest.raises(ValueError, match="run_dir"):
        TrainLoop(3, MetricsLogger(None), ckpt=object())


SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from dalle_ds.parallel.checkpoint import Checkpointer
from dalle_ds.training.logger import MetricsLogger
from dalle_ds.training.loop import TrainLoop
from tests.test_trainer import FakeEngine

def main():
    run = Path({run!r})
    log = MetricsLogger(run, tensorboard=False, echo_keys=["loss"])
    loop = TrainLoop(100000, log, ckpt=Checkpointer(FakeEngine(), run / "checkpoints", 1000, 2), run_dir=run)
    loop.resume()
    for step in loop:
        time.sleep(0.02)
        log.log(step, {{"loss": 1.0 / step}})
    return loop.exit_code

sys.exit(main())
"""


def test_sigterm_to_a_trainer_process_exits_75_with_requeue_marker(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT.format(root=str(ROOT), run=str(run)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    stopped = int((run / "REQUEUE").read_text())
    assert stopped >= 3 and not (run / "COMPLETED").exists()
    assert read_latest(run / "checkpoints") == f"step_{stopped:08d}"
    rows = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, stopped + 1))
    lines = [parse_line(x) for x in out.splitlines() if x.startswith("train step")]
    assert lines and all(p is not None and p[2].keys() == {"loss"} for p in lines), out
    assert f"signal {int(signal.SIGTERM)} received, saving at step {stopped}" in out


def test_mfu_denominator_is_the_peak_of_the_machine_at_hand(tmp_path, monkeypatch):
    from dalle_ds.training import flops

    real_probe = flops.probe_matmul

    def record(name, figures, cpu="Intel(R) Xeon(R) Processor"):
        rows = [{"metric": k, "value": v} for k, v in figures.items()]
        (tmp_path / name).write_text(json.dumps({"machine": {"cpu": cpu}, "figures": rows}))

    record("matmul_peak-cpu-abc-20260101.json", {"fp32_gflops": 50.0})
    record("matmul_peak-cpu-abc-20260201.json", {"fp32_gflops": 100.0, "bf16_gflops": 20.0})  # the newest
    record("matmul_peak-cpu-epy-20260301.json", {"fp32_gflops": 170.0}, cpu="AMD EPYC 7B13")  # another CPU model
    record("matmul_peak-gpu-def-20260101.json", {"fp32_gflops": 100.0, "cuda_fp32_gflops": 5000.0,
                                                 "cuda_bf16_gflops": 9000.0})
    xeon, epyc = "Intel(R) Xeon(R) Processor", "AMD EPYC 7B13"
    # CPU: the figure recorded for this CPU model, never one from another machine
    assert flops.peak_flops("fp32", cuda=False, results_dir=tmp_path, cpu=xeon) == 100e9
    assert flops.peak_flops("fp32", cuda=False, results_dir=tmp_path, cpu=epyc) == 170e9
    assert flops.peak_flops("fp32", cuda=False, results_dir=tmp_path, cpu="AMD EPYC 9654") is None
    assert flops.mfu_denominator("fp32", 4, 2, cuda=False, results_dir=tmp_path, cpu=xeon) == 2 * 100e9  # 2 nodes
    # an unrecorded CPU model: probed at start (every rank's probe, here one process standing for 4 ranks)
    monkeypatch.setattr(flops, "probe_matmul", lambda dtype, seconds=1.0: {"fp32": 7e9, "fp16": 3e9}[dtype])
    assert flops.mfu_denominator("fp32", 4, 2, cuda=False, results_dir=tmp_path, cpu="AMD EPYC 9654") == 4 * 7e9
    assert flops.mfu_denominator("fp16_block", 1, 1, cuda=False, results_dir=tmp_path, cpu=xeon) == 3e9
    assert flops.mfu_denominator("fp32", 1, 1, cuda=False, results_dir=tmp_path, cpu="?", probe=False) is None
    # GPU: the datasheet peak for the dtype by device name, one per rank
    assert flops.mfu_denominator("fp16_block", 8, 8, cuda=True, device_name="Tesla V100-SXM2-16GB") == 8 * 125e12
    assert flops.peak_flops("fp32", cuda=True, device_name="Tesla V100-SXM2-32GB") == 15.7e12
    assert flops.peak_flops("bf16", cuda=True, device_name="NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("bf16", cuda=True, device_name="NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("bf16", cuda=True, device_name="NVIDIA H200") == 989e12
    assert flops.peak_flops("bf16", cuda=True, device_name="NVIDIA H100 PCIe") == 756e12
    # a GPU not in the table: the recorded GPU figure; V100 has no bf16: none in the table either
    assert flops.peak_flops("fp32", cuda=True, results_dir=tmp_path, device_name="Radeon X") == 5000e9
    assert flops.mfu_denominator("bf16", 4, 2, cuda=True, results_dir=tmp_path, device_name="Radeon X") == 4 * 9000e9
    assert flops.peak_flops("bf16", cuda=True, results_dir=tmp_path / "none", device_name="Tesla V100") is None
    with pytest.raises(ValueError, match="dtype='int8'"):
        flops.peak_flops("int8", results_dir=tmp_path)
    rate = real_probe("fp32", seconds=0.05, n=128)  # the real probe: a positive rate, quickly
    assert 1e6 < rate < 1e15
    meter = flops.Throughput(tokens_per_step=1000, flops_per_token=2e6, peak_total=4e9)
    assert meter.rates(steps=4, seconds=2.0) == {"tokens_per_s": 2000.0, "flops_per_s": 4e9, "step_time_s": 0.5,
                                                 "mfu": 1.0}
    assert "mfu" not in flops.Throughput(1000, 2e6, None).rates(4, 2.0)


def test_bench_uses_the_library_flop_helpers_and_the_library_imports_nothing_from_bench():
    from bench import harness
    from dalle_ds.training import flops

    assert harness.latest is flops.latest and harness.figure is flops.figure
    offenders = []
    for path in sorted((ROOT / "dalle_ds").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "bench" or n.startswith("bench.")]
    assert offenders == []

