"""dalle_ds.data.loaders / dalle_ds.data.augment: exactly-once split over ranks x workers, determinism, resume,
augmentations, S3 reading, token shards and their manifest checks. Shards are written here with
webdataset.TarWriter; the S3 server is the real one from tests/s3_server.py."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dalle_ds.data import storage
from dalle_ds.data.augment import Augment
from dalle_ds.data.loaders import (ImageShardLoader, ShardError, TokenShardLoader, check_token_manifest, epoch_order,
                           holdout_split, slot_plan)
from tests.multirank import run_ranks


# ---------------------------------------------------------------- shard writers


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_image_shards(folder: Path, counts: list[int], seed: int = 0) -> list[str]:
    """Shards shard-000000.tar ... with counts[i] samples each; returns every key."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = []
    for s, n in enumerate(counts):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for i in range(n):
                key = f"s{s:02d}i{i:03d}"
                h, w_ = int(rng.integers(24, 48)), int(rng.integers(24, 48))
                w.write({"__key__": key, "jpg": _jpeg(rng, h, w_), "txt": f"caption {key}".encode(),
                         "json": json.dumps({"width": w_, "height": h}).encode()})
                keys.append(key)
    return keys


GRID, CODEBOOK = 4, 50


def write_token_shards(folder: Path, counts: list[int], grid: int = GRID, codebook: int = CODEBOOK,
                       manifest: dict | None = None, bad: dict | None = None) -> dict[str, np.ndarray]:
    """Token shards; ``bad`` maps a key to replacement raw .codes bytes. Returns key -> codes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out, names = {}, []
    for s, n in enumerate(counts):
        name = f"tokens-{s:06d}.tar"
        names.append({"name": name, "samples": n})
        with wds.TarWriter(str(folder / name)) as w:
            for i in range(n):
                key = f"t{s:02d}i{i:03d}"
                codes = rng.integers(0, codebook, grid * grid).astype("<u2")
                raw = (bad or {}).get(key, codes.tobytes())
                w.write({"__key__": key, "codes": raw, "txt": f"a photo of {key}".encode(), "json": b"{}"})
                out[key] = codes
    m = {"grid_size": grid, "codebook_size": codebook, "dvae_hash": "abc123", "shards": names}
    m.update(manifest or {})
    (folder / "manifest.json").write_text(json.dumps(m))
    return out


def real_tokenizer(text_len: int = 32):
    """A tiny real TextTokenizer, trained here the way data_prep/train_text_tokenizer.py does."""
    from data_prep.train_text_tokenizer import build
    from dalle_ds.data.tokenizer import TextTokenizer

    tok, trainer = build(vocab_size=300, min_frequency=1)
    tok.train_from_iterator([f"a photo of t{s:02d}i{i:03d}" for s in range(3) for i in range(8)], trainer)
    return TextTokenizer(tok, text_len)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("img")
    return d, write_image_shards(d, [7, 3, 9, 5, 6, 2, 8])  # 7 uneven shards, 40 samples


def _keys(loader, n_batches: int | None = None) -> list[str]:
    out = []
    for _, b in zip(range(n_batches) if n_batches is not None else iter(int, 1), loader):  # pulls no extra batch
        out += b["keys"]
    return out


# ---------------------------------------------------------------- the split


def test_slot_plan_covers_every_sample_once_for_any_layout():
    for n_shards in range(1, 10):
        sizes = [3 + (7 * j) % 5 for j in range(n_shards)]
        for total in range(1, 14):
            order = epoch_order(n_shards, seed=5, epoch=total, shuffle=True)
            seen = Counter()
            for slot in range(total):
                for shard, stride, offset in slot_plan(n_shards, total, slot, order):
                    seen.update((shard, i) for i in range(sizes[shard]) if i % stride == offset)
            assert set(seen.values()) == {1}, (n_shards, total)
            assert len(seen) == sum(sizes), (n_shards, total)


@pytest.mark.parametrize("counts", [[7, 3, 9, 5, 6, 2, 8], [10, 4, 7]], ids=["shards>=slots", "shards<slots"])
def test_exactly_once_2_ranks_x_3_workers(tmp_path, counts):
    keys = write_image_shards(tmp_path, counts)
    got = []
    for rank in range(2):
        loader = ImageShardLoader(str(tmp_path), batch_size=4, mode="eval", size=16, rank=rank, world_size=2,
                                  num_workers=3, infinite=False, seed=3)
        got.append(_keys(loader))
    assert all(got), "every rank gets samples"
    assert sorted(got[0] + got[1]) == sorted(keys)  # each sample exactly once in the whole job


def test_finite_epochs_reshuffle_and_infinite_rolls_over(image_dir):
    d, keys = image_dir
    loader = ImageShardLoader(str(d), batch_size=6, mode="eval", size=16, infinite=False, seed=1, shuffle_buffer=8)
    e0, e1 = _keys(loader), _keys(loader)
    assert sorted(e0) == sorted(e1) == sorted(keys) and e0 != e1 and loader.epoch == 2
    inf = ImageShardLoader(str(d), batch_size=6, mode="eval", size=16, infinite=True, seed=1, shuffle_buffer=8)
    stream = _keys(inf, n_batches=14)  # 84 samples: epochs 0, 1 and part of 2, batches spanning epochs
    assert stream[:40] == e0 and stream[40:80] == e1
    at_boundary = ImageShardLoader(str(d), batch_size=8, mode="eval", size=16, seed=1, shuffle_buffer=8)
    _keys(at_boundary, n_batches=5)
    assert at_boundary.state_dict()["workers"] == [[1, 0]]  # a finished epoch is saved as the next one


def test_worker_count_changes_the_order_not_the_samples_or_their_pixels(image_dir):
    d, keys = image_dir
    per_key = []
    for nw in (0, 1, 3):
        loader = ImageShardLoader(str(d), batch_size=4, mode="dvae", size=16, num_workers=nw, infinite=False, seed=9)
        per_key.append({k: x for b in loader for k, x in zip(b["keys"], b["images"])})
    assert all(sorted(m) == sorted(keys) for m in per_key)
    assert all(torch.equal(per_key[0][k], m[k]) for m in per_key[1:] for k in keys)  # augmentation seeded by key


def test_holdout_split_by_shard_name():
    urls = [f"/data/a/shard-{i:06d}.tar" for i in range(20)]
    train, val = holdout_split(urls, 0.1)
    assert len(val) == 2 and sorted(train + val) == sorted(urls)
    moved = [u.replace("/data/a/", "s3://bucket/x/") for u in urls]
    assert [u.rsplit("/", 1)[-1] for u in holdout_split(moved, 0.1)[1]] == [u.rsplit("/", 1)[-1] for u in val]
    assert holdout_split(urls, 0.0) == (urls, [])
    with pytest.raises(ValueError, match="leaves none for training"):
        holdout_split(urls[:1], 0.5)


def test_a_slot_that_never_gets_samples_is_an_error(tmp_path):
    write_image_shards(tmp_path, [2])
    loader = ImageShardLoader(str(tmp_path), batch_size=2, mode="eval", size=16, rank=3, world_size=4)
    with pytest.raises(ValueError, match=r"slot 3 of 4 \(rank 3\) got no samples in 16 epochs"):
        next(iter(loader))


def _rank_keys(shard_dir: str) -> list[str]:
    from dalle_ds.parallel.dist import init_distributed

    init_distributed()  # rank and world size come from torch.distributed
    loader = ImageShardLoader(shard_dir, batch_size=3, mode="eval", size=16, num_workers=2, infinite=False, seed=7)
    assert (loader.rank, loader.world_size) == (int(__import__("os").environ["RANK"]), 2)
    return _keys(loader)


def test_exactly_once_on_two_real_ranks(image_dir):
    d, keys = image_dir
    per_rank = run_ranks(_rank_keys, world_size=2, args=(str(d),), timeout_s=120)
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == sorted(keys)


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_same_batches_other_seed_other_order(image_dir):
    d, _ = image_dir
    kw = dict(batch_size=5, mode="dvae", size=16, num_workers=2, shuffle_buffer=10)
    a = list(ImageShardLoader(str(d), seed=11, infinite=False, **kw))
    b = list(ImageShardLoader(str(d), seed=11, infinite=False, **kw))
    c = list(ImageShardLoader(str(d), seed=12, infinite=False, **kw))
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]
    images = torch.cat([x["images"] for x in a])
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05


@pytest.mark.parametrize("num_workers,infinite", [(2, True), (0, False)])
def test_resume_continues_with_the_same_batches(image_dir, num_workers, infinite):
    d, _ = image_dir
    kw = dict(batch_size=3, mode="dvae", size=16, num_workers=num_workers, seed=5, shuffle_buffer=6,
              infinite=infinite)
    n, cut = (20, 9) if infinite else (11, 5)  # infinite: 60 samples of 40, across an epoch boundary
    full = list(zip(range(n), ImageShardLoader(str(d), **kw)))
    first = ImageShardLoader(str(d), **kw)
    for i, _ in zip(range(cut), first):
        pass
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed = ImageShardLoader(str(d), **kw)
    resumed.load_state_dict(state)
    rest = list(zip(range(n - cut), resumed))
    assert len(rest) == n - cut
    for (_, want), (_, got) in zip(full[cut:], rest):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["images"], want["images"])


@pytest.mark.parametrize("num_workers", [2, 0])
def test_token_loader_resume_is_bit_identical_with_bpe_dropout(tmp_path, num_workers):
    """With the presets' BPE dropout (0.1) the text after a resume equals an uninterrupted run's:
    the dropout is drawn from (seed, epoch, key), not from the tokenizers library."""
    write_token_shards(tmp_path, [5, 4, 6])
    tok = real_tokenizer(text_len=32)
    kw = dict(batch_size=3, tokenizer=tok, grid=GRID, codebook_size=CODEBOOK, num_workers=num_workers, seed=3,
              shuffle_buffer=4, infinite=True, bpe_dropout=0.1)
    n, cut = 14, 6  # 42 samples of 15: across two epoch boundaries
    full = [b for _, b in zip(range(n), TokenShardLoader(str(tmp_path), **kw))]
    first = TokenShardLoader(str(tmp_path), **kw)
    for _ in zip(range(cut), first):
        pass
    resumed = TokenShardLoader(str(tmp_path), **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [b for _, b in zip(range(n - cut), resumed)]
    for want, got in zip(full[cut:], rest):
        assert got["keys"] == want["keys"] and torch.equal(got["text"], want["text"])
    plain = tok.encode([c for b in full for c in b["captions"]])
    assert not torch.equal(torch.cat([b["text"] for b in full]), plain)  # dropout is really on
    epoch0 = {k: t for b in full[:5] for k, t in zip(b["keys"], b["text"])}
    epoch1 = {k: t for b in full[5:10] for k, t in zip(b["keys"], b["text"])}
    assert any(not torch.equal(epoch0[k], epoch1[k]) for k in epoch0.keys() & epoch1.keys())  # new draw per epoch


def test_state_from_another_layout_is_refused_or_restarted(image_dir):
    d, _ = image_dir
    loader = ImageShardLoader(str(d), batch_size=4, mode="eval", size=16, num_workers=2, seed=1)
    for _, _ in zip(range(3), loader):
        pass
    other = ImageShardLoader(str(d), batch_size=4, mode="eval", size=16, num_workers=1, seed=1)
    with pytest.raises(ValueError, match=r"num_workers: saved 2 != now 1"):
        other.load_state_dict(loader.state_dict())
    other.load_state_dict(loader.state_dict(), strict=False)
    assert other.state_dict()["workers"] == [[0, 0]]


# ---------------------------------------------------------------- augmentations


def _halves(h: int, w: int) -> Image.Image:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, w // 2:] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("mode", ["dvae", "prior", "eval"])
@pytest.mark.parametrize("hw", [(40, 70), (90, 35), (20, 12), (32, 32)])
def test_augment_shapes_and_range(mode, hw):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)).convert("L")
    x = Augment(mode, 32)(img, random.Random(1))
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_prior_never_flips_dvae_does_eval_is_deterministic():
    img = _halves(48, 96)  # left black, right white
    aug = {m: Augment(m, 32) for m in ("dvae", "prior", "eval")}
    flipped = {m: 0 for m in aug}
    for seed in range(60):
        for m, a in aug.items():
            x = a(img, random.Random(seed)).float()
            flipped[m] += int(x[:, :, 0].mean() > x[:, :, -1].mean())
    assert flipped["prior"] == 0 and flipped["eval"] == 0
    assert 10 < flipped["dvae"] < 50  # a fair coin
    assert torch.equal(aug["eval"](img, random.Random(1)), aug["eval"](img, random.Random(2)))


def test_resize_ranges_follow_the_listings():
    rng = random.Random(0)
    dvae = {Augment("dvae", 256).resize_target(384, rng) for _ in range(2000)}
    prior = {Augment("prior", 256).resize_target(384, rng) for _ in range(2000)}
    assert min(dvae) == 288 and max(dvae) == 384  # [9/8, 12/8] * 256
    assert min(prior) == 256 and max(prior) == 288  # [1, 9/8] * 256
    assert Augment("dvae", 256).resize_target(300, rng) <= 300  # capped by the crop side
    assert Augment("prior", 256).resize_target(200, rng) in range(256, 289)  # small images are upscaled
    # images stored at the training size (shards) still get the [1, 9/8] zoom, so views are not all the centre crop
    assert {Augment("prior", 64).resize_target(64, rng) for _ in range(200)} == set(range(64, 73))


def test_prior_crop_is_near_centre_dvae_crop_anywhere():
    ramp = np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (20, 1, 3))  # pixel value = column
    img = Image.fromarray(ramp)
    offsets = {m: {np.asarray(Augment(m, 8).square_crop(img, random.Random(s)))[0, 0, 0] for s in range(300)}
               for m in ("prior", "dvae", "eval")}
    assert min(offsets["prior"]) >= 3 * 80 // 8 and max(offsets["prior"]) < 5 * 80 // 8  # slack 80
    assert len(offsets["prior"]) > 10 and offsets["eval"] == {40}
    assert min(offsets["dvae"]) < 10 and max(offsets["dvae"]) > 70


# ---------------------------------------------------------------- S3


def test_reads_shards_from_a_real_s3_server(s3_server, image_dir):
    d, keys = image_dir
    prefix = s3_server.prefix()
    for p in sorted(d.glob("*.tar")):
        storage.upload_file(p, prefix + p.name)
    kw = dict(batch_size=4, mode="eval", size=16, infinite=False, seed=2, world_size=2)
    s3 = [_keys(ImageShardLoader(prefix, rank=r, num_workers=2, **kw)) for r in range(2)]
    local = [_keys(ImageShardLoader(str(d), rank=r, num_workers=2, **kw)) for r in range(2)]
    assert s3 == local and sorted(s3[0] + s3[1]) == sorted(keys)


def test_token_manifest_on_s3(s3_server, tmp_path):
    write_token_shards(tmp_path, [3, 2])
    prefix = s3_server.prefix()
    for p in sorted(tmp_path.iterdir()):
        storage.upload_file(p, prefix + p.name)
    check_token_manifest(prefix, GRID, CODEBOOK, "abc123")
    with pytest.raises(ValueError, match="dvae_hash='abc123'"):
        check_token_manifest(prefix, GRID, CODEBOOK, "fff000")


# ---------------------------------------------------------------- token shards


def test_token_loader_yields_codes_and_text(tmp_path):
    codes = write_token_shards(tmp_path, [5, 4, 6])
    tok = real_tokenizer(text_len=32)
    seen = {}
    for rank in range(2):
        loader = TokenShardLoader(str(tmp_path), batch_size=4, tokenizer=tok, grid=GRID, codebook_size=CODEBOOK,
                                  rank=rank, world_size=2, num_workers=1, infinite=False, bpe_dropout=0.1)
        for b in loader:
            assert b["text"].dtype == torch.int64 and b["text"].shape == (len(b["keys"]), 32)
            assert b["codes"].dtype == torch.int64 and b["codes"].shape == (len(b["keys"]), GRID * GRID)
            assert tok.decode(b["text"]) == b["captions"] == [f"a photo of {k}" for k in b["keys"]]
            for k, c in zip(b["keys"], b["codes"]):
                assert k not in seen
                seen[k] = c.numpy()
    assert seen.keys() == codes.keys()
    assert all((seen[k] == codes[k]).all() for k in codes)


@pytest.mark.parametrize("raw,match", [(b"\x01\x00" * 15, r"has 30 bytes, expected 32"),
                                       (np.full(16, 60, "<u2").tobytes(), r"code 60 >= codebook size 50")])
def test_bad_token_sample_names_shard_and_key(tmp_path, raw, match):
    write_token_shards(tmp_path, [3, 3], bad={"t01i002": raw})
    loader = TokenShardLoader(str(tmp_path), batch_size=2, tokenizer=real_tokenizer(), grid=GRID,
                              codebook_size=CODEBOOK, infinite=False, shuffle=False)
    with pytest.raises(ShardError, match=rf"tokens-000001\.tar: sample 't01i002': .*{match}"):
        _keys(loader)


def test_token_manifest_mismatches_are_refused(tmp_path):
    write_token_shards(tmp_path / "ok", [2, 2])
    assert check_token_manifest(str(tmp_path / "ok"), GRID, CODEBOOK, "abc123")[0]["grid_size"] == GRID
    with pytest.raises(ValueError, match=r"grid_size=4, this run expects 8"):
        check_token_manifest(str(tmp_path / "ok"), 8, CODEBOOK)
    with pytest.raises(ValueError, match=r"codebook_size=50, this run expects 512"):
        check_token_manifest(str(tmp_path / "ok"), GRID, 512)
    write_token_shards(tmp_path / "extra", [2, 2], manifest={"shards": [{"name": "tokens-000000.tar"}]})
    with pytest.raises(ValueError, match=r"not listed in the manifest.*tokens-000001\.tar"):
        check_token_manifest(str(tmp_path / "extra"), GRID, CODEBOOK)
    (tmp_path / "ok" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no manifest.json"):
        check_token_manifest(str(tmp_path / "ok"), GRID, CODEBOOK)


# ---------------------------------------------------------------- bad image shards


def test_corrupt_image_and_truncated_shard_are_named(tmp_path):
    write_image_shards(tmp_path, [3])
    with wds.TarWriter(str(tmp_path / "shard-000001.tar")) as w:
        w.write({"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x"})
    loader = ImageShardLoader(str(tmp_path), batch_size=8, mode="eval", size=16, infinite=False, shuffle=False)
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sample 'broken': cannot decode \.jpg"):
        _keys(loader)
    data = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    with pytest.raises(ShardError, match=r"shard-000001\.tar: cannot read shard"):
        _keys(ImageShardLoader(str(tmp_path), batch_size=8, mode="eval", size=16, infinite=False, shuffle=False))


# ---------------------------------------------------------------- dalle_ds.data.shards: the writer both shard jobs use


def test_shard_writer_and_progress(tmp_path):
    import tarfile

    from dalle_ds.data.shards import Progress, ShardWriter, build_manifest, job_diff

    out = tmp_path / "out"
    progress = Progress(str(out))
    assert progress.finished() == set() and progress.claim({"config": 1}) is None
    assert progress.claim({"config": 1}) is None and progress.claim({"config": 2}) == {"config": 1}
    assert job_diff({"config": 1}, {"config": 2}) == "config: 1 there, 2 now"
    blobs = []
    for name in ("a.tar", "b.tar"):
        w = ShardWriter(str(out), name)
        w.add("k0", {"codes": b"\x01\x00", "txt": b"one"})
        w.add("k1", {"codes": b"\x02\x00", "txt": b"two"})
        assert not (out / name).exists() and (out / f".{name}.tmp").exists()  # invisible until finished
        record = progress.finish(w, {"dropped": {"bad": 1}})
        assert record == {"name": name, "samples": 2, "dropped": {"bad": 1}}
        blobs.append((out / name).read_bytes())
    assert blobs[0] == blobs[1]  # same members, same bytes: nothing depends on time or user
    with tarfile.open(out / "a.tar") as tar:
        assert [m.name for m in tar] == ["k0.codes", "k0.txt", "k1.codes", "k1.txt"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {(946684800, 0, 0, "", "", 0o644)}
    assert progress.finished() == {"a.tar", "b.tar"} and progress.record("b.tar")["samples"] == 2
    (out / "b.tar").unlink()  # a record without its shard is not finished
    assert progress.finished() == {"a.tar"} and not list(out.glob(".*.tmp"))
    m = build_manifest("fmt/1", "test", [progress.record("a.tar")], {"bad": 1, "other": 0}, "r.jsonl", {}, "fp", grid=4)
    assert (m["samples"], m["inputs"], m["shards"], m["grid"]) == (2, 3, [{"name": "a.tar", "samples": 2}], 4)
    progress.clear()
    assert not (out / "_progress").exists() and progress.finished() == set()


def test_image_loader_checks_the_manifest_like_token_loaders(tmp_path, monkeypatch):
    """Image shards with a manifest: a tar the manifest does not list is refused, as is an unfinished
    job (``_progress/job.json``, no manifest yet) and a token-shard manifest; plain folders are read."""
    from data_prep import shard_corpus
    from tests.test_shard_corpus import SMALL, make_corpus

    make_corpus(tmp_path / "corpus", n_good=6)
    out = tmp_path / "out"
    shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", str(out), "--samples-per-shard", "4",
                       "--workers", "1", *SMALL])
    kw = dict(batch_size=2, mode="eval", size=16, infinite=False, shuffle=False)
    assert len(_keys(ImageShardLoader(str(out), **kw))) == 12
    (out / "shard-000099.tar").write_bytes((out / "shard-000000.tar").read_bytes())
    with pytest.raises(ValueError, match=r"shards not listed in the manifest .*shard-000099\.tar"):
        ImageShardLoader(str(out), **kw)
    (out / "shard-000099.tar").unlink()
    (out / "manifest.json").rename(tmp_path / "m.json")
    (out / "_progress").mkdir()
    (out / "_progress" / "job.json").write_text("{}")
    with pytest.raises(ValueError, match="an unfinished shard job"):
        ImageShardLoader(str(out), **kw)
    (out / "_progress" / "job.json").unlink()
    assert len(_keys(ImageShardLoader(str(out), **kw))) == 12  # a plain webdataset folder
    (out / "manifest.json").write_text(json.dumps({"format": "dalle-ds/token-shards/1", "shards": []}))
    with pytest.raises(ValueError, match="these are token shards"):
        ImageShardLoader(str(out), **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted_up_to_max_bad_fraction(tmp_path, num_workers):
    """A real corrupt member (truncated JPEG) in a real shard: skipped, counted, the batches stay full
    and every good sample comes once; with max_bad_fraction=0 (the default) it is an error naming it."""
    keys = write_image_shards(tmp_path, [6, 7])
    bad_key = "s01i003"
    path = tmp_path / "shard-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == f"{bad_key}.jpg":
                data = data[: len(data) // 3]  # truncated: the header parses, the pixels do not
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    kw = dict(batch_size=4, mode="eval", size=16, num_workers=num_workers, infinite=False, shuffle=False)
    loader = ImageShardLoader(str(tmp_path), max_bad_fraction=0.1, **kw)
    batches = list(loader)
    got = [k for b in batches for k in b["keys"]]
    assert sorted(got) == sorted(k for k in keys if k != bad_key)
    assert [len(b["keys"]) for b in batches][:2] == [4, 4] and loader.samples_bad == 1
    with pytest.raises(ShardError, match=rf"1 of \d+ samples .*max_bad_fraction=0.0; latest: .*{bad_key}"):
        list(ImageShardLoader(str(tmp_path), **kw))
