"""Input discovery for shard_corpus: every --input becomes a deterministic stream of samples.

Kinds (picked per input):
- a ``.tar`` file / URL, or a folder / s3 prefix holding ``.tar`` files (img2dataset output):
  members grouped by key (path up to the first dot of the basename), image = the first of
  jpg/jpeg/png/webp/... present, caption = ``.txt`` (else ``caption`` in the ``.json``);
- a ``.tsv`` / ``.csv`` / ``.jsonl`` table with an image-path column and a caption column
  (relative paths are relative to the table's folder or prefix);
- a ``.parquet`` table (read in batches of rows): an image column holding bytes (img2dataset's
  parquet output: ``jpg``; Hugging Face: ``{"bytes", "path"}``) or paths, and a caption column
  (``caption``/``txt``/...). img2dataset's metadata parquet beside a ``files``-format output
  (``00000.parquet`` + ``00000/<key>.jpg``) has no image column: its ``key`` column names the
  image in the folder of the parquet's stem, and rows whose ``status`` is not ``success`` are
  ``missing_image`` with img2dataset's error message;
- otherwise a folder tree / s3 prefix of files: every file that is not ``.txt`` / ``.json`` and
  not hidden is a sample, its caption the same-stem ``.txt``; a ``.txt`` without a partner
  is a ``missing_image`` sample. ``.json`` sidecars are ignored.

A folder holding both tars and loose images is read as both: its tars, then its loose images
(with their ``.txt`` captions). Within an input, files are in sorted order; inputs in the order given. The listing's
(name, size) pairs make the input fingerprint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

from dalle_ds.data import storage
from dalle_ds.data.shards import INPUT_IMAGE_EXTS
from data_prep._shard_sample import Item

TABLE_EXTS = (".tsv", ".csv", ".jsonl", ".parquet")
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file", "filename", "url")
CAPTION_COLUMNS = ("caption", "text", "title", "prompt")
# Parquet rows may carry the image itself: img2dataset's parquet output format names the binary
# column after the encoding (jpg/png/webp); Hugging Face datasets store {"bytes", "path"} structs.
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "img") + IMAGE_COLUMNS
PARQUET_CAPTION_COLUMNS = CAPTION_COLUMNS + ("txt",)
PARQUET_BATCH_ROWS = 256  # rows decoded at a time: memory is one batch (with image bytes), not the table


@dataclass
class Source:
    kind: str  # "folder", "table" or "tar"
    url: str  # the --input as given (folder / table / tar)
    files: list[tuple[str, int]] = field(default_factory=list)  # (url, size), sorted


def list_files(url: str) -> list[tuple[str, int]]:
    """(url, size) of every file below a folder or s3 prefix, sorted by url."""
    if storage.is_s3(url):
        prefix = url if url.endswith("/") else url + "/"
        bucket, key = storage.split_s3(prefix)
        out = []
        for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [(f"s3://{bucket}/{o['Key']}", int(o["Size"])) for o in page.get("Contents", [])]
        return sorted(out)
    out = []
    for root, dirs, names in os.walk(url):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = os.path.join(root, n)
            if not n.startswith(".") and (os.path.isfile(p) or os.path.islink(p)):  # broken links: read_error
                out.append((p, os.path.getsize(p) if os.path.exists(p) else -1))
    return sorted(out)


def _size(url: str) -> int:
    if storage.is_s3(url):
        bucket, key = storage.split_s3(url)
        return int(storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(url)


def discover(inputs: list[str]) -> list[Source]:
    sources = []
    for url in inputs:
        low = url.lower()
        if low.endswith(".tar"):
            sources.append(Source("tar", url, [(url, _size(url))]))
        elif low.endswith(TABLE_EXTS):
            sources.append(Source("table", url, [(url, _size(url))]))
        else:
            files = list_files(url)
            if not files:
                raise FileNotFoundError(f"{url}: no input files (not a .tar, a table, or a non-empty folder/prefix)")
            tars = [f for f in files if f[0].lower().endswith(".tar")]
            tables = [f for f in files if f[0].lower().endswith(".parquet")]
            images = [f for f in files if _split_ext(f[0])[1] in INPUT_IMAGE_EXTS]
            if tables and not tars and not images:  # img2dataset's parquet output format: the tables are the data
                sources.append(Source("table", url, tables))
                continue
            if not tars:  # beside images, a .parquet is img2dataset's metadata (the images are the data)
                sources.append(Source("folder", url, [f for f in files if not f[0].lower().endswith(".parquet")]))
                continue
            sources.append(Source("tar", url, tars))
            # loose images (and their .txt captions) beside the tars are read too, after them;
            # img2dataset's side files (.parquet, _stats.json) are not samples
            loose = [f for f in files if _split_ext(f[0])[1] in INPUT_IMAGE_EXTS + ("txt",)]
            if loose:
                sources.append(Source("folder", url, loose))
    return sources


def fingerprint(sources: list[Source]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(json.dumps([s.kind, s.url, s.files]).encode())
    return h.hexdigest()


def known_count(sources: list[Source]) -> int | None:
    """Number of samples when known without reading tables or tars."""
    if any(s.kind != "folder" for s in sources):
        return None
    return sum(len(_folder_groups(s)) for s in sources)


def iter_items(sources: list[Source], image_column: str | None, caption_column: str | None,
               start: Cursor | None = None, on_unit: Callable[[Cursor], None] | None = None) -> Iterator[Item]:
    """Every input sample in order, indexed from 0. Units (an image of a folder, a tar, a table)
    are the steps a resume can start at without reading what came before: ``start`` = the
    :data:`Cursor` of the unit to begin with, ``on_unit`` is told each unit's cursor as it begins."""
    first_source, first_unit, index = start or (0, 0, 0)
    for si, s in enumerate(sources):
        if si < first_source:
            continue
        skip = first_unit if si == first_source else 0
        for ui, gen in enumerate(_units(s, image_column, caption_column, skip), start=skip):
            if on_unit is not None:
                on_unit((si, ui, index))
            for item in gen:
                item.index = index
                index += 1
                yield item


