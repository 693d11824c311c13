"""One place for "a path or an s3:// URL": listing, reading, atomic writes, webdataset hook-up.

Credentials and endpoint come from the standard boto3 chain (env vars, ~/.aws, instance roles);
S3-compatible stores are reached with ``AWS_ENDPOINT_URL``. Nothing here prints or stores
credentials.

Flaky storage: an S3 object is read through :class:`RetryingBody`, which on a connection reset,
timeout or short body re-opens the object at the byte it stopped at (HTTP Range), up to
``READ_RETRIES`` times with exponential backoff; every retry is counted in :data:`RETRIES`
(by kind), which jobs report. Requests themselves are retried by botocore (standard mode).
:func:`abort_multipart_uploads` removes the incomplete multipart uploads a killed job left
under its output prefix (they are invisible but billed). Importing this module registers an ``s3`` scheme with webdataset, so
``webdataset.WebDataset("s3://bucket/shard-000000.tar")`` streams through boto3.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import io
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

from braceexpand import braceexpand


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(url):
        raise ValueError(f"{url!r}: not an s3:// URL")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: no bucket in the s3:// URL")
    return bucket, key


@functools.lru_cache(maxsize=None)
def _client_for(pid: int, endpoint: str | None):
    import boto3
    from botocore.config import Config

    kwargs = {"config": Config(retries={"max_attempts": 5, "mode": "standard"})}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return boto3.session.Session().client("s3", **kwargs)


def s3_client():
    """A boto3 S3 client for this process (clients are not fork-safe: one per pid)."""
    return _client_for(os.getpid(), os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


# ---------------------------------------------------------------- listing


def _list_s3(prefix_url: str, suffix: str = "") -> list[str]:
    bucket, prefix = split_s3(prefix_url)
    pattern = None
    if any(c in prefix for c in "*?["):
        pattern, prefix = prefix, prefix[: min(prefix.find(c) for c in "*?[" if c in prefix)]
    out = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith(suffix) and (pattern is None or fnmatch.fnmatchcase(key, pattern)):
                out.append(f"s3://{bucket}/{key}")
    return sorted(out)


def expand_urls(spec: str | list[str], suffix: str = ".tar") -> list[str]:
    """Shard list from a spec: comma/space separated items, each a brace range
    (``shard-{000000..000009}.tar``), a glob, a directory or ``s3://bucket/prefix/`` (all
    ``*suffix`` files below it, sorted), or a single file/URL. Raises if nothing matches."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).replace(",", " ").split()
    urls: list[str] = []
    for item in items:
        for one in braceexpand(item):
            if is_s3(one):
                if one.endswith("/") or any(c in one for c in "*?["):
                    found = _list_s3(one, suffix)
                    if not found:
                        raise FileNotFoundError(f"{one}: no {suffix} objects under this S3 prefix")
                    urls.extend(found)
                else:
                    urls.append(one)
            elif os.path.isdir(one):
                found = sorted(str(p) for p in Path(one).rglob(f"*{suffix}") if p.is_file())
                if not found:
                    raise FileNotFoundError(f"{one}: directory has no {suffix} files")
                urls.extend(found)
            elif any(c in one for c in "*?["):
                found = sorted(glob.glob(one))
                if not found:
                    raise FileNotFoundError(f"{one}: glob matches no files")
                urls.extend(found)
            else:
                urls.append(one)
    if not urls:
        raise FileNotFoundError(f"{spec!r}: no shards")
    return urls


def listdir(url: str) -> list[str]:
    """Names (not full paths) directly inside a folder or under an S3 prefix."""
    if is_s3(url):
        prefix = url if url.endswith("/") else url + "/"
        bucket, key = split_s3(prefix)
        names = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            names += [o["Key"][len(key):] for o in page.get("Contents", [])]
        return sorted(names)
    p = Path(url)
    return sorted(x.name for x in p.iterdir()) if p.is_dir() else []


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_s3(base) else str(Path(base) / name)


def exists(url: str) -> bool:
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(url)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return os.path.exists(url)


# ---------------------------------------------------------------- reading


