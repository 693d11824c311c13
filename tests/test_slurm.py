"""slurm/lib.sh and slurm/train_prior.sh as real sbatch jobs on a local 2-node SLURM cluster.

Three jobs: the tiny prior on 2 nodes x 2 tasks with PowerSGD across the (fake) nodes runs to
COMPLETED; a preempted run (``scancel -s USR1``) checkpoints, requeues itself and finishes with no
lost step; a job whose rank 1 raises ends FAILED at once with that rank's traceback in the log.

Without a cluster (run everywhere): every script refuses to start without its inputs (exit 2, one
line naming the variable), and with stand-in ``srun``/``scontrol``/``module`` commands the scripts'
command lines show the global-batch arithmetic, the module hook and the container prefix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401 - fixture
from tests.test_train_prior import make_token_corpus

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
NODES = ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1")
FAST = ("data.dvae= data.num_workers=0 data.bpe_dropout=0.0 logging.progress_bar=false logging.tensorboard=false "
        "optim.micro_batch_size=2 optim.warmup_steps=2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokens")
    make_token_corpus(folder, shards=4, per_shard=16)
    return folder


def _submit_prior(cluster, corpus: Path, run_dir: Path, log: Path, extra: str, *sbatch_args: str,
                  **more_env: str) -> str:
    env = more_env | {"CONFIG": "tiny", "DS_CONFIG": "ds_configs/zero3_fp32_cpu.json", "RUN_DIR": str(run_dir),
           "TOKEN_SHARDS": f"{corpus}/shard-{{000000..000003}}.tar", "TOKENIZER": str(corpus / "tokenizer.json"),
           "PYTHON": PYTHON, "DALLE_DS_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "EXTRA_ARGS": f"{FAST} {extra}"}
    return cluster.sbatch(*NODES, *sbatch_args, "--output", str(log), str(ROOT / "slurm" / "train_prior.sh"),
                          env=env, cwd=str(ROOT))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _show(cluster, job: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", job, check=False).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def test_prior_two_nodes_powersgd_completes(slurm_cluster, corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit_prior(slurm_cluster, corpus, run_dir, log,
                        "optim.max_steps=6 checkpoint.every_steps=3 logging.every_steps=3 "
                        "powersgd.enabled=true powersgd.rank=4", GLOBAL_BATCH_SIZE="8")
    state = slurm_cluster.wait_job(job, timeout_s=120)
    text = log.read_text()
    assert state == "COMPLETED", text[-5000:]
    assert "global batch 8 = micro batch 2 x grad_accum 1 x 4 ranks (GLOBAL_BATCH_SIZE)" in text
    assert (run_dir / "COMPLETED").read_text().strip() == "6"
    assert not (run_dir / "REQUEUE").exists()
    assert "0: train: 4 ranks via slurm" in text  # rank 0 prints, srun --label prefixes
    assert "powersgd.node_size=2" in text  # from SLURM_NTASKS_PER_NODE
    # ZeRO-3 partitions inside each node of 2 ranks: rank 0 holds half the parameters, not a quarter
    m = re.search(r"engine: ZeRO stage 3, ([\d,]+) parameters \(([\d,]+) on rank 0\)", text)
    assert m, text
    total, local = (int(g.replace(",", "")) for g in m.groups())
    assert local == total // 2, (total, local)
    # one copy of the model state (#15): node 0's 2 ranks write DeepSpeed's files, keyed by node-local rank
    assert {p.name for p in (run_dir / "checkpoints" / "step_00000006").glob("*model_states.pt")} == {
        f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)}
    assert "finished at step 6" in text
    assert sorted(_steps(run_dir)) == list(range(1, 7))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]  # PowerSGD across the 2 fake nodes, rank 4, compressing the cross-node average
    assert (last["powersgd/num_nodes"], last["powersgd/node_size"], last["powersgd/rank"]) == (2, 2, 4), last
    assert last["powersgd/steps"] == 6 and 0 < last["powersgd/compression_rate"] < 1, last
    assert len(last["memory_mb"]) == 4


def test_preempted_job_requeues_and_finishes(slurm_cluster, corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    n = 20  # the signal lands at step ~4-6: plenty of steps left to resume into
    job = _submit_prior(slurm_cluster, corpus, run_dir, log,
                        f"optim.max_steps={n} checkpoint.every_steps=1000 logging.every_steps=5")
    deadline = time.time() + 90
    while len(_steps(run_dir)) < 3:
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
        time.sleep(0.3)
    slurm_cluster.run("scancel", "-s", "USR1", job)  # signals every task of the job's steps
    # the script requeues the job; a requeued job may be held with a BeginTime in the future
    deadline = time.time() + 60
    while time.time() < deadline:
        info = _show(slurm_cluster, job)
        if int(info.get("Restarts", "0")) >= 1:
            break
        time.sleep(0.5)
    assert int(_show(slurm_cluster, job).get("Restarts", "0")) == 1, log.read_text()[-3000:]
    # SLURM holds a requeued job for AuthInfo's cred_expire (Reason=BeginTime; 120 s by default, 10 s on the
    # test cluster, see tests/slurm_cluster.py); `scontrol update StartTime=now` made the restarted job FAILED
    # on this SLURM, so the test waits the delay out.
    state = slurm_cluster.wait_job(job, timeout_s=240)
    text = log.read_text()
    assert state == "COMPLETED", (state, _show(slurm_cluster, job), text[-3000:])
    m = re.search(r"\[job \d+ restart 0\] checkpointed at step (\d+) after a signal: requeueing", text)
    assert m, text[-5000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < n
    assert f"restart 1] finished at step {n}" in text
    assert (run_dir / "COMPLETED").read_text().strip() == str(n)
    assert not (run_dir / "REQUEUE").exists()
    steps = _steps(run_dir)
    assert set(steps) == set(range(1, n + 1)) and max(steps) == n  # nothing lost
    assert steps.count(stopped) == 1 and steps.count(stopped + 1) == 1  # resumed right after the checkpoint
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{n:08d}"


def test_failing_rank_fails_job_fast(slurm_cluster, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
source "{ROOT}/slurm/lib.sh"
run_distributed "{tmp_path}/run" -c "
import os, time
if os.environ['SLURM_PROCID'] == '1':
    raise RuntimeError('rank one is broken')
time.sleep(300)
"
""")
    log = tmp_path / "job.out"
    start = time.time()
    job = slurm_cluster.sbatch(*NODES, "--output", str(log), str(script),
                               env={"PYTHON": PYTHON, "DALLE_DS_ROOT": str(ROOT)}, cwd=str(ROOT))
    state = slurm_cluster.wait_job(job, timeout_s=90)
    elapsed = time.time() - start
    text = log.read_text()
    assert state == "FAILED", text
    assert elapsed < 60, (elapsed, text)  # the sleeping ranks were killed, not waited for
    assert re.search(r"^1: RuntimeError: rank one is broken", text, re.M), text
    assert "FAILED: srun exited with" in text
    assert _show(slurm_cluster, job).get("ExitCode", "").split(":")[0] != "0"