Cursor = tuple  # (source index, unit index within it, global index of the unit's first sample)


def _units(s: Source, image_column: str | None, caption_column: str | None, skip: int) -> Iterator[Iterator[Item]]:
    if s.kind == "folder":
        for url, caption in _folder_groups(s)[skip:]:
            yield iter([_folder_item(url, caption)])
    elif s.kind == "table":  # one table file per unit (a folder of parquet files has many)
        for url, _ in s.files[skip:]:
            yield _table_items(url, image_column, caption_column)
    else:
        for url, _ in s.files[skip:]:
            yield _tar_items(url)


# ---------------------------------------------------------------- folders


def _split_ext(url: str) -> tuple[str, str]:
    stem, ext = posixpath.splitext(url)
    return stem, ext.lower().lstrip(".")


def _folder_groups(s: Source) -> list[tuple[str, str | None]]:
    """(image url or orphan caption url, caption url or None) in sorted order."""
    captions = {_split_ext(u)[0]: u for u, _ in s.files if _split_ext(u)[1] == "txt"}
    used: set[str] = set()
    groups: list[tuple[str, str | None]] = []
    for url, _ in s.files:
        stem, ext = _split_ext(url)
        if ext in ("txt", "json"):
            continue
        groups.append((url, captions.get(stem)))
        used.add(stem)
    groups += [(u, None) for stem, u in captions.items() if stem not in used]  # orphan captions
    return sorted(groups)


def _folder_item(url: str, caption: str | None) -> Item:
    if url.lower().endswith(".txt"):
        return Item(0, url, None, None, reason="missing_image", detail="caption file without an image")
    return Item(0, url, url, caption, caption_is_url=caption is not None)


