"""Rank- and worker-aware loaders over webdataset shards: images for the dVAE, tokens for the prior.

    loader = ImageShardLoader("s3://b/shards/", batch_size=8, mode="dvae", size=256, num_workers=2)
    for batch in loader:          # {"images": (B,3,H,W) float in [0,1], "captions", "keys"}
        ...
        ckpt["data"] = loader.state_dict()       # this rank's position; restore with load_state_dict

    tokens = TokenShardLoader(spec, batch_size=8, tokenizer=tok, grid=32, codebook_size=8192)
    # {"text": (B,text_len) int64, "codes": (B,grid*grid) int64, "captions", "keys"}

Shards are anything :func:`dalle_ds.data.storage.expand_urls` accepts (paths, brace ranges, globs,
directories, ``s3://`` prefixes); tars are opened through :mod:`dalle_ds.data.storage` (S3 reads
retried) and grouped into samples as webdataset groups them (:func:`shard_samples`, which also
reports each sample's byte offset for seeking).

Exactly-once split. The job has S = world_size x max(1, num_workers) reader *slots*; slot
``rank * W + worker``. Each epoch the shard list is permuted with a generator seeded by
(seed, epoch), the same on every slot, then:
- shards >= S: slot s reads the shards at positions s, s+S, s+2S, ... whole;
- shards <  S: the slots are spread over the shards (slot s reads position s mod n) and the k
  slots sharing a shard keep every k-th sample of it (sample i kept by the (i mod k)-th reader).
Both cover every sample of the corpus exactly once per epoch, for any world size and worker
count, and each shard is read by at most ceil(S / n) slots, so the job reads max(n, S) shard
streams per epoch instead of n x S for pure sample striding (which would read the whole corpus
on every slot: it does not scale to hundreds of ranks). A permutation per epoch changes which
slot reads which shard, so unevenly sized shards even out over epochs.

Order within a slot: its shards in turn, read in blocks of ``shuffle_buffer`` samples, each block
permuted by a generator seeded by (seed, epoch, slot, block number) — a block shuffle rather than a
streaming buffer, so that a position can be resumed from the block's start alone (below);
``shuffle=False`` keeps the stored order.
Decoding and augmentation happen after the buffer, with a per-sample generator seeded by
(seed, epoch, key), so the same sample gets the same crop whichever slot reads it.

Remainders. ``infinite=True`` (training): each slot runs epoch after epoch on its own, a batch
may span two epochs, and every rank can take as many steps as it likes, so DeepSpeed's ranks
always step together; a slot's epoch e is its share of the corpus, and the union of all slots'
epoch e is the corpus exactly once (slots with larger shares reach epoch e+1 later).
``infinite=False`` (evaluation, offline tokenization): one ``iter()`` is one epoch; every slot
yields its share once, its last batch may be short, and ranks may get different numbers of
batches (nothing is padded or dropped) — callers that need equal step counts across ranks
use infinite mode with a fixed number of steps. A slot that gets no sample in MAX_EMPTY_EPOCHS
epochs in a row (a corpus with fewer samples than slots) is an error rather than a hang.

Resume. Every batch carries, for its slot, the (epoch, samples consumed) after it; the main
process keeps the latest per worker from the batches actually handed to the caller (prefetched
batches do not count) and which worker the DataLoader's round-robin serves next.
Each batch also carries the *seek* of the block its last sample came from: (entry in the slot's
plan, sample index in that shard, byte offset of the sample's first tar header, block number).
``state_dict()`` returns these; after ``load_state_dict()`` the next ``iter()`` opens each slot's
current shard at that byte (a file seek; on S3 a ranged GET), never opening the shards it
consumed, re-reads that one block (at most ``shuffle_buffer`` samples, not decoded) to rebuild
its permutation, and rotates the worker ids so the round-robin continues with the same slot.
A state without seeks (saved by an older version) re-reads the epoch up to its position. The batches that follow are the ones an
uninterrupted iterator would have produced (images and token text identical: BPE dropout draws
from a hash of (seed, epoch, key) per sample, :func:`bpe_seeds`). The state is per rank; a
checkpoint keeps one per rank. It is only valid for the same seed, shards, world size and
worker count; ``load_state_dict(state, strict=False)`` accepts a changed layout and restarts at
the beginning of the earliest saved epoch.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import random
import re
import tarfile
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_ds.data import storage
from dalle_ds.data.augment import Augment
from dalle_ds.data.shards import IMAGE_EXTS, MANIFEST
MAX_EMPTY_EPOCHS = 16
# Where a block of a slot's stream starts: (entry of the slot's plan, sample index in that shard,
# byte offset of the sample's first tar header, block number in the epoch).
Seek = tuple


class ShardError(ValueError):
    """A shard or a sample in it is unreadable or malformed; the message names both."""


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---------------------------------------------------------------- shards and the split


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard: ``{"__key__", "__url__", ext: bytes, ...}`` in stored order."""
    for _, sample in shard_samples(url):
        yield sample


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key.ext split: the key ends at the first dot
_META = re.compile(r"__[^/]*__($|/)")


