"""Pre-encode image shards into dVAE token shards for prior training (local folders or s3://).

    python data_prep/tokenize_images.py --dvae runs/dvae/export --input 'data/shards/shard-{000000..000099}.tar' \\
        --output data/tokens [--batch-size 64] [--verify 16]
    torchrun --nproc-per-node 8 data_prep/tokenize_images.py ...     # or the deepspeed launcher, or srun
    sbatch slurm/tokenize_images.sh                                    # a job array over shard ranges

Each input shard ``NAME.tar`` (``<key>.jpg/.txt/.json``) becomes ``OUTPUT/NAME.tar`` with
``<key>.codes`` (grid x grid little-endian uint16, row-major), ``<key>.txt`` (the caption, as is)
and ``<key>.json`` (the image's json plus ``source_shard``), samples in input order. Images get
the prior's deterministic preprocessing (``Augment("eval")``: centre square crop, resize to the
export's ``image_size``) and are encoded in batches by the exported dVAE (the EMA weights that
``train_dvae`` exports) in eval mode under ``torch.inference_mode``: argmax codes, no noise.
Samples whose image does not decode or whose caption is missing / not UTF-8 are dropped and
counted by reason; an unreadable shard, a missing shard or a dVAE export that does not load
stop the job before any work, naming the path.

Split. The sorted input list is cut into ``--num-parts`` contiguous ranges (default: the SLURM
job array: :func:`dalle_ds.parallel.dist.slurm_array_part`); within a part the launcher's
ranks (torchrun / deepspeed launcher RANK/WORLD_SIZE, srun SLURM_PROCID/SLURM_STEP_NUM_TASKS:
:func:`dalle_ds.parallel.dist.launch_info`) take every world_size-th shard. Processes never
talk to each other (no process group, so a slow rank cannot time out the others): every shard
has exactly one owner, and ranks of one part, array tasks and re-runs coordinate only through
the output folder.

Resume. A shard's tar is written whole (temp file + rename, or one S3 PUT), then its sidecar
``_progress/NAME.json`` (sample and drop counts, rejects); a shard is finished when its sidecar
exists. A re-run (after kill -9, preemption, a requeue) skips finished shards and redoes the
rest, so every sample ends up in the output exactly once. ``_progress/job.json`` records the
dVAE hash, image size and input list: a re-run with another dVAE or other inputs is refused.

Manifest. Whichever process finds every input shard finished (re)builds ``manifest.json`` from
the sidecars (the same bytes whoever writes it): ``grid_size``, ``codebook_size``, ``dvae_hash``
(:func:`dalle_ds.models.dvae_io.dvae_hash`), ``shards`` [{name, samples}], drop counts, config.
``--finalize`` does only that (and fails listing the unfinished shards). Prior training
refuses token shards whose manifest disagrees (:func:`dalle_ds.data.loaders.check_token_manifest`).

Verify. ``--verify K`` (rank 0 of part 0, after its shards): decodes K random finished samples
from their stored codes and reports the PSNR against the preprocessed source images (MSE over
all pixels, as ``dalle_ds.evaluate_dvae``), plus how many codes re-encoding reproduces.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dalle_ds.cli_args import Parser, run
from dalle_ds.config import at_least  # noqa: E402
from dalle_ds.data import storage  # noqa: E402
from dalle_ds.data.augment import Augment  # noqa: E402
from dalle_ds.data.loaders import iter_shard  # noqa: E402
from dalle_ds.data.shards import (  # noqa: E402
    IMAGE_EXTS, MANIFEST, PROGRESS, Progress, ShardWriter, build_manifest, count_drops, job_diff, write_manifest,
)
from dalle_ds.parallel.dist import launch_info, slurm_array_part  # noqa: E402
from dalle_ds.models.dvae_io import load_dvae  # noqa: E402
from dalle_ds.models.dvae_loss import psnr  # noqa: E402

FORMAT = "dalle-ds/token-shards/1"
DROP_REASONS = ("missing_image", "corrupt_image", "missing_caption", "caption_not_utf8")
TEST_DELAY_ENV = "DALLE_DS_TOKENIZE_TEST_DELAY"  # tests only: seconds to sleep per batch (kill -9 mid-job)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dvae", required=True, help="dVAE export folder (model.safetensors + config.json), local or s3://")
    p.add_argument("--input", required=True, help="image shards: paths, brace ranges, globs, folders, s3:// prefixes")
    p.add_argument("--output", required=True, help="token shard folder or s3://bucket/prefix/")
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--image-size", type=at_least(1), default=None, help="default: the export's image_size")
    p.add_argument("--verify", type=at_least(0), default=0, metavar="K", help="decode K random samples, report PSNR")
    p.add_argument("--views", type=at_least(1), default=1, metavar="K",
                   help="codes of K views per image: the centre crop, then K-1 prior augmentations (Listing 2)")
    p.add_argument("--view-seed", type=int, default=0, help="seed of the augmented views' random crops")
    p.add_argument("--seed", type=int, default=0, help="which samples --verify picks")
    p.add_argument("--part", type=int, default=None, help="this array part (default: SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-parts", type=int, default=None, help="array parts (default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU, else cpu), cpu, cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="encoder autocast dtype")
    p.add_argument("--workers", type=at_least(1), default=min(8, len(os.sched_getaffinity(0))),
                   help="image decode threads")
    p.add_argument("--finalize", action="store_true", help="only (re)build manifest.json from the finished shards")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # -- who am I: array part, launcher rank
    part, num_parts = array_part(args.part, args.num_parts)
    try:
        who = launch_info()  # torchrun / deepspeed launcher / srun ranks; no process group
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rank, world, local_rank, local_world = who.rank, who.world_size, who.local_rank, who.local_world_size
    tag = f"[part {part}/{num_parts} rank {rank}/{world}]"
    # -- inputs, dVAE and output, all checked before any work
    try:
        urls = storage.expand_urls(args.input)
    except FileNotFoundError as e:
        raise SystemExit(f"--input: {e}") from None
    names = check_inputs(urls, args.output)
    try:
        vae = load_dvae(args.dvae)
    except (ValueError, OSError) as e:
        raise SystemExit(f"--dvae {args.dvae}: {e}") from None
    meta = vae.export_meta
    image_size = args.image_size or meta.get("image_size")
    if not image_size:
        raise SystemExit(f"--dvae {args.dvae}: config.json has no image_size; pass --image-size")
    if image_size % vae.cfg.downsample:
        raise SystemExit(f"--image-size {image_size}: not divisible by the dVAE's downsampling {vae.cfg.downsample}")
    grid = image_size // vae.cfg.downsample
    job = {"format": FORMAT, "dvae_hash": meta["dvae_hash"], "grid_size": grid, "codebook_size": vae.cfg.codebook_size,
           "image_size": image_size, "preprocessing": "eval: centre square crop, resize (dalle_ds.data.augment)",
           "inputs": hashlib.sha1("\n".join(names).encode()).hexdigest()}
    if args.views > 1:  # absent for one view: the job (and its resume check) is unchanged
        job.update(views=args.views, view_seed=args.view_seed,
                   preprocessing=job["preprocessing"] + f"; views 1..{args.views - 1}: prior (Listing 2)")
    out = args.output.rstrip("/")
    claim_output(out, job)
    if args.finalize:
        manifest = finalize(out, urls, job, {"dvae": args.dvae, "input": args.input}, require=True)
        result: dict[str, Any] = {"manifest": manifest}
        if args.verify:
            result["verify"] = verify(out, vae, Augment("eval", image_size), torch.device("cpu"), args)
        return result

    # -- this process's shards
    mine = plan_shards(len(urls), part, num_parts, rank, world)
    finished = Progress(out).finished()
    todo = [urls[i] for i in mine if names[i] not in finished]
    print(f"{tag} {len(urls)} shards in all, {len(mine)} mine, {len(mine) - len(todo)} already finished; "
          f"{image_size}px -> {grid}x{grid} codes of {vae.cfg.codebook_size}, dVAE {meta['dvae_hash'][:12]}",
          file=sys.stderr, flush=True)

    # -- device
    device = pick_device(args.device, local_rank)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0)) // max(1, local_world)
        torch.set_num_threads(max(1, cores))
    vae = vae.to(device)

    # -- encode
    augment = Augment("eval", image_size)
    encoder = BatchEncoder(vae, device, args.precision)
    totals = collections.Counter({"images": 0, **{r: 0 for r in DROP_REASONS}})
    bar = tqdm(total=input_sample_count(todo), unit="img", desc=f"tokenize p{part}r{rank}", smoothing=0.1,
               disable=args.no_progress, mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    delay = float(os.environ.get(TEST_DELAY_ENV, 0) or 0)
    done_now = []
    views = ViewAugment(image_size, args.views, args.view_seed) if args.views > 1 else augment
    for url, batches in decoded_shards(todo, views, args.batch_size, args.workers):
        writer = TokenShardWriter(out, url)
        for batch in batches:
            if batch.images is not None:
                writer.add(batch.samples, encode_views(encoder, batch.images))  # (B, views*grid*grid) uint16
            writer.drop(batch.drops)
            bar.update(len(batch.samples) + len(batch.drops))
            if delay:
                time.sleep(delay)
        record = writer.close(job)
        totals.update({"images": record["samples"], **record["dropped"]})
        done_now.append(record["name"])
        bar.set_postfix(shards=f"{len(done_now)}/{len(todo)}", refresh=False)
    bar.close()
    print(f"{tag} wrote {len(done_now)} shard(s): {totals['images']} samples, dropped "
          f"{ {r: totals[r] for r in DROP_REASONS if totals[r]} }", file=sys.stderr, flush=True)

    # -- manifest (whoever finds everything finished), verification
    manifest = finalize(out, urls, job, {"dvae": args.dvae, "input": args.input}, require=False)
    result = {"part": part, "num_parts": num_parts, "rank": rank, "world_size": world, "shards": done_now,
              "skipped": [names[i] for i in mine if names[i] in finished], "images": totals["images"],
              "dropped": {r: totals[r] for r in DROP_REASONS}, "manifest": manifest}
    if args.verify and rank == 0 and part == 0:
        result["verify"] = verify(out, vae, augment, device, args)
    return result


# ---------------------------------------------------------------- the split


def array_part(part: int | None, num_parts: int | None) -> tuple[int, int]:
    """(part, parts) from the flags, else from the SLURM job array (:func:`dalle_ds.parallel.dist.slurm_array_part`)."""
    try:
        array = slurm_array_part() if part is None and num_parts is None else None
    except ValueError as e:
        raise SystemExit(f"{e} (--part / --num-parts)") from None
    if array is not None:
        part, num_parts = array
        where = f"SLURM array element {part} of {num_parts}"
    else:
        part, num_parts = part or 0, num_parts or 1
        where = f"--part {part} --num-parts {num_parts}"
    if num_parts < 1 or not 0 <= part < num_parts:
        raise SystemExit(f"{where}: need 0 <= part < num_parts")
    return part, num_parts


def plan_shards(n: int, part: int, num_parts: int, rank: int, world: int) -> list[int]:
    """Indices of the shards one process owns: part ``part``'s contiguous range, every world-th of it."""
    lo, hi = part * n // num_parts, (part + 1) * n // num_parts
    return list(range(lo + rank, hi, world))


