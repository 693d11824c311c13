"""Shard an image-caption corpus into webdataset tars (local folder or s3:// prefix).

    python data_prep/shard_corpus.py --input corpus/ --output data/shards --samples-per-shard 5000 --workers 4
    python data_prep/shard_corpus.py --input s3://raw/pairs.tsv --output s3://bucket/shards/ --s3-endpoint http://...

Inputs (one or more, in the order given): folder trees of images with same-stem ``.txt``
captions, TSV/CSV/JSONL tables (image path + caption columns), or webdataset / img2dataset
tars; each may be local or ``s3://`` (see ``_shard_inputs.py``). Output: ``{prefix}-000000.tar``...
with ``<key>.jpg`` (RGB, shorter side ``--image-size``), ``<key>.txt`` (whitespace-normalised
UTF-8), ``<key>.json`` (source, original width/height, mode, pixel hash); ``rejects.jsonl``
(one line per dropped input with its reason); ``manifest.json``, written last.

Determinism: samples are processed in input order (workers only decode/resize/encode, results
are consumed in order), the first of several identical images is kept, and a shard is closed
every ``--samples-per-shard`` kept samples, so the shards are a pure function of the input and
the config, byte for byte, whatever ``--workers`` is (tar headers carry fixed mtime/uid/mode:
:class:`dalle_ds.data.shards.ShardWriter`).

Resume (the scheme of :class:`dalle_ds.data.shards.Progress`, shared with tokenize_images): each
finished shard is renamed into place (or uploaded whole to S3), then its progress record
``_progress/{prefix}-NNNNNN.tar.json`` stores the next input index, the drops and the pixel
hashes of its samples. A re-run (after ``kill -9`` at any point) skips the recorded shards,
brings the duplicate filter in line with them and goes on from the next input. ``manifest.json``
is written after everything else; a re-run against a finished output does nothing.

Memory does not grow with the corpus (``_shard_state.py``): the duplicate filter is an sqlite
file, rejects stream to disk as they occur and are concatenated into ``rejects.jsonl`` at the end.
Credentials come from boto3's standard chain and are never printed or stored.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import re
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from dalle_ds.cli_args import Parser, run  # noqa: E402
from dalle_ds.config import ConfigError, at_least  # noqa: E402
from dalle_ds.data import storage  # noqa: E402
from dalle_ds.data.shards import (  # noqa: E402
    MANIFEST, Progress, ShardWriter, build_manifest, count_drops, write_manifest,
)
from data_prep._shard_parts import finalize, part_folder, split_sources  # noqa: E402
from data_prep._shard_filters import caption_key  # noqa: E402
from data_prep._shard_state import OrderRules, ResumeState, shard_name  # noqa: E402
from data_prep._shard_inputs import Source, discover, fingerprint, iter_items, known_count  # noqa: E402
from data_prep._shard_sample import (  # noqa: E402
    DEFAULT_BOILERPLATE, DROP_REASONS, Item, Outcome, SampleConfig, meta_bytes, process, process_batch,
)

FORMAT = "dalle-ds/image-shards/1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", help="folders, tables (.tsv/.csv/.jsonl), tars; local or s3://")
    p.add_argument("--output", required=True, help="output folder or s3://bucket/prefix/")
    p.add_argument("--samples-per-shard", type=at_least(1), default=10000)
    p.add_argument("--workers", type=at_least(1), default=max(1, (os.cpu_count() or 1) - 1))
    p.add_argument("--image-size", type=at_least(1), default=384, help="shorter side of the stored images")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--min-size", type=at_least(1), default=64, help="drop images whose shorter side is smaller")
    p.add_argument("--max-aspect", type=at_least(1, float), default=2.0,
                   help="drop images with long/short side above this")
    p.add_argument("--min-caption-words", type=at_least(1), default=2)
    p.add_argument("--max-caption-bytes", type=at_least(1), default=2048,
                   help="captions longer than this (UTF-8 bytes, after whitespace normalisation) are cut or dropped")
    p.add_argument("--long-captions", choices=("truncate", "drop"), default="truncate",
                   help="truncate (at a word boundary; counted as caption_truncated) or drop (caption_too_long)")
    p.add_argument("--boilerplate-pattern", action="append", default=[], metavar="REGEX",
                   help="drop captions matching this (case-insensitive search; repeatable) as caption_boilerplate")
    p.add_argument("--no-default-boilerplate", action="store_true",
                   help="do not use the built-in boilerplate patterns (_shard_sample.DEFAULT_BOILERPLATE)")
    p.add_argument("--languages", nargs="+", default=[], metavar="CODE",
                   help="keep only captions detected (py3langid) as one of these ISO 639-1 codes, e.g. en; "
                        "others are dropped as caption_language (default: any language)")
    p.add_argument("--min-language-confidence", type=float, default=0.0,
                   help="with --languages: also drop captions whose detected language has probability below this "
                        "(short captions score low: 0.1-0.6 for 4-word English)")
    p.add_argument("--max-caption-repeats", type=at_least(1), default=None, metavar="N",
                   help="keep the first N samples (input order) of each caption (case-insensitive); later ones are "
                        "dropped as caption_repeated (default: no limit)")
    p.add_argument("--phash-distance", type=int, default=None, metavar="D",
                   help="drop an image whose 64-bit pHash is within D bits of an earlier kept image's as "
                        "near_duplicate (0-16; 0 = equal pHash; default: off)")
    p.add_argument("--max-pixels", type=at_least(1), default=1 << 26, help="decompression-bomb cap on width*height")
    p.add_argument("--max-file-mb", type=float, default=64.0)
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--image-column", default=None, help="table column with image paths (default: image, path, ...)")
    p.add_argument("--caption-column", default=None, help="table column with captions (default: caption, text, ...)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true", help="replace an output made from other inputs or config")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--part", type=int, default=None, help="this machine's part (default: SLURM array element)")
    p.add_argument("--num-parts", type=int, default=None,
                   help="split the inputs over this many machines; each writes OUTPUT/part-NNNNN/ "
                        "(default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--finalize", action="store_true",
                   help="after all parts: merge their manifests into OUTPUT/manifest.json, drop cross-part duplicates")
    args = p.parse_args(argv)
    if not args.input and not args.finalize:
        p.error("--input is required (except with --finalize)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.prefix):
        p.error(f"--prefix={args.prefix!r}: use letters, digits, '-' and '_' only")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint  # workers inherit it; never written anywhere
    try:
        cfg, rules = _filters(args)
    except ValueError as e:  # an unknown language code, a distance out of range: one error line, exit 2
        raise ConfigError(str(e)) from None
    config = {"inputs": args.input, "samples_per_shard": args.samples_per_shard, "prefix": args.prefix,
              "image_column": args.image_column, "caption_column": args.caption_column, **asdict(cfg),
              **asdict(rules)}
    for key in ("boilerplate", "languages"):  # as JSON holds them, so a re-run compares equal
        config[key] = list(config[key])

    out = args.output.rstrip("/")
    part, num_parts = _array_part(args.part, args.num_parts)
    if args.finalize:
        return finalize(out, num_parts, FORMAT, DROP_REASONS)
    if num_parts > 1:  # this machine's contiguous share of the inputs, in its own sub-folder
        out = part_folder(out, part)
        config.update(part=part, num_parts=num_parts)
    sources = _cached_listing(out, config)  # an unfinished job goes on with the listing it began with
    listed = sources is None
    if listed:
        sources = discover(args.input)
        if num_parts > 1:
            sources = split_sources(sources, part, num_parts)
    fp = fingerprint(sources)
    job = {"config": config, "input_fingerprint": fp}
    done = _check_output(out, config, fp, args.overwrite)
    if done is not None:
        Progress(out).clear()  # leftovers of a run killed between the manifest and this clean-up
        print(f"{storage.join(out, MANIFEST)}: already complete ({done['samples']} samples, "
              f"{len(done['shards'])} shards); nothing to do")
        return done
    if listed:
        storage.write_json_atomic(storage.join(Progress(out).folder, LISTING),
                                  {"config": config, "sources": [[s.kind, s.url, s.files] for s in sources]})

    # The filters that judge a sample against earlier kept ones (duplicates, near-duplicates, repeated
    # captions) run here for a single run; a part leaves them to --finalize, which applies them to the
    # parts' samples in input order: an earlier part's verdicts change which later samples are kept,
    # so only the merge can reproduce a single run exactly.
    judge_here = num_parts == 1
    state = ResumeState.load(out, args.prefix, job, rules if judge_here else OrderRules())
    total = known_count(sources)
    if state.records:
        print(f"resuming after {len(state.records)} finished shard(s) at input {state.next_item}"
              + (f" of {total}" if total is not None else ""))
    # a resume starts at the unit (tar, table, image) holding the next sample: what came before is not read
    items = (it for it in iter_items(sources, args.image_column, args.caption_column, start=state.cursor,
                                     on_unit=state.unit_begins) if it.index >= state.next_item)
    tqdm.monitor_interval = 0  # no monitor thread: the worker pool forks
    bar = tqdm(total=total, initial=state.next_item, unit="img", smoothing=0.05, mininterval=0.5,
               disable=args.no_progress, desc="shard_corpus")
    n_items, n_dropped = state.next_item, sum(sum(r["drops"].values()) for r in state.records)
    try:
        writer: ShardWriter | None = None
        for outcome in _run(items, cfg, args.workers):
            n_items = outcome.index + 1
            bar.update(1)
            caption = caption_key(outcome.txt.decode("utf-8")) if outcome.reason is None else b""
            if outcome.reason is None and judge_here:
                verdict = state.seen.check(outcome.pixel_hash, caption, outcome.phash)
                if verdict is not None:
                    outcome.reason, outcome.detail = verdict
            if outcome.reason is not None:
                state.drop(outcome)
                n_dropped += 1
                continue
            if writer is None:
                writer = ShardWriter(out, shard_name(args.prefix, state.shard_index))
            writer.add(f"{outcome.index:09d}",
                       {"jpg": outcome.jpg, "txt": outcome.txt, "json": meta_bytes(outcome.meta)})
            state.keep(outcome.pixel_hash, outcome.truncated, caption, outcome.phash)
            if writer.count == args.samples_per_shard:
                state.finish(writer, next_item=n_items)
                writer = None
            if bar.n % 64 == 0:
                bar.set_postfix(kept=n_items - n_dropped, dropped=n_dropped, refresh=False)
        if writer is not None:
            state.finish(writer, next_item=n_items)
    except BaseException:  # Ctrl-C, an error: the open shard is not finished; release the filter file
        state.close()
        raise
    bar.close()
    return _finalise(out, state, config, fp, n_items)


def _filters(args: argparse.Namespace) -> tuple[SampleConfig, OrderRules]:
    cfg = SampleConfig(image_size=args.image_size, min_size=args.min_size, max_aspect=args.max_aspect,
                       min_caption_words=args.min_caption_words, max_pixels=args.max_pixels,
                       max_file_bytes=int(args.max_file_mb * (1 << 20)), jpeg_quality=args.jpeg_quality,
                       max_caption_bytes=args.max_caption_bytes, long_caption=args.long_captions,
                       boilerplate=(() if args.no_default_boilerplate else DEFAULT_BOILERPLATE)
                       + tuple(args.boilerplate_pattern), languages=tuple(args.languages),
                       min_language_confidence=args.min_language_confidence, phash=args.phash_distance is not None)
    rules = OrderRules(phash_distance=args.phash_distance, max_caption_repeats=args.max_caption_repeats)
    return cfg, rules


# ---------------------------------------------------------------- workers


def _batched(items: Iterable[Item], n: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def _run(items: Iterable[Item], cfg: SampleConfig, workers: int, batch: int = 8) -> Iterator[Outcome]:
    """Outcomes in input order; with workers > 1 the decoding runs in a process pool with a
    bounded number of batches in flight (so big tar inputs are not read ahead without limit)."""
    if workers == 1:
        for item in items:
            yield process(item, cfg)
        return
    # fork: workers start in milliseconds with everything imported. It is safe here because the
    # parent has no other threads yet (tqdm's monitor thread is off; the pool forks all workers
    # on the first submit, before its own manager thread starts).
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _batched(items, batch):
            pending.append(pool.submit(process_batch, chunk, cfg))
            while len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _die_with_parent(parent: int) -> None:
    """Workers of a killed (kill -9) job must not linger: ask Linux to SIGKILL them with it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such guard there
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


