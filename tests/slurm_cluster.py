"""A real SLURM cluster on 127.0.0.1 for tests: munged + slurmctld + one slurmd per fake node.

Recipe from shared/reference/real-parts.md. Fake nodes n1..nN all live on this host (distinct
slurmd ports), so ``srun -N2 --ntasks-per-node=2`` gives ranks 0,1 on n1 and 2,3 on n2 with the
real SLURM_* variables. Tests skip with a reason where the Debian packages are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sacct")


def missing_binaries() -> list[str]:
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=paths) is None and b != "sacct"]


def _free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalSlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, memory_mb: int = 4000):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.memory_mb = memory_mb
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def _sbin(self, name: str) -> str:
        return shutil.which(name, path=self.env["PATH"]) or name

    def start(self) -> "LocalSlurmCluster":
        r = self.root
        for d in ("munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o711)  # munge refuses a 700 socket folder
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        subprocess.run([self._sbin("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--log-file={r / 'log/munged.log'}", f"--pid-file={r / 'run/munged.pid'}",
                        f"--seed-file={r / 'munge/seed'}", "--force"], check=True, env=self.env)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        # cred_expire=10 (default 120): SLURM holds a requeued job that long before it may start again;
        # bf_interval/sched_interval (default 30/60 s): a job whose BeginTime passed starts within a second or two.
        self.conf.write_text(f"""
ClusterName=dalleds
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldLogFile={r / 'log/slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
SlurmctldPidFile={r / 'run/slurmctld.pid'}
SlurmdPidFile={r / 'run'}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MinJobAge=300
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.procs.append(subprocess.Popen([self._sbin("slurmctld"), "-D", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for n in self.nodes:
            (r / "spool" / n).mkdir(exist_ok=True)
            self.procs.append(subprocess.Popen([self._sbin("slurmd"), "-D", "-f", str(self.conf), "-N", n],
                                               env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.wait_idle()
        return self

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True,
                              check=check, **kw)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        deadline = time.time() + timeout_s
        out = ""
        while time.time() < deadline:
            res = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            out = res.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s.startswith("idle") for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s}s: {out!r}; logs in {self.root / 'log'}")

    def job_state(self, job_id: str) -> str:
        res = self.run("scontrol", "show", "job", job_id, check=False)
        for tok in res.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, job_id: str, timeout_s: float = 600.0, final=("COMPLETED", "FAILED", "CANCELLED",
                                                                      "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in final:
                return state
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout_s}s")

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> str:
        full_env = self.env | (env or {})
        res = self.run("sbatch", "--parsable", *args, env=full_env, cwd=cwd)
        return res.stdout.strip().split(";")[0]

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        pid_file = self.root / "run" / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): "
                    "apt-get install slurmctld slurmd slurm-client munge (.ci/run does this)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs slurmd as root; tests need root")
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
