"""Shard formats and manifests: image extensions, deterministic atomic tar writing, the resume scheme.

    progress = Progress(out)                      # out: a folder or an s3:// prefix
    done = progress.finished()                    # names of the finished shards, two listings
    writer = ShardWriter(out, "shard-000007.tar")
    writer.add("000000042", {"jpg": jpg, "txt": txt, "json": meta})  # members in this order
    progress.finish(writer, {"drops": ...})       # the tar appears whole, then its record
    write_manifest(out, build_manifest(FORMAT, "data_prep/x.py", shards, dropped, ...))

Formats (webdataset tars, one sample = the members sharing a key; and plain image folders with
same-named ``.txt`` captions, :func:`captioned_images`). Image shards (data_prep/
shard_corpus.py): ``<key>.jpg`` (RGB), ``<key>.txt`` (UTF-8 caption), ``<key>.json`` (source,
original size, pixel hash). Token shards (data_prep/tokenize_images.py): ``<key>.codes`` (raw
little-endian uint16, grid row-major), ``<key>.txt``, ``<key>.json``. Every output folder ends
with a ``manifest.json`` (:func:`build_manifest`): shard names and sample counts, drop counts by
reason, the producing command's config and input fingerprint, plus format-specific fields (token
shards: the dVAE's hash, grid and codebook size, checked by
:func:`dalle_ds.data.loaders.check_token_manifest`).

Determinism. Tar headers carry a fixed mtime (2000-01-01), mode 0644, uid/gid 0 and no user or
group names, so a shard's bytes are a pure function of its members.

Atomicity. A :class:`ShardWriter` streams into a local temp file (``.NAME.tmp`` next to a local
shard, the system temp folder for S3) and :meth:`ShardWriter.finish` makes the shard visible
whole: a rename, or one upload (S3 shows a multipart upload only once it is complete).

Resume (:class:`Progress`). A shard is finished when its record ``_progress/NAME.json`` exists
(written after the shard) and the shard is there. A job lists the finished shards once, skips
them and redoes the rest; a temp file left by a killed run is overwritten by the redo (or removed
with :meth:`Progress.remove_temps`). ``_progress/job.json`` holds the job's identity (config,
inputs, model hash): :meth:`Progress.claim` refuses to mix two jobs in one output.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Mapping

from dalle_ds.data import storage

# Images a shard sample may hold, in the order a reader picks them (the loaders, the tokenizer job,
# evaluation's image folders). Image shards themselves always store .jpg.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)  # the same, as file suffixes
# What data_prep/shard_corpus.py accepts from a raw corpus: the above plus formats it re-encodes to .jpg.
INPUT_IMAGE_EXTS = IMAGE_EXTS + ("gif", "bmp", "tif", "tiff", "jfif", "ppm", "pgm")

TAR_MTIME = 946684800  # 2000-01-01: fixed so that shard bytes do not depend on when they were made
PROGRESS = "_progress"
MANIFEST = "manifest.json"


def temp_path(out: str, name: str) -> str:
    """Where the shard ``name`` of ``out`` is spooled before it is made visible."""
    if storage.is_s3(out):
        tag = hashlib.sha1(out.rstrip("/").encode()).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), f"dalle-ds-shard-{tag}-{name}.tmp")
    return os.path.join(out, f".{name}.tmp")


class ShardWriter:
    """One webdataset tar, written deterministically to a temp file; :meth:`finish` publishes it whole."""

    def __init__(self, out: str, name: str):
        self.out, self.name = out, name
        self.url = storage.join(out, name)
        self.tmp = temp_path(out, name)
        Path(self.tmp).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")  # truncates a temp file a killed run left behind
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        """One sample: ``members`` maps extensions to bytes, stored as ``key.ext`` in that order."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def finish(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if storage.is_s3(self.url):
            storage.upload_file(self.tmp, self.url)  # multipart above 8 MB; visible only when complete
            os.remove(self.tmp)
        else:
            os.replace(self.tmp, self.url)


