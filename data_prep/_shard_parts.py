"""shard_corpus on many machines: split the inputs into parts, then merge the parts (finalize).

Split (:func:`split_sources`). The inputs are cut into units in input order — each tar file,
each table file, each image (with its caption) of a folder — and part ``p`` of ``n`` takes the
contiguous range ``[U*p//n, U*(p+1)//n)``. So the parts, concatenated in order, are the input
order of a single run. Part ``p`` is an ordinary shard_corpus output in ``OUT/part-PPPPP/``
(its own manifest, resume, duplicate filter).

Finalize (:func:`finalize`). The parts apply every filter that looks at one sample alone and
leave those that judge a sample against earlier kept ones (exact duplicates, ``--phash-distance``
near-duplicates, ``--max-caption-repeats``) to finalize: it reads the parts' samples in input order,
applies them exactly as a single run does (:meth:`SeenHashes.check` / ``keep``) and rewrites a
shard that held a dropped sample without it;
``OUT/manifest.json`` lists every part's shards (``part-PPPPP/NAME``), the summed drop counts and
``OUT/rejects.jsonl`` (the parts' rejects, then finalize's drops). Before a shard is
rewritten its decision is recorded in ``OUT/_finalize/``, so a killed finalize re-run reaches
the same verdicts (and redoes a rewrite the kill interrupted). Memory: the duplicate filter is an sqlite file (:class:`SeenHashes`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile

from dalle_ds.data import storage
from dalle_ds.data.shards import MANIFEST, ShardWriter, build_manifest, count_drops, write_manifest
from data_prep._shard_inputs import Source, _folder_groups
from data_prep._shard_filters import caption_key
from data_prep._shard_state import OrderRules, SeenHashes, local_state_path

FINALIZE = "_finalize"


def part_folder(out: str, part: int) -> str:
    return storage.join(out, f"part-{part:05d}")


def split_sources(sources: list[Source], part: int, num_parts: int) -> list[Source]:
    """The sources of part ``part`` of ``num_parts``: a contiguous range of the input units."""
    units: list[tuple[int, list[tuple[str, int]]]] = []  # (source index, its files)
    for i, s in enumerate(sources):
        if s.kind == "folder":
            size = dict(s.files)
            for url, caption in _folder_groups(s):
                units.append((i, [(url, size[url])] + ([(caption, size[caption])] if caption else [])))
        else:  # a tar or a table file is one unit
            units += [(i, [f]) for f in s.files]
    lo, hi = len(units) * part // num_parts, len(units) * (part + 1) // num_parts
    out: list[Source] = []
    for i, files in units[lo:hi]:
        if not out or out[-1].url != sources[i].url or getattr(out[-1], "_index", None) != i:
            out.append(Source(sources[i].kind, sources[i].url, []))
            out[-1]._index = i  # type: ignore[attr-defined]
        out[-1].files += files
    for s in out:
        s.files.sort()
    return out


def _samples(url: str):
    """(key, {ext: bytes}) of a shard, streamed in order."""
    key, members = None, {}
    with storage.open_read(url) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for m in tar:
            k, _, ext = m.name.partition(".")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(m).read()
    if key is not None:
        yield key, members


def finalize(out: str, num_parts: int, fmt: str, reasons: tuple[str, ...]) -> dict:
    parts = [part_folder(out, p) for p in range(num_parts)]
    missing = [p for p in parts if not storage.exists(storage.join(p, MANIFEST))]
    if missing:
        raise SystemExit(f"finalize: {len(missing)} part(s) not finished: {missing[:8]}; run them first")
    manifests = [storage.read_json(storage.join(p, MANIFEST)) for p in parts]
    fp = hashlib.sha256(json.dumps([m["input_fingerprint"] for m in manifests]).encode()).hexdigest()
    if storage.exists(storage.join(out, MANIFEST)):
        done = storage.read_json(storage.join(out, MANIFEST))
        if done.get("input_fingerprint") == fp:
            print(f"{storage.join(out, MANIFEST)}: already finalized ({done['samples']} samples); nothing to do")
            return done
    tag = fp[:16]
    rules = _rules_of(manifests)
    db = local_state_path(out, "finalize-dedupe.sqlite")
    SeenHashes.remove_files(db)  # rebuilt from the shards every run: decisions come from the records
    seen = SeenHashes(db, tag, rules)
    shards, drops, n_dropped = [], count_drops(reasons, *(m["dropped"] for m in manifests)), 0
    offsets = [sum(m["inputs"] for m in manifests[:p]) for p in range(num_parts)]  # a part's first global index
    spool = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8")  # finalize's drops
    for p, (folder, m) in enumerate(zip(parts, manifests)):
        for sh in m["shards"]:
            url = storage.join(folder, sh["name"])
            record_url = storage.join(storage.join(out, FINALIZE), f"part-{p:05d}-{sh['name']}.json")
            record = storage.read_json(record_url) if storage.exists(record_url) else None
            decided = {r["key"] for r in record["duplicates"]} if record else set()
            found, kept, stale = [], 0, False
            for key, members in _samples(url):
                if key in decided:  # recorded as dropped, still in the shard: killed before the rewrite
                    stale = True
                    continue
                meta = json.loads(members["json"])
                caption = caption_key(members["txt"].decode("utf-8"))
                phash = int(meta["phash"], 16) if "phash" in meta else None
                verdict = None if record else seen.check(meta["pixel_hash"], caption, phash)
                if verdict is None:
                    seen.keep(meta["pixel_hash"], caption, phash, 0)
                    kept += 1
                else:
                    found.append({"key": key, "index": offsets[p] + int(key), "source": meta["source"],
                                  "reason": verdict[0], "detail": verdict[1]})
            if record is None:
                record = {"duplicates": found, "samples": kept}
                storage.write_json_atomic(record_url, record)
                if found:
                    _rewrite(folder, sh["name"], {r["key"] for r in found})
            elif stale:
                _rewrite(folder, sh["name"], decided)
            for r in record["duplicates"]:
                drops[r["reason"]] += 1
                spool.write(json.dumps({k: v for k, v in r.items() if k != "key"}, ensure_ascii=False) + "\n")
            n_dropped += len(record["duplicates"])
            shards.append({"name": f"part-{p:05d}/{sh['name']}", "samples": record["samples"]})
    seen.close()
    SeenHashes.remove_files(db)
    spool.close()
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as rej:
        for folder, offset in zip(parts, offsets):  # a part's indices count from its own first input
            with storage.open_read(storage.join(folder, "rejects.jsonl")) as f:
                for line in io.TextIOWrapper(f, encoding="utf-8"):
                    r = json.loads(line)
                    r["index"] += offset
                    rej.write(json.dumps(r, ensure_ascii=False) + "\n")
        with open(spool.name, encoding="utf-8") as f:
            shutil.copyfileobj(f, rej, 1 << 20)
    storage.upload_file(rej.name, storage.join(out, "rejects.jsonl"))
    os.remove(rej.name)
    os.remove(spool.name)
    config = {"num_parts": num_parts, "parts": [m["config"] for m in manifests]}
    modified = {"caption_truncated": sum(m.get("modified", {}).get("caption_truncated", 0) for m in manifests)}
    manifest = build_manifest(fmt, "data_prep/shard_corpus.py --finalize", shards, drops, "rejects.jsonl", config, fp,
                              modified=modified)
    expected = sum(m["inputs"] for m in manifests)
    if manifest["inputs"] != expected:
        raise RuntimeError(f"internal error: merged inputs {manifest['inputs']} != parts' inputs {expected}")
    url = write_manifest(out, manifest)
    for name in storage.listdir(storage.join(out, FINALIZE)):
        storage.remove(storage.join(storage.join(out, FINALIZE), name))
    if not storage.is_s3(out) and os.path.isdir(storage.join(out, FINALIZE)):
        os.rmdir(storage.join(out, FINALIZE))
    print(f"{url}: {num_parts} part(s), kept {manifest['samples']} of {manifest['inputs']} inputs in "
          f"{len(shards)} shard(s); {n_dropped} removed by the order-dependent filters")
    return manifest


def _rules_of(manifests: list[dict]) -> OrderRules:
    """The order-dependent filters the parts were run with (they must agree: one job split in parts)."""
    rules = {json.dumps({k: m["config"].get(k) for k in ("phash_distance", "max_caption_repeats")}, sort_keys=True)
             for m in manifests}
    if len(rules) != 1:
        raise SystemExit(f"finalize: the parts were run with different --phash-distance / --max-caption-repeats: "
                         f"{sorted(rules)}")
    return OrderRules(**json.loads(rules.pop()))


def _rewrite(folder: str, name: str, drop_keys: set[str]) -> None:
    """The shard without the samples ``drop_keys``, published whole in its place (deterministic bytes)."""
    writer = ShardWriter(folder, name + ".dedup")
    for key, members in _samples(storage.join(folder, name)):
        if key not in drop_keys:
            writer.add(key, members)
    writer.name, writer.url = name, storage.join(folder, name)
    writer.finish()