def pick_device(spec: str, local_rank: int) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    from dalle_ds.parallel.dist import device_index

    idx = device_index(local_rank)  # local_rank % device_count, -1 without CUDA
    return torch.device("cuda", idx) if idx >= 0 else torch.device("cpu")


# ---------------------------------------------------------------- inputs and output folder


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def check_inputs(urls: list[str], output: str) -> list[str]:
    """Shard names; every shard must exist, names must be unique, and no output may overwrite an input."""
    names = [shard_name(u) for u in urls]
    dupes = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if dupes:
        raise SystemExit(f"--input: shard names must be unique (outputs reuse them), repeated: {dupes[:5]}")
    by_folder: dict[str, list[str]] = collections.defaultdict(list)
    for u in urls:
        by_folder[u.rstrip("/").rsplit("/", 1)[0] if "/" in u else "."].append(u)
    missing = []
    for folder, members in by_folder.items():
        if storage.is_s3(folder):
            present = set(storage.listdir(folder))
            missing += [u for u in members if shard_name(u) not in present]
        else:
            missing += [u for u in members if not os.path.isfile(u)]
    if missing:
        raise SystemExit(f"--input: {len(missing)} shard(s) do not exist: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    out = output.rstrip("/")
    clash = [u for u in urls if _same(storage.join(out, shard_name(u)), u)]
    if clash:
        raise SystemExit(f"--output {output}: would overwrite the input shards ({clash[0]}); choose another folder")
    return names


def _same(a: str, b: str) -> bool:
    if storage.is_s3(a) or storage.is_s3(b):
        return a == b
    return os.path.abspath(a) == os.path.abspath(b)


def claim_output(out: str, job: dict) -> None:
    """Refuse an output made with another dVAE, image size or input list; record ours."""
    progress = Progress(out)
    old = progress.claim(job)
    if old is not None:
        raise SystemExit(f"{progress.job_url}: --output holds tokens of another job ({job_diff(old, job)}); "
                         f"use another --output or delete it")


def input_sample_count(urls: list[str]) -> int | None:
    """Total samples of ``urls`` from the image shards' manifest.json (for the progress bar), if known."""
    counts: dict[str, int] = {}
    for folder in {u.rsplit("/", 1)[0] for u in urls if "/" in u}:
        path = storage.join(folder, MANIFEST)
        try:
            if storage.exists(path):
                for s in storage.read_json(path).get("shards", []):
                    counts[s["name"]] = int(s["samples"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    try:
        return sum(counts[shard_name(u)] for u in urls)
    except KeyError:
        return None


# ---------------------------------------------------------------- reading and decoding


class Batch:
    """Up to batch_size decoded samples of one shard, and the samples dropped while reading them."""

    def __init__(self, images: torch.Tensor | None, samples: list[dict], drops: list[dict]):
        self.images, self.samples, self.drops = images, samples, drops  # images: (B, 3, S, S) uint8


def decode_sample(sample: dict, augment: Augment) -> tuple[torch.Tensor | None, dict]:
    """(uint8 image (3, S, S) or None, record): record has key, caption, json and, if dropped, reason/detail."""
    key = sample["__key__"]
    rec: dict[str, Any] = {"key": key, "txt": sample.get("txt"), "json": sample.get("json")}
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, {**rec, "reason": "missing_image", "detail": f"members: {sorted(k for k in sample if k[0] != '_')}"}
    if rec["txt"] is None:
        return None, {**rec, "reason": "missing_caption", "detail": ""}
    try:
        rec["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        return None, {**rec, "reason": "caption_not_utf8", "detail": str(e)}
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
        return augment(img), rec
    except Exception as e:  # noqa: BLE001 - any decoder failure drops the sample, counted
        return None, {**rec, "reason": "corrupt_image", "detail": f".{ext}: {type(e).__name__}: {e}"}


def _shard_batches(url: str, augment: Augment, batch_size: int, pool: ThreadPoolExecutor) -> Iterator[Batch]:
    chunk: list[dict] = []
    samples = iter_shard(url)  # ShardError (naming the shard) if the tar itself is unreadable
    while True:
        raw = next(samples, None)
        if raw is not None:
            chunk.append(raw)
        if chunk and (raw is None or len(chunk) == batch_size):
            decoded = list(pool.map(lambda s: decode_sample(s, augment), chunk))
            kept = [(x, r) for x, r in decoded if x is not None]
            images = torch.stack([x for x, _ in kept]) if kept else None  # (B, 3, S, S) uint8
            yield Batch(images, [r for _, r in kept], [r for x, r in decoded if x is None])
            chunk = []
        if raw is None:
            return


def decoded_shards(urls: list[str], augment: Augment, batch_size: int, workers: int
                   ) -> Iterator[tuple[str, Iterator[Batch]]]:
    """(shard url, its batches) in order; a reader thread decodes ahead (threads: Pillow releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(workers) as pool:
                for url in urls:
                    for batch in _shard_batches(url, augment, batch_size, pool):
                        if stop.is_set():
                            return
                        q.put((url, batch))
                    q.put((url, end))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((None, e))

    thread = threading.Thread(target=produce, daemon=True, name="tokenize-reader")
    thread.start()

    def one_shard(url: str) -> Iterator[Batch]:
        while True:
            got_url, item = q.get()
            if isinstance(item, BaseException):
                raise item
            if item is end:
                return
            assert got_url == url, (got_url, url)
            yield item

    try:
        for url in urls:
            yield url, one_shard(url)
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


# ---------------------------------------------------------------- encoding and writing


class BatchEncoder:
    """uint8 images (B, 3, S, S) -> codes (B, grid*grid) uint16 numpy, argmax of the encoder logits.

    Channels-last activations: about 2x faster convolutions on CPU (oneDNN), and what cuDNN's
    tensor-core kernels want; the codes are the same up to float rounding of near-tied logits.
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device, precision: str = "fp32"):
        self.vae, self.device = vae.eval().to(memory_format=torch.channels_last), device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)  # (B, 3, S, S) in [0, 1]
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, self.dtype or torch.float32,
                                                   enabled=self.dtype is not None):
            codes = self.vae.logits(x).argmax(dim=1)  # (B, grid, grid)
        return codes.flatten(1).to("cpu", torch.int32).numpy().astype("<u2")  # (B, grid*grid)


class ViewAugment:
    """PIL image -> (K, 3, S, S) uint8: view 0 is ``Augment("eval")`` (the codes of a one-view run),
    views 1..K-1 are ``Augment("prior")`` (paper Listing 2: near-centre crop, resize to [1, 9/8] x S,
    random S crop), each from a generator seeded by (view seed, the image's pixels, view): the same
    codes on every re-run, rank and array part."""

    def __init__(self, size: int, views: int, seed: int = 0):
        self.eval, self.prior, self.views, self.seed, self.size = Augment("eval", size), Augment("prior", size), views, seed, size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = img.convert("RGB")
        digest = hashlib.blake2b(img.tobytes(), digest_size=8).hexdigest()
        out = [self.eval(img)] + [self.prior(img, random.Random(f"view/{self.seed}/{digest}/{v}"))
                                  for v in range(1, self.views)]
        return torch.stack(out)  # (K, 3, S, S)


def encode_views(encoder: "BatchEncoder", images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) -> (B, N) codes; (B, K, 3, S, S) -> (B, K*N), view-major (one encoder batch of B*K)."""
    if images.dim() == 4:
        return encoder(images)
    b, k = images.shape[:2]
    return encoder(images.flatten(0, 1)).reshape(b, -1)


class TokenShardWriter:
    """One output shard (:class:`dalle_ds.data.shards.ShardWriter`); ``close`` publishes it, then its
    record (= finished)."""

    def __init__(self, out: str, source: str):
        self.progress, self.source = Progress(out), source
        self.shard = ShardWriter(out, shard_name(source))
        self.rejects: list[dict] = []
        self.dropped = collections.Counter({r: 0 for r in DROP_REASONS})

    def add(self, records: list[dict], codes: np.ndarray) -> None:
        for rec, row in zip(records, codes):
            meta = _json_dict(rec["json"])
            meta["source_shard"] = self.shard.name
            self.shard.add(rec["key"], {"codes": row.tobytes(), "txt": rec["txt"],
                                        "json": json.dumps(meta, sort_keys=True).encode()})

    def drop(self, records: list[dict]) -> None:
        for rec in records:
            self.dropped[rec["reason"]] += 1
            self.rejects.append({"key": rec["key"], "reason": rec["reason"], "detail": rec["detail"][:300]})

    def close(self, job: dict) -> dict:
        return self.progress.finish(self.shard, {
            "source": self.source, "inputs": self.shard.count + sum(self.dropped.values()),
            "dropped": dict(self.dropped), "rejects": self.rejects, "job": job})


def _json_dict(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"image_json_unreadable": True}
    return value if isinstance(value, dict) else {"image_json": value}


# ---------------------------------------------------------------- manifest


def finalize(out: str, urls: list[str], job: dict, config: dict, require: bool) -> dict | None:
    """Build manifest.json from the records if every input shard is finished (else None, or exit)."""
    names = [shard_name(u) for u in urls]
    progress = Progress(out)
    finished = progress.finished()
    missing = [n for n in names if n not in finished]
    if missing:
        if require:
            raise SystemExit(f"{out}: {len(missing)} of {len(names)} shards are not finished: {missing[:5]}")
        return None
    records = [progress.record(n) for n in names]
    foreign = [r["name"] for r in records if r.get("job") != job]
    if foreign:
        raise SystemExit(f"{out}: shards made by another job (dVAE/inputs differ): {foreign[:5]}")
    dropped = count_drops(DROP_REASONS, *(r["dropped"] for r in records))
    manifest = build_manifest(FORMAT, "data_prep/tokenize_images.py", records, dropped, f"{PROGRESS}/<shard>.json",
                              {**config, "preprocessing": job["preprocessing"]}, job["inputs"],
                              **{k: job[k] for k in ("grid_size", "codebook_size", "dvae_hash", "image_size",
                                                     "views", "view_seed") if k in job})
    url = write_manifest(out, manifest)
    print(f"{url}: {manifest['samples']} samples in {len(records)} token shards, dropped "
          f"{ {k: v for k, v in dropped.items() if v} }", file=sys.stderr, flush=True)
    return manifest


# ---------------------------------------------------------------- verification


def verify(out: str, vae: torch.nn.Module, augment: Augment, device: torch.device, args: argparse.Namespace) -> dict:
    """PSNR of K random finished samples decoded from their stored codes against their preprocessed sources."""
    progress = Progress(out)
    records = [progress.record(n) for n in sorted(progress.finished())]
    population = [(r["name"], i) for r in records for i in range(r["samples"])]
    if not population:
        raise SystemExit(f"--verify: {out} has no finished samples yet")
    picked = sorted(random.Random(args.seed).sample(population, min(args.verify, len(population))))
    wanted: dict[str, set[int]] = collections.defaultdict(set)
    for name, i in picked:
        wanted[name].add(i)
    sources = {r["name"]: r["source"] for r in records}
    keys, codes, images = [], [], []
    for name, indices in wanted.items():
        n_codes = (augment.size // vae.cfg.downsample) ** 2  # view 0 (the centre crop) of K stored views
        chosen = {s["__key__"]: np.frombuffer(s["codes"], "<u2")[:n_codes].astype(np.int64)
                  for i, s in enumerate(iter_shard(storage.join(out, name))) if i in indices}
        found = {}
        for s in iter_shard(sources[name]):
            if s["__key__"] in chosen:
                x, rec = decode_sample(s, augment)
                if x is None:
                    raise SystemExit(f"--verify: {sources[name]}: sample {s['__key__']!r} is in the tokens but "
                                     f"does not decode now ({rec['reason']})")
                found[s["__key__"]] = x
        for key, c in chosen.items():
            if key not in found:
                raise SystemExit(f"--verify: {sources[name]}: has no sample {key!r} (token shard {name} does)")
            keys.append(key)
            codes.append(torch.from_numpy(c))
            images.append(found[key])
    codes_t, images_t = torch.stack(codes), torch.stack(images)  # (K, grid*grid), (K, 3, S, S) uint8
    sq_err, agree = 0.0, 0
    vae = vae.to(device)
    with torch.inference_mode():
        for lo in range(0, len(keys), args.batch_size):
            x = images_t[lo: lo + args.batch_size].to(device).float().div_(255.0)  # (b, 3, S, S)
            c = codes_t[lo: lo + args.batch_size].to(device)  # (b, grid*grid)
            recon = vae.decode(c)  # (b, 3, S, S) in [0, 1]
            sq_err += float(((recon.double() - x.double()) ** 2).sum())
            agree += int((vae.encode(x).flatten(1) == c).sum())
    mse = sq_err / images_t.numel()
    result = {"samples": len(keys), "shards": len(wanted), "mse": mse,
              "psnr": psnr(mse), "code_agreement": agree / codes_t.numel(),
              "keys": keys}
    print(f"verify: {len(keys)} samples from {len(wanted)} shard(s): PSNR {result['psnr']:.2f} dB (MSE {mse:.6f}); "
          f"re-encoding reproduces {100 * result['code_agreement']:.2f}% of the stored codes", file=sys.stderr,
          flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(run(main))