class Progress:
    """The resume state of a shard job in ``OUT/_progress/``: one record per finished shard, the job's identity."""

    def __init__(self, out: str):
        self.out = out
        self.folder = storage.join(out, PROGRESS)

    def _url(self, name: str) -> str:
        return storage.join(self.folder, f"{name}.json")

    def _listing(self, url: str) -> set[str]:
        if storage.is_s3(url) or os.path.isdir(url):
            return set(storage.listdir(url))
        return set()

    def finished(self) -> set[str]:
        """Names of the finished shards: a record exists and so does the shard (one listing each)."""
        records = {n[: -len(".json")] for n in self._listing(self.folder) if n.endswith(".json")}
        return records & self._listing(self.out)

    def record(self, name: str) -> dict:
        return storage.read_json(self._url(name))

    def finish(self, writer: ShardWriter, record: Mapping[str, Any]) -> dict:
        """Publish the writer's shard, then its record (``name`` and ``samples`` added): the shard is finished."""
        writer.finish()
        full = {"name": writer.name, "samples": writer.count, **record}
        storage.write_json_atomic(self._url(writer.name), full)
        return full

    def claim(self, job: Mapping[str, Any]) -> dict | None:
        """Record ``job`` as this output's job. If another job is recorded, write nothing and return it."""
        url = self._url("job")
        if storage.exists(url):
            old = storage.read_json(url)
            return None if old == job else old
        storage.write_json_atomic(url, dict(job))
        return None

    @property
    def job_url(self) -> str:
        return self._url("job")

    def clear(self) -> None:
        """Remove every record and the job's identity (a finished or abandoned job)."""
        for name in self._listing(self.folder):
            storage.remove(storage.join(self.folder, name))
        if not storage.is_s3(self.folder) and os.path.isdir(self.folder):
            os.rmdir(self.folder)

    def remove_temps(self, name_glob: str) -> None:
        """Temp files of shards matching ``name_glob`` left by a killed run (only for a job that owns
        the whole output: other processes' shards in progress would match too)."""
        folder, pattern = os.path.split(temp_path(self.out, name_glob))
        for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
            os.remove(path)


def job_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``key: a there, b now`` for every key on which two job records differ."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


def build_manifest(format: str, created_by: str, shards: list[dict], dropped: Mapping[str, int], rejects: str,
                   config: Mapping[str, Any], input_fingerprint: str, **extra: Any) -> dict:
    """The ``manifest.json`` of a shard folder. ``shards``: [{name, samples}] in order; ``dropped``:
    every drop reason with its count (zeros included); ``rejects``: where the per-sample reasons are."""
    samples = sum(s["samples"] for s in shards)
    return {"format": format, "created_by": created_by, "shards": [{"name": s["name"], "samples": s["samples"]}
                                                                   for s in shards],
            "samples": samples, "inputs": samples + sum(dropped.values()), "dropped": dict(dropped),
            "rejects": rejects, "config": dict(config), "input_fingerprint": input_fingerprint, **extra}


def write_manifest(out: str, manifest: Mapping[str, Any]) -> str:
    """Write ``OUT/manifest.json`` atomically (the last file a job writes); returns its URL."""
    url = storage.join(out, MANIFEST)
    storage.write_json_atomic(url, manifest)
    return url


def captioned_images(folder: str | Path, limit: int | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) of a local folder of images with same-named ``.txt`` captions (what
    ``dalle_ds.sample`` writes in ``kept/``), images sorted, the first ``limit``. Raises
    ``FileNotFoundError`` when there is no image or a caption is missing, naming the path."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise FileNotFoundError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images")
    pairs = []
    for p in paths:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise FileNotFoundError(f"{txt}: missing caption for {p}")
        pairs.append((p, txt.read_text(encoding="utf-8").strip()))
    return pairs


def count_drops(reasons: tuple[str, ...], *counts: Mapping[str, int]) -> collections.Counter:
    """Drop counts with every reason present (zeros too), summed over ``counts``."""
    total = collections.Counter({r: 0 for r in reasons})
    for c in counts:
        total.update(c)
    return total


__all__ = ["IMAGE_EXTS", "IMAGE_SUFFIXES", "INPUT_IMAGE_EXTS", "TAR_MTIME", "PROGRESS", "MANIFEST", "ShardWriter",
           "Progress", "build_manifest", "write_manifest", "job_diff", "count_drops", "temp_path", "captioned_images"]