# ---------------------------------------------------------------- tables


def _resolve(base: str, path: str) -> str:
    if storage.is_s3(path) or os.path.isabs(path):
        return path
    if storage.is_s3(base):
        return posixpath.join(posixpath.dirname(base), path)
    return os.path.join(os.path.dirname(base), path)


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, url: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{url}: no {what} column {wanted!r}; columns are {columns}")
        return wanted
    for c in defaults:
        if c in columns:
            return c
    raise ValueError(f"{url}: no {what} column (looked for {list(defaults)}; columns are {columns}); "
                     f"name it with --{what}-column")


def _table_items(url: str, image_column: str | None, caption_column: str | None) -> Iterator[Item]:
    if url.lower().endswith(".parquet"):
        yield from _parquet_items(url, image_column, caption_column)
        return
    # Read as UTF-8 with surrogate escapes: a bad byte spoils only its own row's caption.
    text = io.TextIOWrapper(storage.open_read(url), encoding="utf-8", errors="surrogateescape", newline="")
    with text:
        if url.lower().endswith(".jsonl"):
            img_c, cap_c = image_column, caption_column
            rows = _jsonl_rows(text, url)
        else:
            reader = csv.reader(text, delimiter="\t" if url.lower().endswith(".tsv") else ",")
            header = next(reader, None)
            if header is None:
                return
            img_c = _pick(header, image_column, IMAGE_COLUMNS, "image", url)
            cap_c = _pick(header, caption_column, CAPTION_COLUMNS, "caption", url)
            rows = ((reader.line_num, dict(zip(header, r)) if len(r) == len(header) else r) for r in reader if r)
        for line, row in rows:
            source = f"{url}:{line}"
            if not isinstance(row, dict):
                yield Item(0, source, None, None, reason="bad_row", detail=f"cannot parse row: {str(row)[:200]}")
                continue
            path = row.get(img_c or next((c for c in IMAGE_COLUMNS if c in row), ""))
            caption = row.get(cap_c or next((c for c in CAPTION_COLUMNS if c in row), ""))
            if not isinstance(path, str) or not path.strip():
                yield Item(0, source, None, None, reason="missing_image", detail=f"no {img_c!r} value")
                continue
            if caption is not None and not isinstance(caption, str):
                caption = str(caption)
            image = path.strip() if path.strip().lower().startswith(("http://", "https://")) else _resolve(url, path.strip())
            if image.lower().startswith(("http://", "https://")):
                yield Item(0, source, None, None, reason="read_error", detail=f"{image}: URLs are not downloaded")
                continue
            yield Item(0, image, image, caption)


def _parquet_items(url: str, image_column: str | None, caption_column: str | None) -> Iterator[Item]:
    import pyarrow.parquet as pq  # imported here: 50 MB of RSS a job without parquet inputs does not need

    with _seekable(url) as f:
        table = pq.ParquetFile(f)
        columns = table.schema_arrow.names
        img_c = _pick_optional(columns, image_column, PARQUET_IMAGE_COLUMNS, "image", url)
        cap_c = _pick(columns, caption_column, PARQUET_CAPTION_COLUMNS, "caption", url)
        if img_c is None and "key" not in columns:
            raise ValueError(f"{url}: no image column (looked for {list(PARQUET_IMAGE_COLUMNS)}) and no 'key' "
                             f"column; columns are {columns}; name it with --image-column")
        wanted = [c for c in (img_c, cap_c, "key", "status", "error_message") if c and c in columns]
        folder = posixpath.splitext(url)[0] if storage.is_s3(url) else os.path.splitext(url)[0]
        row = 0
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            for r in batch.to_pylist():
                row += 1
                yield _parquet_item(url, row, r, img_c, cap_c, folder)