# ---------------------------------------------------------------- without a cluster

REQUIRED = {
    "shard_corpus.sh": ("INPUT", "OUTPUT"),
    "train_dvae.sh": ("IMAGE_SHARDS",),
    "tokenize_images.sh": ("DVAE", "INPUT", "OUTPUT"),
    "train_prior.sh": ("TOKEN_SHARDS", "TOKENIZER"),
}


def _bash(script: str | Path, env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    ours = {n for names in REQUIRED.values() for n in names} | {
        "CONFIG", "DS_CONFIG", "RUN_DIR", "EVAL_SHARDS", "GLOBAL_BATCH_SIZE", "EXTRA_ARGS", "CONTAINER",
        "DALLE_MODULES", "MASTER_ADDR", "MASTER_PORT"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_")) and k not in ours}
    base.update(DALLE_DS_ROOT=str(ROOT), PYTHON=PYTHON)
    return subprocess.run(["bash", str(script), *args], env=base | env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_every_sbatch_script_is_covered():
    assert set(REQUIRED) == {p.name for p in (ROOT / "slurm").glob("*.sh")} - {"lib.sh"}


@pytest.mark.parametrize("script,missing", [(s, v) for s, names in REQUIRED.items() for v in names])
def test_script_refuses_to_start_without_its_data(script, missing, tmp_path):
    given = {name: f"/data/{name.lower()}" for name in REQUIRED[script] if name != missing}
    res = _bash(ROOT / "slurm" / script, given, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.splitlines() == [res.stderr.strip()] and res.stderr.startswith(f"error: {missing} is not set ("), \
        res.stderr


@pytest.fixture()
def fake_slurm(tmp_path) -> dict[str, str]:
    """srun prints its command line; scontrol answers the two questions lib.sh asks; `module` echoes;
    `apptainer exec --nv IMAGE python ARGS` runs this venv's python (train_prior.sh probes the batch size)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in {
        "srun": 'echo "srun $*"',
        "scontrol": 'case "$2" in hostnames) echo n1;; node) echo "NodeName=n1 NodeAddr=127.0.0.1";; esac',
        "module": 'echo "fake-module $*"',
        "apptainer": f'[ "$1 $2" = "exec --nv" ] || exit 9\nshift 3\n[ "$1" = python ] && shift && exec {PYTHON} "$@"',
    }.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    return {"PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
            "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "CONFIG": "tiny", "TOKEN_SHARDS": "/data/tok",
            "TOKENIZER": "/data/tokenizer.json", "RUN_DIR": str(tmp_path / "run"),
            "EXTRA_ARGS": "optim.micro_batch_size=2 data.dvae="}


def _srun_line(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("srun ")]
    return line


def test_global_batch_size_sets_grad_accum_for_the_ranks_at_hand(fake_slurm):
    prior = ROOT / "slurm" / "train_prior.sh"
    res = _bash(prior, fake_slurm | {"GLOBAL_BATCH_SIZE": "16"})
    assert res.returncode == 1, res.stderr  # the stand-in srun wrote no COMPLETED marker
    assert "global batch 16 = micro batch 2 x grad_accum 2 x 4 ranks (GLOBAL_BATCH_SIZE)" in res.stdout
    # train.py gets the global batch and derives the accumulation itself (OptimConfig.for_world)
    assert " optim.global_batch_size=16 " in _srun_line(res.stdout) + " "
    assert "optim.grad_accum_steps" not in _srun_line(res.stdout)
    res = _bash(prior, fake_slurm)  # without it the batch follows the ranks, and the log says so
    assert "global batch 8 = micro batch 2 x grad_accum 1 x 4 ranks\n" in res.stdout
    assert "optim.global_batch_size" not in _srun_line(res.stdout)
    res = _bash(prior, fake_slurm | {"GLOBAL_BATCH_SIZE": "12"})
    assert res.returncode == 2 and "srun " not in res.stdout
    assert res.stderr.strip() == ("error: optim.global_batch_size=12: must be a multiple of optim.micro_batch_size x "
                                  "ranks = 2 x 4 = 8"), res.stderr
    res = _bash(prior, fake_slurm | {"GLOBAL_BATCH_SIZE": "16",
                                     "EXTRA_ARGS": fake_slurm["EXTRA_ARGS"] + " optim.grad_accum_steps=4"})
    assert res.returncode == 2 and "set one of them" in res.stderr, res.stderr
    res = _bash(prior, fake_slurm | {"EXTRA_ARGS": "optim.nope=1"})  # a config error stops the job before srun
    assert res.returncode == 2 and "srun " not in res.stdout and "optim.nope" in res.stderr, res.stderr


def test_module_hook_and_container_prefix(fake_slurm):
    env = fake_slurm | {"DALLE_MODULES": "cuda/12.6 nccl/2.21", "CONTAINER": "/images/dalle-ds.sif",
                        "PYTHON": "python"}
    res = _bash(ROOT / "slurm" / "train_prior.sh", env)
    assert res.returncode == 1, res.stderr
    assert "fake-module load cuda/12.6 nccl/2.21" in res.stdout  # the stand-in for Lmod's `module`
    assert "srun --kill-on-bad-exit=1 --label --cpu-bind=none apptainer exec --nv /images/dalle-ds.sif python " \
           "dalle_ds/train.py" in _srun_line(res.stdout)
    res = _bash(ROOT / "slurm" / "shard_corpus.sh", env | {"INPUT": "/raw", "OUTPUT": "/shards"})
    assert "srun --kill-on-bad-exit=1 apptainer exec --nv /images/dalle-ds.sif python data_prep/shard_corpus.py" \
        in _srun_line(res.stdout), res.stderr
