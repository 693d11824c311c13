"""Logs for clusters (dalle_ds/training/logger.py): a bar only on a terminal (or when forced), line
logs with elapsed and ETA otherwise, and W&B beside TensorBoard (offline here)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from dalle_ds.config import ConfigError, load_config
from dalle_ds.training.logger import MetricsLogger, format_duration, want_bar
from tests.test_trainer import parse_line


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bar_auto_means_a_terminal_only(monkeypatch):
    assert want_bar("auto", Stream(True)) and not want_bar("auto", Stream(False))
    assert want_bar(True, Stream(False)) and not want_bar(False, Stream(True))
    assert load_config("tiny").logging.progress_bar == "auto"
    assert load_config("tiny", ["logging.progress_bar=true"]).logging.progress_bar is True
    with pytest.raises(ConfigError, match="logging.progress_bar"):
        load_config("tiny", ["logging.progress_bar=sometimes"])
    monkeypatch.setattr(sys, "stderr", Stream(False))  # under SLURM: stderr is a file
    assert MetricsLogger(None, progress_bar="auto").progress_bar is False
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert MetricsLogger(None, progress_bar="auto").progress_bar is True


def test_line_logs_carry_elapsed_and_eta(capsys, monkeypatch):
    from dalle_ds.training import logger as logger_mod

    clock = iter([100.0, 130.0, 160.0])
    monkeypatch.setattr(logger_mod.time, "perf_counter", lambda: next(clock))
    log = MetricsLogger(None, progress_bar=False, echo_keys=["loss", "lr", "tokens_per_s", "mfu"])
    log.start_progress(total=1000, initial=400, desc="train")  # resumed at 400
    log.log(410, {"loss": 3.5, "lr": 1e-3, "tokens_per_s": 12000.0, "mfu": 0.41})
    log.log(420, {"loss": 3.4, "lr": 1e-3, "tokens_per_s": 12000.0, "mfu": 0.41})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "train step 410: loss=3.5 lr=0.001 tokens_per_s=12000 mfu=0.41 elapsed=0:00:30 eta=0:29:30"  # 3 s per step, 590 to go
    _, step, kv = parse_line(lines[1], timing=True)
    assert step == 420 and kv["elapsed"] == "0:01:00" and kv["eta"] == "0:29:00"
    assert format_duration(3725.2) == "1:02:05" and format_duration(2 * 86400 + 61) == "2d0:01:01"


def test_wandb_offline_beside_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (requirements-dev.txt pins it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("tiny", ["logging.wandb=true", "logging.wandb_project=dalle-test", "logging.wandb_name=try"])
    log = MetricsLogger.from_config(tmp_path, cfg.logging, run_config=cfg)
    assert log.wandb is not None and log.wandb.name == "try" and log.wandb.project == "dalle-test"
    assert log.wandb.config["optim"]["lr"] == cfg.optim.lr
    sent, real_log = [], log.wandb.log

    class Spy:  # what reaches wandb.Run.log (the offline file is binary)
        def __getattr__(self, name):
            return getattr(log_run, name)

        def log(self, data, step=None):
            sent.append((step, data))
            real_log(data, step=step)

    log_run, log.wandb = log.wandb, Spy()
    log.log(1, {"loss": 2.0, "memory_mb": [10.0, 12.0]})
    log.log(1, {"psnr": 30.0}, split="eval")
    log.close()
    assert sent == [(1, {"train/loss": 2.0, "train/memory_mb/rank0": 10.0, "train/memory_mb/rank1": 12.0}),
                    (1, {"eval/psnr": 30.0})]
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run file
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0 and (tmp_path / "tb").is_dir()


def test_wandb_enabled_but_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = load_config("tiny", ["logging.wandb=true"])
    with pytest.raises(ConfigError, match=r"logging.wandb=true: the wandb package is not installed"):
        MetricsLogger.from_config(tmp_path, cfg.logging, run_config=cfg)