def _parquet_item(url: str, row: int, r: dict, img_c: str | None, cap_c: str, folder: str) -> Item:
    source = f"{url}:{row}"
    caption = r.get(cap_c)
    if caption is not None and not isinstance(caption, (str, bytes)):
        caption = str(caption)
    status = r.get("status")
    if status is not None and status != "success":  # img2dataset could not download this one
        return Item(0, source, None, None, reason="missing_image",
                    detail=f"img2dataset status {status!r}: {str(r.get('error_message'))[:200]}")
    image = r.get(img_c) if img_c else None
    if isinstance(image, dict):  # {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Item(0, source, bytes(image), caption)
    if isinstance(image, str) and image.strip():
        if not image.strip().lower().startswith(("http://", "https://")):
            path = _resolve(url, image.strip())
            return Item(0, path, path, caption)
        if r.get("key") is None:  # a URL, and no downloaded copy named by a key
            return Item(0, source, None, None, reason="read_error", detail=f"{image.strip()}: URLs are not downloaded")
    key = r.get("key")
    if key is None:
        return Item(0, source, None, None, reason="missing_image", detail=f"no {img_c!r} value")
    path = _image_beside(folder, str(key))
    if path is None:
        return Item(0, source, None, None, reason="missing_image", detail=f"no image {key}.* in {folder}")
    return Item(0, path, path, caption)


def _image_beside(folder: str, key: str) -> str | None:
    """img2dataset's ``files`` layout: ``<parquet stem>/<key>.<ext>`` (the first extension present)."""
    for ext in INPUT_IMAGE_EXTS:
        path = storage.join(folder, f"{key}.{ext}") if storage.is_s3(folder) else os.path.join(folder, f"{key}.{ext}")
        if storage.exists(path):
            return path
    return None


def _pick_optional(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str,
                   url: str) -> str | None:
    if wanted or any(c in columns for c in defaults):
        return _pick(columns, wanted, defaults, what, url)
    return None


class _seekable:
    """A local path as is; an S3 object copied to a temp file (parquet readers seek to the footer)."""

    def __init__(self, url: str):
        self.url, self.tmp = url, None

    def __enter__(self):
        if not storage.is_s3(self.url):
            return self.url
        self.tmp = tempfile.NamedTemporaryFile(suffix=".parquet")
        with storage.open_read(self.url) as body:
            shutil.copyfileobj(body, self.tmp, 1 << 20)
        self.tmp.flush()
        return self.tmp.name

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.close()


def _jsonl_rows(text, url: str) -> Iterator[tuple[int, object]]:
    for n, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = line.strip()
        yield n, row if isinstance(row, dict) else str(row)


# ---------------------------------------------------------------- tars


def _tar_key(name: str) -> tuple[str, str]:
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem), ext.lower()


def _tar_items(url: str) -> Iterator[Item]:
    group_key, members = None, {}
    try:
        with storage.open_read(url) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _tar_key(m.name)
                if key != group_key and group_key is not None:
                    yield _tar_item(url, group_key, members)
                    members = {}
                group_key = key
                f = tar.extractfile(m)
                members[ext] = f.read() if f else b""
        if group_key is not None:
            yield _tar_item(url, group_key, members)
    except Exception as e:  # noqa: BLE001 - a truncated / unreadable tar ends its stream, not the job
        yield Item(0, url, None, None, reason="read_error", detail=f"tar unreadable after {group_key!r}: "
                   f"{type(e).__name__}: {e}")


def _tar_item(url: str, key: str, members: dict[str, bytes]) -> Item:
    source = f"{url}#{key}"
    image_ext = next((e for e in INPUT_IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return Item(0, source, None, None, reason="missing_image", detail=f"members {sorted(members)}")
    caption: bytes | str | None = members.get("txt")
    if caption is None and "json" in members:
        try:
            value = json.loads(members["json"]).get("caption")
            caption = value if isinstance(value, str) else None
        except (ValueError, AttributeError):
            caption = None
    return Item(0, source, members[image_ext], caption)