READ_RETRIES = 5
BACKOFF_S = 0.2  # first retry's wait; doubles each time
RETRIES: Counter = Counter()  # retries made by this process, by kind ("s3_read")


def _transient(e: BaseException) -> bool:
    """A connection reset, timeout or short read: worth re-opening the object."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return isinstance(e, (ConnectionError, TimeoutError, BotoConnectionError, IncompleteReadError,
                          ReadTimeoutError, ResponseStreamingError, Urllib3Error))


class RetryingBody(io.RawIOBase):
    """An S3 object as a stream that survives dropped connections: a failed read re-opens the
    object at the current offset (Range: bytes=N-) after a backoff, at most ``READ_RETRIES``
    times in a row; then the error is raised, naming the URL."""

    def __init__(self, url: str, retries: int = READ_RETRIES, backoff_s: float = BACKOFF_S, start: int = 0):
        self.url, self.retries, self.backoff_s = url, retries, backoff_s
        self.bucket, self.key = split_s3(url)
        self.pos, self.size, self.body = start, None, None  # pos: absolute offset in the object
        self._open()

    def _open(self) -> None:
        kwargs = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        try:
            r = s3_client().get_object(Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the URL in the message
            raise OSError(f"{self.url}: cannot read S3 object ({type(e).__name__}: {e})") from e
        if self.size is None:  # a ranged response's length is what is left from pos
            self.size = self.pos + int(r["ContentLength"])
        self.body = r["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        failures = 0
        while True:
            try:
                data = self.body.read(len(buf))
                if not data and self.size is not None and self.pos < self.size:
                    raise ConnectionError(f"body ended at byte {self.pos} of {self.size}")
                n = len(data)
                buf[:n] = data
                self.pos += n
                return n
            except Exception as e:  # noqa: BLE001 - transient ones are retried, the rest re-raised
                if not _transient(e) or failures >= self.retries:
                    raise OSError(f"{self.url}: read failed at byte {self.pos} after {failures} retries "
                                  f"({type(e).__name__}: {e})") from e
                failures += 1
                RETRIES["s3_read"] += 1
                time.sleep(self.backoff_s * 2 ** (failures - 1))
                try:
                    self.body.close()
                except Exception:  # noqa: BLE001 - the broken connection may not close cleanly
                    pass
                self._open()

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def open_read(url: str, start: int = 0) -> IO[bytes]:
    """A binary, streaming file-like object for a path or an s3:// URL (S3: :class:`RetryingBody`),
    positioned at byte ``start`` (S3: a ranged GET, so the bytes before it are never transferred)."""
    if is_s3(url):
        return io.BufferedReader(RetryingBody(url, start=start), buffer_size=1 << 20)
    f = open(url, "rb")
    if start:
        f.seek(start)
    return f


def abort_multipart_uploads(prefix_url: str) -> int:
    """Abort every incomplete multipart upload under an S3 prefix (left by a killed job); returns
    how many. Only for a prefix one job owns: another process's upload in flight would go too."""
    if not is_s3(prefix_url):
        return 0
    bucket, prefix = split_s3(prefix_url if prefix_url.endswith("/") else prefix_url + "/")
    client, n = s3_client(), 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for up in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            n += 1
    return n


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def read_json(url: str) -> Any:
    data = read_bytes(url)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- writing


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Readers see the old object or the whole new one, never a partial one.

    Local: write a temp file in the same folder, fsync, rename. S3: a PUT is atomic.
    """
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().upload_fileobj(io.BytesIO(data), bucket, key)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload_file(local_path: str | Path, url: str) -> None:
    """Copy a finished local file to a path or S3 URL (multipart above 8 MB, atomically visible)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().upload_file(str(local_path), bucket, key)  # aborts its multipart upload if it fails
        return
    dest = Path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(local_path, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, dest)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove(url: str) -> None:
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(url).unlink(missing_ok=True)


# ---------------------------------------------------------------- webdataset


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    if mode[0] != "r":
        raise ValueError(f"{url}: webdataset s3 handler only reads (got mode {mode!r})")
    return open_read(url)


def register_webdataset_scheme() -> None:
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = _gopen_s3


register_webdataset_scheme()
