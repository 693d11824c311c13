"""shard_corpus's resume state with memory that does not grow with the corpus.

- :class:`SeenHashes`: the duplicate filter, one row per kept sample's pixel hash in an sqlite
  file (``OUT/_progress/dedupe.sqlite`` for a local output, the system temp folder for S3);
  memory is sqlite's page cache (capped at 16 MiB). Each row carries its shard number and the
  rows of a shard are committed with the shard, so after ``kill -9`` the rows of unfinished
  shards are deleted and those of finished shards the file lacks (a lost temp file, another
  machine) are re-added from the shards' progress records.
- rejects stream to a spool file as they occur; a finished shard's rejects since the previous
  shard become ``_progress/NAME.rejects.jsonl`` (before its record, which makes it finished);
  the final ``rejects.jsonl`` is their concatenation, copied in 1 MiB chunks.
- :class:`ResumeState`: the finished shards' records without their hashes (name, samples,
  next input index, drop counts, reject count), i.e. O(shards), not O(samples).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dalle_ds.data import storage
from dalle_ds.data.shards import PROGRESS, Progress, ShardWriter, temp_path
from data_prep._shard_filters import MAX_PHASH_DISTANCE, hamming, near_bands

CACHE_KIB = 16 << 10  # sqlite page cache: the dedupe filter's memory, whatever the corpus size


def shard_name(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}.tar"


def local_state_path(out: str, name: str) -> str:
    """Where a local state file of the job on ``out`` lives: in ``_progress/`` for a local output
    (so ``--overwrite`` and the final clean-up remove it), the temp folder for S3."""
    if storage.is_s3(out):
        return temp_path(out, name)
    return os.path.join(out, PROGRESS, name)


@dataclass(frozen=True)
class OrderRules:
    """The filters whose verdict depends on earlier samples (all judged against earlier *kept* samples,
    in input order): exact pixel duplicates (always), near-duplicates by pHash, repeated captions."""

    phash_distance: int | None = None  # None: off; D: drop within Hamming distance D of a kept pHash
    max_caption_repeats: int | None = None  # None: off; N: keep the first N samples of each caption

    def __post_init__(self):
        if self.phash_distance is not None and not 0 <= self.phash_distance <= MAX_PHASH_DISTANCE:
            raise ValueError(f"--phash-distance={self.phash_distance}: must be in [0, {MAX_PHASH_DISTANCE}]")
        if self.max_caption_repeats is not None and self.max_caption_repeats < 1:
            raise ValueError(f"--max-caption-repeats={self.max_caption_repeats}: must be >= 1")


class SeenHashes:
    """What kept samples looked like, on disk: pixel hashes (``add`` returns False for a hash already
    kept), and with :class:`OrderRules` their pHash bands and caption keys (:meth:`check`, :meth:`keep`)."""

    def __init__(self, path: str, job_tag: str, rules: OrderRules = OrderRules()):
        self.path, self.rules = path, rules
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open(job_tag)
        except sqlite3.DatabaseError:  # a corrupt or foreign file: start over (rebuilt from the records)
            self.close()
            self.remove_files(path)
            self._open(job_tag)

    TABLES = ("seen", "captions", "phashes")

    def _open(self, job_tag: str) -> None:
        self.db = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("locking_mode=EXCLUSIVE", "synchronous=NORMAL", f"cache_size=-{CACHE_KIB}",
                       "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (hash BLOB PRIMARY KEY, shard INTEGER NOT NULL) WITHOUT ROWID")
        # one row per kept sample with that caption (counts stay below max_caption_repeats + 1)
        self.db.execute("CREATE TABLE IF NOT EXISTS captions (key BLOB NOT NULL, shard INTEGER NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS captions_key ON captions (key)")
        # one row per (kept sample, band): band = which slice of the 64-bit pHash, value = its bits
        self.db.execute("CREATE TABLE IF NOT EXISTS phashes (band INTEGER NOT NULL, value INTEGER NOT NULL, "
                        "phash BLOB NOT NULL, shard INTEGER NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS phashes_band ON phashes (band, value)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        if self._meta("job", "") != job_tag:  # a new file, or another job's file at this path
            for table in (*self.TABLES, "meta"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.execute("INSERT INTO meta VALUES ('job', ?)", (job_tag,))
        self.db.execute("BEGIN")

    def _meta(self, key: str, default: str) -> str:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def shards(self) -> int:
        """Number of shards whose hashes are all committed."""
        return int(self._meta("shards", "0"))

    def add(self, pixel_hash: str, shard: int) -> bool:
        cur = self.db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (bytes.fromhex(pixel_hash), shard))
        return cur.rowcount == 1

    def check(self, pixel_hash: str, caption: bytes, phash: int | None) -> tuple[str, str] | None:
        """(reason, detail) if a sample with these hashes must be dropped given the kept ones, else None.
        Order: exact duplicate, near duplicate, repeated caption (the first that applies is the reason)."""
        if self.db.execute("SELECT 1 FROM seen WHERE hash = ?", (bytes.fromhex(pixel_hash),)).fetchone():
            return "duplicate", f"pixel hash {pixel_hash} already kept"
        d = self.rules.phash_distance
        if d is not None:
            if phash is None:
                raise ValueError("--phash-distance is set but the sample has no pHash")
            for band, value in near_bands(phash, d):
                for (other,) in self.db.execute("SELECT phash FROM phashes WHERE band = ? AND value = ?",
                                                (band, value)):
                    if hamming(phash, int.from_bytes(other, "big")) <= d:
                        return "near_duplicate", (f"pHash {phash:016x} within {d} bits of kept "
                                                  f"{int.from_bytes(other, 'big'):016x}")
        n = self.rules.max_caption_repeats
        if n is not None:
            (count,) = self.db.execute("SELECT COUNT(*) FROM (SELECT 1 FROM captions WHERE key = ? LIMIT ?)",
                                       (caption, n)).fetchone()
            if count >= n:
                return "caption_repeated", f"{n} kept sample(s) already have this caption"
        return None

    def keep(self, pixel_hash: str, caption: bytes, phash: int | None, shard: int) -> None:
        """Register a kept sample (after :meth:`check` said it may be kept)."""
        self.add(pixel_hash, shard)
        if self.rules.phash_distance is not None:
            blob = phash.to_bytes(8, "big")
            self.db.executemany("INSERT INTO phashes VALUES (?, ?, ?, ?)",
                                [(band, value, blob, shard) for band, value in near_bands(phash, self.rules.phash_distance)])
        if self.rules.max_caption_repeats is not None:
            self.db.execute("INSERT INTO captions VALUES (?, ?)", (caption, shard))

    def commit(self, shards: int) -> None:
        """Every hash of shards ``< shards`` is added: make them durable."""
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('shards', ?)", (str(shards),))
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def sync(self, progress: Progress, names: list[str]) -> None:
        """Match the finished shards ``names`` (in order): drop rows of later shards, add the missing ones."""
        n = len(names)
        for table in self.TABLES:
            self.db.execute(f"DELETE FROM {table} WHERE shard >= ?", (n,))
        for k in range(min(self.shards, n), n):
            record = progress.record(names[k])
            hashes = record["hashes"]
            captions = record.get("captions") or [None] * len(hashes)
            phashes = record.get("phashes") or [None] * len(hashes)
            for h, c, p in zip(hashes, captions, phashes):
                self.keep(h, bytes.fromhex(c) if c else b"", int(p, 16) if p else None, k)
        self.commit(n)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        """Close; rows added since the last :meth:`commit` (the open shard's) are discarded."""
        db = getattr(self, "db", None)
        if db is not None:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            self.db = None

    @staticmethod
    def remove_files(path: str) -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)


