"""One CLI style (dalle_ds/cli_args.py) and fail-fast inputs (dalle_ds/training/preflight.py) on the real
entry points: underscore spellings, overrides anywhere, --print-config, --help keys, packaged
defaults, --dry-run, one error line from rank 0 with exit code 2, optim.global_batch_size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dalle_ds import cli_args
from dalle_ds.config import ConfigError, OptimConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=300)


def test_underscore_spellings_and_overrides_anywhere():
    from dalle_ds import train, train_dvae

    a = train_dvae.parse_args(["optim.lr=1e-3", "--eval_shards", "X", "--config", "tiny", "run.dir=r",
                               "--deepspeed_config=dvae.json", "--local_rank=1", "--eval-images", "8"])
    assert (a.eval_shards, a.deepspeed_config, a.local_rank, a.eval_images) == ("X", "dvae.json", 1, 8)
    assert a.overrides == ["optim.lr=1e-3", "run.dir=r"]
    b = train.parse_args(["--deepspeed-config", "x.json", "optim.lr=2e-3", "--config", "paper"])
    assert (b.config, b.overrides) == ("paper", ["optim.lr=2e-3"])
    with pytest.raises(SystemExit) as e:  # a stray word is a usage error, not an override
        train.parse_args(["--config", "tiny", "oops"])
    assert e.value.code == 2


def test_print_config_is_the_resolved_yaml(capsys, tmp_path, monkeypatch):
    from dalle_ds import train

    monkeypatch.chdir(tmp_path)  # presets come from the package, not the working directory
    with pytest.raises(SystemExit) as done:  # like --help: print, exit 0
        train.main(["optim.lr=1e-3", "--config", "tiny", "--print-config", "logging.wandb=true"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config("tiny", ["optim.lr=1e-3", "logging.wandb=true"]).to_dict()
    assert printed["optim"]["lr"] == 1e-3 and printed["data"]["token_shards"] == ""


def test_help_lists_every_config_key_with_its_default(capsys):
    from dalle_ds import train_dvae

    with pytest.raises(SystemExit) as e:
        train_dvae.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ("optim.global_batch_size=0", "logging.progress_bar=auto", "dvae_train.betas=[0.9, 0.999]",
                 "powersgd.comm_dtype=float16", "data.token_shards=''", "--deepspeed-config", "--print-config"):
        assert line in out, line
    assert "  optim: Prior optimisation" in out


def test_deepspeed_config_falls_back_to_the_packaged_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_args.resolve_ds_config("dvae.json") == str(cli_args.DS_CONFIG_DIR / "dvae.json")
    assert cli_args.resolve_ds_config("ds_configs/zero3_bf16.json").endswith("dalle_ds/ds_configs/zero3_bf16.json")
    (tmp_path / "dvae.json").write_text("{}")
    assert cli_args.resolve_ds_config("dvae.json") == "dvae.json"  # an existing path wins
    with pytest.raises(ConfigError, match="--deepspeed-config='nope.json': no such file"):
        cli_args.resolve_ds_config("nope.json")


def test_presets_name_no_data():
    for preset in ("tiny", "paper"):
        d = load_config(preset).data
        assert (d.image_shards, d.token_shards, d.tokenizer) == ("", "", "")


def test_global_batch_size_derives_accumulation_from_the_ranks():
    o = OptimConfig(micro_batch_size=2, global_batch_size=64)
    assert o.for_world(4).grad_accum_steps == 8
    assert o.for_world(32).grad_accum_steps == 1
    assert o.for_world(4).for_world(4).grad_accum_steps == 8  # idempotent
    assert OptimConfig(micro_batch_size=2, grad_accum_steps=3).for_world(4).grad_accum_steps == 3  # unset: as given
    with pytest.raises(ConfigError, match=r"optim.global_batch_size=64: must be a multiple of "
                                          r"optim.micro_batch_size x ranks = 2 x 3 = 6"):
        o.for_world(3)
    with pytest.raises(ConfigError, match="optim.grad_accum_steps=2: conflicts"):
        OptimConfig(micro_batch_size=2, grad_accum_steps=2, global_batch_size=64).for_world(4)


def test_missing_shard_folder_one_line_from_rank_0_exit_2_on_two_ranks(tmp_path):
    """A real 2-rank launch (the env torchrun/srun give): both ranks stop before any process group or
    engine, exit 2, and only rank 0 says why, in one line naming the key and the path."""
    missing = tmp_path / "no_such_shards"
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # nothing listens there: a rendezvous would hang
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "dalle_ds/train_dvae.py"), "--config", "tiny",
                                       f"data.image_shards={missing}", "--deepspeed_config", "dvae.json"],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    (err0,) = outs[0][1].splitlines()
    assert err0 == f"error: data.image_shards='{missing}': no such file or folder", outs[0]
    assert outs[1][1] == "" and "Traceback" not in outs[0][1]


def test_debug_shows_the_traceback(tmp_path):
    res = _run([str(ROOT / "dalle_ds/train_dvae.py"), "--config", "tiny", "--debug"], tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr
    assert "ConfigError: data.image_shards: not set; a run names its data" in res.stderr


@pytest.fixture(scope="module")
def token_corpus(tmp_path_factory) -> Path:
    from tests.test_train_prior import make_token_corpus

    folder = tmp_path_factory.mktemp("tokens")
    make_token_corpus(folder, shards=2, per_shard=8)
    return folder


def test_dry_run_checks_inputs_prints_the_plan_and_exits(token_corpus, tmp_path):
    base = [str(ROOT / "dalle_ds/train.py"), "--config", "tiny", "--dry-run", f"run.dir={tmp_path / 'run'}",
            "--deepspeed_config", "zero3_fp32_cpu.json", "optim.global_batch_size=16"]
    res = _run([*base, f"data.token_shards={token_corpus}", f"data.tokenizer={token_corpus}/tokenizer.json"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "train --dry-run: config tiny valid" in res.stdout and "'token_shards': 2, 'samples': 16" in res.stdout
    assert "global batch 8 x 2 x 1 = 16" in res.stdout and "per-rank memory" in res.stdout, res.stdout
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    res = _run([*base, f"data.token_shards={token_corpus}", f"data.tokenizer={tmp_path}/missing.json"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: data.tokenizer='{tmp_path}/missing.json': no such file (tokenizer.json " \
                                 "from data_prep/train_text_tokenizer.py)"
    res = _run([*base, f"data.token_shards={token_corpus}", f"data.tokenizer={token_corpus}/tokenizer.json",
                "model.image_grid=8", "data.image_size=32"], tmp_path)  # tokens made for another grid
    assert res.returncode == 2 and res.stderr.startswith(f"error: data.token_shards='{token_corpus}': ") \
        and "grid_size=16" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr


def test_entry_points_share_the_parser():
    """Every command a user runs is built on cli_args (no hand-rolled argparse.ArgumentParser)."""
    from dalle_ds.cli import COMMANDS

    offenders = []
    for module in COMMANDS.values():
        path = ROOT / (module.replace(".", "/") + ".py")
        text = path.read_text()
        if "argparse.ArgumentParser(" in text or "Parser(" not in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders in ([], ["dalle_ds/evaluate_captions.py"]), offenders