def shard_samples(url: str, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset of the sample's first tar header, sample) for the samples of one tar shard from
    byte ``start`` on — an offset this function reported before, so a resumed loader opens the shard
    there (a seek; on S3 a ranged GET) instead of reading what it consumed. Members are grouped as
    webdataset groups them (key = name up to the first dot of the basename, extension lower-cased)."""
    try:
        with storage.open_read(url, start) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            key, at, sample = None, start, None
            for m in tar:
                match = _MEMBER.match(m.name) if m.isreg() else None
                if match is None or _META.match(m.name):
                    continue
                k, ext = match.group(1), match.group(2).lower()
                if k != key:
                    if sample is not None:
                        yield at, sample
                    key, at, sample = k, start + m.offset, {"__key__": k, "__url__": url}
                if ext in sample:
                    raise ShardError(f"{url}: sample {k!r} has two .{ext} members")
                sample[ext] = tar.extractfile(m).read()
                tar.members = []  # a streamed tar would otherwise keep every header
            if sample is not None:
                yield at, sample
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised naming the shard
        raise ShardError(f"{url}: cannot read shard ({type(e).__name__}: {e.args[0] if e.args else e})") from e


def holdout_split(urls: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) shard lists: the ceil(fraction x n) shards whose *names* hash lowest are
    held out, so the split does not depend on where the shards are stored or how they are listed."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction}: must be in [0, 1)")
    n_val = math.ceil(fraction * len(urls))
    if n_val and n_val >= len(urls):
        raise ValueError(f"validation fraction {fraction} of {len(urls)} shards leaves none for training")
    ranked = sorted(urls, key=lambda u: hashlib.sha1(u.rsplit("/", 1)[-1].encode()).hexdigest())
    val = set(ranked[:n_val])
    return [u for u in urls if u not in val], [u for u in urls if u in val]


def slot_plan(n_shards: int, total_slots: int, slot: int, order: list[int]) -> list[tuple[int, int, int]]:
    """What one slot reads in one epoch: ``(shard index, stride, offset)`` triples; the slot keeps
    the samples i (0-based, in stored order) of that shard with ``i % stride == offset``."""
    if n_shards >= total_slots:
        return [(order[j], 1, 0) for j in range(slot, n_shards, total_slots)]
    j = slot % n_shards
    return [(order[j], len(range(j, total_slots, n_shards)), slot // n_shards)]


def epoch_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n_shards))
    if shuffle:
        random.Random(_seed("shards", seed, epoch)).shuffle(order)
    return order


def _with_last(it: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


# ---------------------------------------------------------------- the per-worker dataset


class _SlotDataset(IterableDataset):
    """Runs inside each DataLoader worker: its slot's stream from a start state, in batches."""

    def __init__(self, urls: list[str], loader: "ShardLoader", start: list[tuple[int, int]], rotate: int):
        super().__init__()
        self.urls, self.start, self.rotate = urls, start, rotate
        self.rank, self.world, self.workers = loader.rank, loader.world_size, loader.slots_per_rank
        self.batch_size, self.seed, self.shuffle = loader.batch_size, loader.seed, loader.shuffle
        self.max_bad_fraction = loader.max_bad_fraction
        self.buffer, self.infinite, self.decode = loader.shuffle_buffer, loader.infinite, loader.decode_batch

    @property
    def block(self) -> int:
        """Samples shuffled together: the stream is read in blocks of this many and each block is
        permuted on its own, so a position is (the block's start in the shards, offset in the block)."""
        return self.buffer if self.shuffle and self.buffer > 1 else 1

    def raw_samples(self, slot: int, epoch: int, seek: Seek | None) -> Iterator[tuple[dict[str, Any], Seek]]:
        """The slot's samples of ``epoch`` in stored order, each with its :data:`Seek`, from ``seek`` on."""
        order = epoch_order(len(self.urls), self.seed, epoch, self.shuffle)
        first_entry, first_index, first_byte = seek[:3] if seek else (0, 0, 0)
        plan = slot_plan(len(self.urls), self.world * self.workers, slot, order)
        for entry, (shard, stride, offset) in enumerate(plan):
            if entry < first_entry:  # consumed shards are not opened
                continue
            index, byte = (first_index, first_byte) if entry == first_entry else (0, 0)
            for i, (at, sample) in enumerate(shard_samples(self.urls[shard], byte), start=index):
                if i % stride == offset:
                    yield sample, (entry, i, at)

    def epoch_samples(self, slot: int, epoch: int, pos: int, seek: Seek | None) -> Iterator[tuple[dict, Seek, bool]]:
        """(sample, seek of its block, last of the epoch?) from emission ``pos`` on. ``seek`` is where
        the block holding emission ``pos - 1`` starts (None: read from the epoch's start and skip)."""
        size = self.block
        block = (pos - 1) // size if (seek is not None and pos > 0) else 0
        if seek is not None and pos > 0 and seek[3] != block:
            raise ValueError(f"saved position {pos} of slot {slot} lies in block {block} of {size} samples, but its "
                             f"seek is for block {seek[3]}: the state is inconsistent")
        skip = pos - block * size  # emissions of the first block read that were consumed already
        raw = self.raw_samples(slot, epoch, seek if block or pos else None)
        while True:
            pending = list(itertools.islice(raw, size))
            if not pending:
                if skip:
                    raise ValueError(f"saved position {pos} of slot {slot} is past the end of its epoch {epoch}: "
                                     f"the state does not belong to these shards")
                return
            block_seek = (*pending[0][1], block)
            if size > 1:
                random.Random(_seed("block", self.seed, epoch, slot, block)).shuffle(pending)
            peek = next(raw, None)  # is this the epoch's last block?
            for j, (sample, _) in enumerate(pending):
                if skip:
                    skip -= 1
                    continue
                yield sample, block_seek, peek is None and j == len(pending) - 1
            if peek is None:
                if skip:
                    raise ValueError(f"saved position {pos} of slot {slot} is past the end of its epoch {epoch}: "
                                     f"the state does not belong to these shards")
                return
            raw = itertools.chain([peek], raw)
            block += 1

    def samples(self, slot: int, epoch: int, pos: int, seek: Seek | None) -> Iterator[tuple[dict, int, int, int, Any]]:
        """(sample, its epoch, then epoch, position and seek after it), skipping ``pos`` samples first."""
        empty_epochs = 0
        while True:
            seen = pos
            for sample, block_seek, last in self.epoch_samples(slot, epoch, pos, seek):
                seen += 1
                after = (epoch + 1, 0, None) if (last and self.infinite) else (epoch, seen, block_seek)
                yield sample, epoch, *after
            if not self.infinite:
                return
            empty_epochs = empty_epochs + 1 if seen == 0 else 0
            if empty_epochs == MAX_EMPTY_EPOCHS:  # an empty share is fine now and then, not forever
                raise ValueError(f"slot {slot} of {self.world * self.workers} (rank {self.rank}) got no samples in "
                                 f"{MAX_EMPTY_EPOCHS} epochs of {len(self.urls)} shards: fewer samples than "
                                 f"ranks x workers, or empty shards")
            epoch, pos, seek = epoch + 1, 0, None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotate) % self.workers  # logical worker
        slot = self.rank * self.workers + worker
        epoch, pos, seek = self.start[worker]
        batch: list[tuple[dict, int]] = []
        bad: list[str] = []  # reasons of the samples skipped since the last batch
        seen = 0
        for sample, sample_epoch, epoch_after, pos_after, seek_after in self.samples(slot, epoch, pos, seek):
            batch.append((sample, sample_epoch))
            seen += 1
            if len(batch) == self.batch_size:
                out, batch = _decode_skipping_bad(self.decode, batch, bad)
                if out is None:  # bad samples left the batch: fill it up from the stream
                    # the main process judges the rate when a batch arrives; a stream of nothing but bad
                    # samples never yields one, so the worker applies the same rule to its own count
                    if len(bad) > self.max_bad_fraction * max(seen, 1000):
                        raise ShardError(f"{len(bad)} of {seen} samples read could not be decoded, more than "
                                         f"max_bad_fraction={self.max_bad_fraction}; latest: {bad[-1]}")
                    continue
                yield {**out, "_worker": worker, "_epoch": epoch_after, "_pos": pos_after, "_seek": seek_after,
                       "_bad": bad, "_seen": seen}
                batch, bad, seen = [], [], 0
        while batch:
            out, batch = _decode_skipping_bad(self.decode, batch, bad)
            if out is not None:
                yield {**out, "_worker": worker, "_epoch": epoch_after, "_pos": pos_after, "_seek": seek_after,
                       "_bad": bad, "_seen": seen}
                break