# ---------------------------------------------------------------- shards and resume (dalle_ds.data.shards)


def _check_output(out: str, config: dict, fp: str, overwrite: bool) -> dict | None:
    """The finished manifest if this exact job is already done; refuse to mix different jobs."""
    manifest_url, progress = storage.join(out, MANIFEST), Progress(out)
    mine = {"config": config, "input_fingerprint": fp}
    if storage.exists(manifest_url):
        old = storage.read_json(manifest_url)
        if {"config": old.get("config"), "input_fingerprint": old.get("input_fingerprint")} == mine:
            return old
        if not overwrite:
            raise SystemExit(f"{manifest_url}: made from other inputs or config; use --overwrite or another --output")
        for shard in old.get("shards", []):
            storage.remove(storage.join(out, shard["name"]))
        storage.remove(manifest_url)
    resuming = storage.exists(progress.job_url) and storage.read_json(progress.job_url) == mine
    if not resuming and storage.exists(progress.job_url):
        if not overwrite:
            raise SystemExit(f"{progress.job_url}: an unfinished job with other inputs or config is in this output; "
                             "use --overwrite or another --output")
        progress.clear()
    ours = re.compile(rf"{re.escape(config['prefix'])}-[0-9]{{6}}\.tar")
    # a resumed job's own shards are {prefix}-NNNNNN.tar; a new job owns no tar yet
    foreign = [n for n in _tars(out) if not (resuming and ours.fullmatch(n))]
    if foreign:
        if not overwrite:
            raise SystemExit(f"{out}: holds {len(foreign)} .tar file(s) this job did not write "
                             f"({', '.join(foreign[:8])}{', ...' if len(foreign) > 8 else ''}); "
                             "use --overwrite to remove them, or another --output")
        for name in foreign:
            storage.remove(storage.join(out, name))
    progress.claim(mine)
    return None