class ResumeState:
    """Finished shards (from their progress records), the duplicate filter and the rejects spool.

    Shards are numbered in input order, so the finished ones are the unbroken run from 0; each
    record holds the next input index, the drops and rejects since the previous shard and the
    pixel hashes of its samples (read back only to rebuild a lost duplicate filter).
    """

    def __init__(self, out: str, prefix: str, job: Mapping[str, Any], rules: OrderRules = OrderRules()):
        self.out, self.prefix, self.rules = out, prefix, rules
        self.progress = Progress(out)
        self.records: list[dict] = []  # without hashes
        self.next_item = 0
        self.drops: collections.Counter = collections.Counter()  # since the last record
        self.n_rejects = 0  # since the last record
        self.truncated = 0  # kept samples whose caption was cut, since the last record
        self.hashes: list[str] = []  # of the open shard's samples (at most --samples-per-shard)
        self.captions: list[str] = []  # their caption keys (hex), with --max-caption-repeats
        self.phashes: list[str] = []  # their pHashes (hex), with --phash-distance
        self.cursor: tuple | None = None  # where a resume starts reading (_shard_inputs.Cursor)
        self.units: collections.deque = collections.deque()  # cursors of the units begun, not yet passed
        tag = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
        self.seen = SeenHashes(local_state_path(out, "dedupe.sqlite"), tag, rules)
        self.spool_path = local_state_path(out, "rejects.open.jsonl")
        self.spool = open(self.spool_path, "w", encoding="utf-8")  # rejects after the last finished shard

    @classmethod
    def load(cls, out: str, prefix: str, job: Mapping[str, Any], rules: OrderRules = OrderRules()) -> "ResumeState":
        state = cls(out, prefix, job, rules)
        finished = state.progress.finished()
        names = []
        while (name := shard_name(prefix, len(names))) in finished:
            names.append(name)
        state.seen.sync(state.progress, names)
        for name in names:
            record = state.progress.record(name)
            for bulky in ("hashes", "captions", "phashes"):
                record.pop(bulky, None)
            state.records.append(record)
            state.next_item = record["next_item"]
            state.cursor = tuple(record["cursor"]) if record.get("cursor") else None
        state.progress.remove_temps(f"{prefix}-[0-9]*.tar")
        if n := storage.abort_multipart_uploads(out):  # a killed run's shard upload: invisible but billed
            print(f"{out}: aborted {n} incomplete multipart upload(s) of an earlier run")
        return state

    @property
    def shard_index(self) -> int:
        return len(self.records)

    def drop(self, o) -> None:
        self.drops[o.reason] += 1
        self.n_rejects += 1
        self.spool.write(json.dumps({"index": o.index, "source": o.source, "reason": o.reason,
                                     "detail": o.detail}, ensure_ascii=False) + "\n")

    def keep(self, pixel_hash: str, truncated: bool = False, caption: bytes = b"", phash: int | None = None) -> None:
        """A kept sample: recorded with its shard (and registered in the filter, see :meth:`SeenHashes.keep`)."""
        self.seen.keep(pixel_hash, caption, phash, self.shard_index)
        self.hashes.append(pixel_hash)
        if self.rules.max_caption_repeats is not None:
            self.captions.append(caption.hex())
        if self.rules.phash_distance is not None:
            self.phashes.append(f"{phash:016x}")
        self.truncated += truncated

    def unit_begins(self, cursor: tuple) -> None:
        self.units.append(cursor)

    def _cursor_at(self, index: int) -> tuple | None:
        """The cursor of the unit holding sample ``index`` (the last unit begun at or before it)."""
        while len(self.units) >= 2 and self.units[1][2] <= index:
            self.units.popleft()
        return tuple(self.units[0]) if self.units and self.units[0][2] <= index else self.cursor

    def finish(self, writer: ShardWriter, next_item: int) -> None:
        cursor = self._cursor_at(next_item)
        self.spool.close()
        if self.n_rejects:
            storage.upload_file(self.spool_path, self._rejects_url(writer.name))
        self.seen.commit(self.shard_index + 1)
        record = self.progress.finish(writer, {"next_item": next_item, "cursor": cursor, "drops": dict(self.drops),
                                               "rejects": self.n_rejects, "truncated": self.truncated,
                                               "hashes": self.hashes, "captions": self.captions,
                                               "phashes": self.phashes})
        for bulky in ("hashes", "captions", "phashes"):
            record.pop(bulky)
        self.records.append(record)
        self.next_item, self.cursor = next_item, cursor
        self.drops, self.n_rejects, self.truncated = collections.Counter(), 0, 0
        self.hashes, self.captions, self.phashes = [], [], []
        self.spool = open(self.spool_path, "w", encoding="utf-8")

    def _rejects_url(self, name: str) -> str:
        return storage.join(self.progress.folder, f"{name}.rejects.jsonl")

    def write_rejects(self, url: str) -> None:
        """Concatenate the shards' rejects and the open spool into ``url``, streaming."""
        self.spool.close()
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as out:
            for record in self.records:
                if record.get("rejects"):
                    with storage.open_read(self._rejects_url(record["name"])) as part:
                        shutil.copyfileobj(part, out, 1 << 20)
            with open(self.spool_path, "rb") as tail:
                shutil.copyfileobj(tail, out, 1 << 20)
        storage.upload_file(out.name, url)
        os.remove(out.name)
        self.spool = open(self.spool_path, "a", encoding="utf-8")

    def close(self) -> None:
        self.spool.close()
        self.seen.close()

    def clear(self) -> None:
        """The job is done: remove the local state files and every progress record."""
        self.close()
        Path(self.spool_path).unlink(missing_ok=True)
        SeenHashes.remove_files(self.seen.path)
        self.progress.clear()