def _decode_skipping_bad(decode, batch: list[tuple[dict, int]], bad: list[str]):
    """(decoded batch, []) or, when some samples cannot be decoded, (None, the good ones) with the
    bad ones' reasons appended to ``bad``. Only the failure path decodes samples one by one."""
    try:
        return decode(batch), []
    except ShardError:
        good = []
        for item in batch:
            try:
                decode([item])
                good.append(item)
            except ShardError as e:
                bad.append(str(e))
        if len(good) == len(batch):  # not one sample's fault
            raise
        return None, good


# ---------------------------------------------------------------- the loaders


class ShardLoader:
    """Base: shard split, shuffle, batching in workers, resumable position. Subclasses decode."""

    def __init__(self, shards: str | list[str], batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, infinite: bool = True, prefetch_factor: int = 2,
                 pin_memory: bool = False, max_bad_fraction: float = 0.0):
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction}: must be in [0, 1)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: must be >= 0")
        default_rank, default_world = _default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size}: need 0 <= rank < world_size")
        self.urls = storage.expand_urls(shards)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle, self.shuffle_buffer, self.infinite = shuffle, shuffle_buffer, infinite
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.slots_per_rank = max(1, num_workers)
        self._workers = [(0, 0)] * self.slots_per_rank  # per logical worker: (epoch, samples consumed)
        self._seeks: list[Seek | None] = [None] * self.slots_per_rank  # per logical worker: its block's start
        self._next_worker = 0
        # corrupt samples are skipped and counted (this process's lifetime); past this fraction: an error
        self.max_bad_fraction, self.samples_seen, self.samples_bad = max_bad_fraction, 0, 0

    # -- subclasses
    def decode_batch(self, batch: list[tuple[dict, int]]) -> dict[str, Any]:
        raise NotImplementedError

    def finish_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = [(e, p, seek) for (e, p), seek in zip(self._workers, self._seeks)]
        dataset = _SlotDataset(self.urls, self, start, self._next_worker)
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **kwargs)
        start_epoch = min(e for e, _ in self._workers)
        for batch in loader:
            worker = batch.pop("_worker")
            self._count_bad(batch.pop("_bad"), batch.pop("_seen"))
            self._workers[worker] = (batch.pop("_epoch"), batch.pop("_pos"))
            self._seeks[worker] = batch.pop("_seek")
            self._next_worker = (worker + 1) % self.slots_per_rank
            yield self.finish_batch(batch)
        if not self.infinite:  # a completed finite pass: the next iter() is the next epoch
            self.set_epoch(start_epoch + 1)

    def _count_bad(self, reasons: list[str], seen: int) -> None:
        self.samples_seen += seen
        self.samples_bad += len(reasons)
        # judged over at least 1000 samples, so that one bad sample early on is not a rate of 1/k
        if reasons and self.samples_bad > self.max_bad_fraction * max(self.samples_seen, 1000):
            raise ShardError(f"{self.samples_bad} of {self.samples_seen} samples read could not be decoded, more than "
                             f"max_bad_fraction={self.max_bad_fraction}; latest: {reasons[-1]}")

    @property
    def epoch(self) -> int:
        """The earliest epoch any of this rank's workers is in."""
        return min(e for e, _ in self._workers)

    def set_epoch(self, epoch: int) -> None:
        """Start every worker at the beginning of ``epoch`` (finite mode: the next pass)."""
        self._workers = [(epoch, 0)] * self.slots_per_rank
        self._seeks = [None] * self.slots_per_rank
        self._next_worker = 0

    # -- resume
    def _fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.urls).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "infinite": self.infinite, "shards": self._fingerprint(), "num_shards": len(self.urls),
                "workers": [list(w) for w in self._workers], "next_worker": self._next_worker,
                "seeks": [list(s) if s is not None else None for s in self._seeks]}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        mine = self.state_dict()
        keys = ("seed", "rank", "world_size", "num_workers", "shuffle", "shuffle_buffer", "infinite", "shards")
        diff = {k: (state.get(k), mine[k]) for k in keys if state.get(k) != mine[k]}
        if diff and strict:
            shown = ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"loader state does not match this loader ({shown}); pass strict=False to restart "
                             f"at the beginning of the earliest saved epoch")
        if diff:
            self.set_epoch(min(e for e, _ in state["workers"]))
            return
        self._workers = [(int(e), int(p)) for e, p in state["workers"]]
        # where each worker's block starts; a state without them (older) re-reads its epoch up to the position
        seeks = state.get("seeks") or [None] * self.slots_per_rank
        self._seeks = [tuple(int(x) for x in s) if s is not None else None for s in seeks]
        self._next_worker = int(state["next_worker"])