LISTING = "listing.json"


def _cached_listing(out: str, config: dict) -> list[Source] | None:
    """The input listing an unfinished job with this config recorded (``_progress/listing.json``):
    a resume neither lists the inputs again nor sees files added since the job began."""
    url = storage.join(Progress(out).folder, LISTING)
    if not storage.exists(url):
        return None
    cached = storage.read_json(url)
    if cached.get("config") != config:
        return None
    print(f"{url}: inputs as listed when this job began")
    return [Source(kind, src, [(f, int(n)) for f, n in files]) for kind, src, files in cached["sources"]]


def _array_part(part: int | None, num_parts: int | None) -> tuple[int, int]:
    """(part, parts) from the flags, else the SLURM job array, else (0, 1)."""
    from dalle_ds.parallel.dist import slurm_array_part

    try:
        array = slurm_array_part() if part is None and num_parts is None else None
    except ValueError as e:
        raise SystemExit(f"{e} (--part / --num-parts)") from None
    part, num_parts = array if array is not None else (part or 0, num_parts or 1)
    if num_parts < 1 or not 0 <= part < num_parts:
        raise SystemExit(f"--part {part} --num-parts {num_parts}: need 0 <= part < num_parts")
    return part, num_parts


def _tars(out: str) -> list[str]:
    if not storage.is_s3(out) and not os.path.isdir(out):
        return []
    return [n for n in storage.listdir(out) if n.endswith(".tar")]


def _finalise(out: str, state: ResumeState, config: dict, fp: str, n_items: int) -> dict:
    state.write_rejects(storage.join(out, "rejects.jsonl"))
    drops = count_drops(DROP_REASONS, *(r["drops"] for r in state.records), state.drops)
    modified = {"caption_truncated": sum(r.get("truncated", 0) for r in state.records) + state.truncated}
    manifest = build_manifest(FORMAT, "data_prep/shard_corpus.py", state.records, drops, "rejects.jsonl", config, fp,
                              modified=modified)
    if manifest["inputs"] != n_items:
        raise RuntimeError(f"internal error: kept {manifest['samples']} + dropped {sum(drops.values())} "
                           f"!= inputs {n_items}")
    url = write_manifest(out, manifest)
    state.clear()
    dropped = {k: v for k, v in drops.items() if v}
    print(f"{url}: kept {manifest['samples']} of {n_items} inputs in {len(manifest['shards'])} shard(s); "
          f"dropped {sum(dropped.values())} {dropped}")
    return manifest


if __name__ == "__main__":
    raise SystemExit(run(main))