def _caption(sample: dict, url: str) -> str:
    if "txt" not in sample:
        raise ShardError(f"{url}: sample {sample['__key__']!r} has no .txt caption (has {_exts(sample)})")
    try:
        return sample["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardError(f"{url}: sample {sample['__key__']!r}: caption is not UTF-8 ({e})") from None


def _exts(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


class ImageShardLoader(ShardLoader):
    """Image shards -> ``{"images": (B,3,size,size) float in [0,1], "captions", "keys"}``.

    ``mode``: "dvae" (Listing 1), "prior" (Listing 2) or "eval" (deterministic centre crop), see
    :mod:`dalle_ds.data.augment`. Workers send uint8 images; the float conversion happens in the caller.
    """

    def __init__(self, shards: str | list[str], batch_size: int, *, mode: str = "dvae", size: int = 256, **kw):
        self.augment = Augment(mode, size)
        super().__init__(shards, batch_size, **kw)
        check_image_manifest(self.urls)

    def decode_batch(self, batch: list[tuple[dict, int]]) -> dict[str, Any]:
        images, captions, keys = [], [], []
        for sample, epoch in batch:
            url, key = sample["__url__"], sample["__key__"]
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                raise ShardError(f"{url}: sample {key!r} has no image ({'/'.join(IMAGE_EXTS)}; has {_exts(sample)})")
            try:
                img = Image.open(io.BytesIO(sample[ext]))
                img.load()
            except Exception as e:  # noqa: BLE001 - re-raised naming shard and key
                raise ShardError(f"{url}: sample {key!r}: cannot decode .{ext} ({type(e).__name__}: {e})") from e
            images.append(self.augment(img, random.Random(_seed("aug", self.seed, epoch, key))))
            captions.append(_caption(sample, url))
            keys.append(key)
        # numpy, not torch: single-threaded, so it does not contend with the training threads.
        stacked = np.stack([x.numpy() for x in images])  # (B, 3, H, W) uint8
        return {"images": torch.from_numpy(stacked), "captions": captions, "keys": keys}

    def finish_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = np.divide(batch["images"].numpy(), np.float32(255.0), dtype=np.float32)
        batch["images"] = torch.from_numpy(images)  # (B, 3, H, W) float in [0, 1]
        return batch


class TokenShardLoader(ShardLoader):
    """Token shards -> ``{"text": (B,text_len) int64, "codes": (B,grid*grid) int64, "captions", "keys"}``.

    ``tokenizer`` is anything with ``encode(captions, dropout=...) -> LongTensor (B, text_len)``
    (``dalle_ds.data.tokenizer.TextTokenizer``); text is tokenized in the workers with BPE dropout
    ``bpe_dropout``. Codes are checked: grid*grid of them, each < ``codebook_size``.

    ``views`` (paper Listing 2, ``tokenize_images --views K``): each ``.codes`` holds K augmented views
    of its image (view-major); epoch e uses view ``e % views``, so an image is seen under another crop
    each epoch and a resumed loader (whose state holds the epoch) picks the same view. ``use_views``
    < views uses only the first ones (1: view 0, the centre crop).
    """

    def __init__(self, shards: str | list[str], batch_size: int, *, tokenizer: Any, grid: int,
                 codebook_size: int, bpe_dropout: float = 0.0, views: int = 1, use_views: int = 0, **kw):
        self.tokenizer, self.grid, self.codebook_size, self.bpe_dropout = tokenizer, grid, codebook_size, bpe_dropout
        if views < 1 or not 0 <= use_views <= views:
            raise ValueError(f"views={views}, use_views={use_views}: need views >= 1 and 0 <= use_views <= views")
        self.views, self.use_views = views, (use_views or views)
        super().__init__(shards, batch_size, **kw)

    def select_view(self, sample: dict, epoch: int) -> dict:
        """The sample with ``codes`` cut to view ``epoch % use_views`` of its ``views`` stored views."""
        n, raw = 2 * self.grid * self.grid, sample.get("codes")
        if raw is None:
            return sample
        if len(raw) != n * self.views:
            raise ShardError(f"{sample['__url__']}: sample {sample['__key__']!r}: .codes has {len(raw)} bytes, "
                             f"expected {n * self.views} ({self.views} views of grid {self.grid}x{self.grid} uint16)")
        v = epoch % self.use_views
        return {**sample, "codes": raw[v * n:(v + 1) * n]}

    def decode_batch(self, batch: list[tuple[dict, int]]) -> dict[str, Any]:
        codes, captions, keys, epochs = [], [], [], []
        n = self.grid * self.grid
        if self.views > 1:
            batch = [(self.select_view(sample, epoch), epoch) for sample, epoch in batch]
        for sample, epoch in batch:
            url, key = sample["__url__"], sample["__key__"]
            if "codes" not in sample:
                raise ShardError(f"{url}: sample {key!r} has no .codes (has {_exts(sample)})")
            raw = sample["codes"]
            if len(raw) != 2 * n:
                raise ShardError(f"{url}: sample {key!r}: .codes has {len(raw)} bytes, expected {2 * n} "
                                 f"(grid {self.grid}x{self.grid} uint16)")
            c = np.frombuffer(raw, dtype="<u2")
            if int(c.max()) >= self.codebook_size:
                raise ShardError(f"{url}: sample {key!r}: code {int(c.max())} >= codebook size {self.codebook_size}")
            codes.append(torch.from_numpy(c.astype(np.int64)))
            captions.append(_caption(sample, url))
            keys.append(key)
            epochs.append(epoch)
        if self.bpe_dropout:  # keyed: a resumed loader tokenizes exactly as an uninterrupted one
            text = self.tokenizer.encode(captions, dropout=self.bpe_dropout,
                                         seeds=bpe_seeds(self.seed, epochs, keys))  # (B, text_len)
        else:
            text = self.tokenizer.encode(captions, dropout=0.0)  # (B, text_len)
        return {"text": text.long(), "codes": torch.stack(codes), "captions": captions, "keys": keys}


def bpe_seeds(seed: int, epochs: list[int], keys: list[str]) -> list[int]:
    """One BPE-dropout seed per sample, a function of (loader seed, epoch, sample key) only."""
    return [_seed("bpe", seed, e, k) for e, k in zip(epochs, keys)]


# ---------------------------------------------------------------- token manifests


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def check_token_manifest(shards_spec: str | list[str], expected_grid: int, expected_codebook: int,
                         expected_dvae_hash: str | None = None) -> list[dict[str, Any]]:
    """Refuse token shards made for another dVAE: read ``manifest.json`` next to the shards (every
    folder they come from) and compare its ``grid_size``, ``codebook_size`` and ``dvae_hash``;
    shards that the manifest does not list are refused too. Returns the manifests."""
    urls = storage.expand_urls(shards_spec)
    manifests = []
    for folder in sorted({_folder(u) for u in urls}):
        path = storage.join(folder, MANIFEST)
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: no manifest.json next to the token shards {shards_spec!r} "
                                    f"(data_prep/tokenize_images.py writes it)")
        m = storage.read_json(path)
        for field, want in (("grid_size", expected_grid), ("codebook_size", expected_codebook),
                            ("dvae_hash", expected_dvae_hash)):
            if want is None:
                continue
            if field not in m:
                raise ValueError(f"{path}: manifest has no {field!r} (keys: {sorted(m)})")
            if m[field] != want:
                raise ValueError(f"{path}: token shards were made with {field}={m[field]!r}, "
                                 f"this run expects {want!r}: re-tokenize with this dVAE or fix the config")
        _refuse_unlisted(path, m, [u for u in urls if _folder(u) == folder])
        manifests.append(m)
    return manifests


def check_image_manifest(urls: list[str]) -> list[dict[str, Any]]:
    """Image shards from data_prep/shard_corpus.py (or any producer writing ``manifest.json``):
    where a folder has a manifest, every shard read from it must be listed there (an unfinished
    job's or a foreign job's tars are refused) and it must not describe token shards; a folder
    without a manifest but with ``_progress/job.json`` is an unfinished job and is refused. Plain
    webdataset folders (no manifest, no job) are read as they are. Returns the manifests found."""
    manifests = []
    for folder in sorted({_folder(u) for u in urls}):
        path = storage.join(folder, MANIFEST)
        if not storage.exists(path):
            job = storage.join(storage.join(folder, "_progress"), "job.json")
            if storage.exists(job):
                raise ValueError(f"{folder}: an unfinished shard job ({job}, no {MANIFEST} yet); "
                                 "finish it (re-run the same command) before reading its shards")
            continue
        m = storage.read_json(path)
        if str(m.get("format", "")).startswith("dalle-ds/token-shards"):
            raise ValueError(f"{path}: these are token shards ({m['format']}), not image shards")
        _refuse_unlisted(path, m, [u for u in urls if _folder(u) == folder])
        manifests.append(m)
    return manifests


def _refuse_unlisted(path: str, manifest: dict[str, Any], urls: list[str]) -> None:
    """Every shard read from a folder with a manifest must be listed in it (else: unfinished or foreign)."""
    listed = _manifest_shard_names(manifest)
    if listed is not None:
        missing = [u for u in urls if u.rsplit("/", 1)[-1] not in listed]
        if missing:
            raise ValueError(f"{path}: shards not listed in the manifest (unfinished or foreign): {missing[:5]}")


def _manifest_shard_names(m: dict[str, Any]) -> set[str] | None:
    shards = m.get("shards")
    if isinstance(shards, dict):
        return {str(k).rsplit("/", 1)[-1] for k in shards}
    if isinstance(shards, list):
        names = set()
        for s in shards:
            name = (s.get("name") or s.get("shard") or s.get("url")) if isinstance(s, dict) else s
            names.add(str(name).rsplit("/", 1)[-1])
        return names
    return None


__all__ = ["ImageShardLoader", "TokenShardLoader", "ShardLoader", "ShardError", "check_token_manifest",
           "check_image_manifest", "bpe_seeds",
           "holdout_split", "slot_plan", "epoch_order", "iter_shard", "shard_samples"]
