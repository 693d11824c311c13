"""data_prep/shard_corpus.py on real files: every bad-input kind, determinism across worker
counts, tables and tars as inputs, and resume after a real kill -9."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import shard_corpus

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--image-size", "48", "--min-size", "32", "--no-progress"]


def _noise(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 60000) -> bytes:
    """A real decompression-bomb shape: a tiny file whose header claims side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_corpus(root: Path, n_good: int = 12, seed: int = 0) -> dict:
    """A folder tree with good samples and one file of every bad kind.

    Returns {"inputs": n, "kept": n, "dropped": {reason: n}} as shard_corpus must report them."""
    root.mkdir(parents=True, exist_ok=True)
    sub = root / "part-a"
    sub.mkdir(exist_ok=True)
    (root / "part-b").mkdir(exist_ok=True)

    def put(name: str, image: bytes | None, caption: bytes | None):
        folder = sub if zlib.crc32(name.encode()) % 2 else root / "part-b"
        if image is not None:
            (folder / name).write_bytes(image)
        if caption is not None:
            (folder / (name.rsplit(".", 1)[0] + ".txt")).write_bytes(caption)

    for i in range(n_good):
        w, h = [(64, 48), (48, 64), (80, 80), (96, 56)][i % 4]
        put(f"good{i:03d}.jpg", _jpeg(_noise(seed * 1000 + i, w, h)), f"  a  picture\nnumber {i}  ".encode())
    expected_kept = n_good
    # convertible modes (kept)
    cmyk = _noise(seed * 1000 + 500, 64, 64).convert("CMYK")
    put("cmyk.jpg", _jpeg(cmyk), b"a cmyk photo")
    put("palette.png", _png(_noise(seed * 1000 + 501, 64, 64).quantize(16)), b"a palette image")
    g16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16 + seed)
    put("grey16.png", _png(Image.fromarray(g16)), b"a sixteen bit image")
    rgba = _noise(seed * 1000 + 502, 64, 64).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    put("alpha.png", _png(rgba), b"an image with alpha")
    put("la.png", _png(_noise(seed * 1000 + 503, 64, 64).convert("LA")), b"grey with alpha")
    put("bilevel.png", _png(_noise(seed * 1000 + 504, 64, 64).convert("1")), b"a one bit image")
    expected_kept += 6
    dropped = {}

    def bad(reason: str, name: str, image: bytes | None, caption: bytes | None):
        put(name, image, caption)
        dropped[reason] = dropped.get(reason, 0) + 1

    good = _jpeg(_noise(seed * 1000 + 600, 64, 64))
    bad("undecodable", "truncated.jpg", good[: len(good) // 2], b"a truncated jpeg")
    bad("undecodable", "truncated.png", _png(_noise(seed * 1000 + 601, 64, 64))[:300], b"a truncated png")
    bad("empty_file", "empty.jpg", b"", b"an empty file")
    bad("not_an_image", "notes.jpg", b"this is not an image at all\n", b"a text file")
    bad("not_an_image", "readme.md", b"# readme\n", b"stray markdown file")
    bad("decompression_bomb", "bomb.png", _bomb_png(), b"a decompression bomb")
    bad("caption_not_utf8", "latin1.jpg", _jpeg(_noise(seed * 1000 + 602, 64, 64)), "caf\xe9 au lait".encode("latin-1"))
    bad("missing_caption", "nocaption.jpg", _jpeg(_noise(seed * 1000 + 603, 64, 64)), None)
    bad("missing_caption", "blankcaption.jpg", _jpeg(_noise(seed * 1000 + 604, 64, 64)), b" \n\t ")
    bad("caption_too_short", "short.jpg", _jpeg(_noise(seed * 1000 + 605, 64, 64)), b"cat")
    bad("too_small", "tiny.jpg", _jpeg(_noise(seed * 1000 + 606, 20, 20)), b"a tiny image")
    bad("aspect_ratio", "wide.jpg", _jpeg(_noise(seed * 1000 + 607, 150, 60)), b"a very wide image")
    bad("aspect_ratio", "tall.jpg", _jpeg(_noise(seed * 1000 + 608, 40, 100)), b"a very tall image")
    bad("missing_image", "orphan.jpg", None, b"a caption without image")
    (sub / "good000.json").write_text("{}")  # sidecars are ignored
    os.symlink(root / "does-not-exist.jpg", sub / "dangling.jpg")
    (sub / "dangling.txt").write_text("a dangling link")
    dropped["read_error"] = 1
    # same pixels as good001 under another name and format (comes later in sorted order)
    dup = Image.open(next(root.rglob("good001.jpg"))).convert("RGB")
    (root / "zz").mkdir(exist_ok=True)  # sorts after part-*
    (root / "zz" / "zz-dup.png").write_bytes(_png(dup))
    (root / "zz" / "zz-dup.txt").write_text("the same picture again")
    dropped["duplicate"] = 1
    n_inputs = expected_kept + sum(dropped.values())
    return {"inputs": n_inputs, "kept": expected_kept, "dropped": dropped}


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(f"{shard['name']}/{key}", {})[ext] = tar.extractfile(m).read()
    return samples


def test_every_bad_kind_is_counted_and_good_ones_kept(tmp_path):
    want = make_corpus(tmp_path / "corpus")
    m = shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
                           "--samples-per-shard", "5", "--workers", "1", *SMALL])
    assert m["inputs"] == want["inputs"]
    assert m["samples"] == want["kept"]
    assert {k: v for k, v in m["dropped"].items() if v} == want["dropped"]
    assert m["samples"] + sum(m["dropped"].values()) == m["inputs"]
    assert [s["samples"] for s in m["shards"]] == [5, 5, 5, 3]
    rejects = [json.loads(line) for line in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(want["dropped"].values())
    assert {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in rejects}["bomb.png"] == "decompression_bomb"
    samples = read_shards(tmp_path / "out")
    assert len(samples) == want["kept"]
    for key, files in samples.items():
        assert set(files) == {"jpg", "txt", "json"}, key
        im = Image.open(io.BytesIO(files["jpg"]))
        assert im.mode == "RGB" and min(im.size) == 48, (key, im.mode, im.size)
        meta = json.loads(files["json"])
        assert {"source", "width", "height", "pixel_hash"} <= set(meta)
        assert meta["width"] / meta["height"] == pytest.approx(im.size[0] / im.size[1], rel=0.05)
        text = files["txt"].decode("utf-8")
        assert text == " ".join(text.split()) and text
    by_source = {json.loads(f["json"])["source"].rsplit("/", 1)[-1]: f for f in samples.values()}
    assert by_source["good003.jpg"]["txt"] == b"a picture number 3"
    assert "zz-dup.png" not in by_source and "good001.jpg" in by_source
    # alpha composited on white: the fully transparent top rows come out white
    alpha = np.asarray(Image.open(io.BytesIO(by_source["alpha.png"]["jpg"])))
    assert alpha[:2].mean() > 240 and alpha[-2:].mean() < 200
    # a second run against the finished output does nothing and changes nothing
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
                              "--samples-per-shard", "5", "--workers", "1", *SMALL]) == m
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    # ... but refuses to mix in a different job
    with pytest.raises(SystemExit, match="manifest.json: made from other inputs or config"):
        shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
                           "--samples-per-shard", "4", "--workers", "1", *SMALL])
    m4 = shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
                            "--samples-per-shard", "4", "--workers", "1", "--overwrite", *SMALL])
    assert [s["samples"] for s in m4["shards"]] == [4, 4, 4, 4, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "rejects.jsonl", *(s["name"] for s in m4["shards"])]


def test_byte_identical_shards_for_one_and_two_workers(tmp_path):
    make_corpus(tmp_path / "corpus", n_good=16)
    outs = []
    for k in (1, 2):
        out = tmp_path / f"out{k}"
        shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", str(out),
                           "--samples-per-shard", "4", "--workers", str(k), *SMALL])
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0].keys() == outs[1].keys() and len([n for n in outs[0] if n.endswith(".tar")]) == 6
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], name
    with tarfile.open(tmp_path / "out1/shard-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar} == {(946684800, 0, 0, "", 0o644)}


def test_table_and_tar_inputs(tmp_path):
    make_corpus(tmp_path / "c")
    imgs = sorted((tmp_path / "c").rglob("good*.jpg"))[:5]
    (tmp_path / "t.tsv").write_text(
        "path\tcaption\n"
        f"{imgs[0]}\ta first tsv row\n"
        f"{os.path.relpath(imgs[1], tmp_path)}\ta relative path\n"
        "missing.jpg\ta file that is not there\n"
        "too\tmany\tcolumns\n"
        "https://example.com/a.jpg\ta url\n"
        f"{imgs[2]}\tx\n")
    (tmp_path / "t.jsonl").write_bytes(
        json.dumps({"image": str(imgs[3]), "text": "a jsonl row"}).encode() + b"\n{not json\n"
        + b'{"image": "%s", "text": "caf\xe9 au lait"}\n' % str(imgs[3]).encode())
    (tmp_path / "t.csv").write_text(f'file,title\n{imgs[4]},"a quoted, comma caption"\n'
                                    f'{imgs[3]},the jsonl image again\n')
    tar_path = tmp_path / "wds" / "00000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(3):
            add(f"00000000{i}.webp", _png(_noise(900 + i, 64, 64)) if i != 1 else b"garbage")
            add(f"00000000{i}.txt", f"tar sample number {i}".encode())
            add(f"00000000{i}.json", json.dumps({"url": "x", "caption": "ignored"}).encode())
        add("000000009.json", b"{}")  # a member group without an image
    # a truncated tar: header of the first member survives, the rest is cut
    good_tar = tar_path.read_bytes()
    (tmp_path / "wds" / "00001.tar").write_bytes(good_tar[:1500])
    (tmp_path / "wds" / "_stats.json").write_text("{}")  # img2dataset side files are ignored
    m = shard_corpus.main(["--input", str(tmp_path / "t.tsv"), str(tmp_path / "t.jsonl"), str(tmp_path / "t.csv"),
                           str(tmp_path / "wds"),
                           "--output", str(tmp_path / "out"), "--samples-per-shard", "100", "--workers", "2",
                           *SMALL])
    dropped = {k: v for k, v in m["dropped"].items() if v}
    # tsv: 2 kept, read_error x2 (missing file, URL), bad_row, caption_too_short
    # jsonl: 1 kept, bad_row, caption_not_utf8 (caption checks come before the duplicate check)
    # csv: 1 kept; the jsonl's image again -> duplicate
    # tars: 2 kept, not_an_image, missing_image; the truncated tar -> read_error
    assert m["samples"] == 6
    assert dropped == {"read_error": 3, "bad_row": 2, "caption_too_short": 1, "caption_not_utf8": 1,
                       "duplicate": 1, "not_an_image": 1, "missing_image": 1}
    assert m["inputs"] == m["samples"] + sum(dropped.values()) == 16
    captions = sorted(f["txt"].decode() for f in read_shards(tmp_path / "out").values())
    assert captions == ["a first tsv row", "a jsonl row", "a quoted, comma caption", "a relative path",
                        "tar sample number 0", "tar sample number 2"]


def _run_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "data_prep/shard_corpus.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_resume_after_kill_9_keeps_every_sample_exactly_once(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    n = 48
    for i in range(n):  # big enough inputs that the job takes a while; duplicates straddle the kill point
        src = i - 40 if i >= 44 else i
        (corpus / f"{i:03d}.jpg").write_bytes(_jpeg(_noise(src, 1024, 768)))
        (corpus / f"{i:03d}.txt").write_text(f"sample number {i}")
    args = ["--input", str(corpus), "--samples-per-shard", "4", "--workers", "1", "--image-size", "64",
            "--no-progress"]
    reference = shard_corpus.main([*args, "--output", str(tmp_path / "ref")])
    assert reference["samples"] == 44 and reference["dropped"]["duplicate"] == 4

    out = tmp_path / "out"
    kills = 0
    for target in (2, 6):  # kill -9 once after 2 shard records exist, again after 6
        proc = _run_cli([*args, "--output", str(out), "--workers", "2"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "_progress").glob("shard-*.json"))) >= target:
                workers = _children(proc.pid)
                os.kill(proc.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` would
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
        assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
        assert len(workers) == 2
        while workers and time.monotonic() < deadline:  # the workers die with it
            workers = [w for w in workers if Path(f"/proc/{w}").exists() and not _zombie(w)]
            time.sleep(0.01)
        assert not workers, f"worker processes {workers} outlived the killed job"
    assert kills == 2
    proc = _run_cli([*args, "--output", str(out)])
    log = proc.communicate()[0].decode()
    assert proc.returncode == 0, log
    assert "resuming after" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == reference
    assert not (out / "_progress").exists() and not list(out.glob(".*.tmp"))
    ref_files = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ref_files
    sources = [json.loads(f["json"])["source"] for f in read_shards(out).values()]
    assert len(sources) == len(set(sources)) == 44


def _interrupt_after(monkeypatch, n: int) -> None:
    """Make shard_corpus stop (as Ctrl-C would) after ``n`` outcomes."""
    real = shard_corpus._run

    def run(*a, **kw):
        for k, outcome in enumerate(real(*a, **kw)):
            if k == n:
                raise KeyboardInterrupt
            yield outcome
    monkeypatch.setattr(shard_corpus, "_run", run)


@pytest.mark.parametrize("lose_filter", [False, True])
def test_disk_backed_duplicate_filter_and_streamed_rejects_survive_interruption(tmp_path, monkeypatch, lose_filter):
    """The duplicate filter lives in _progress/dedupe.sqlite and rejects stream to disk; after an
    interruption the filter keeps only finished shards' hashes (or is rebuilt from the records
    when the file is lost, as on another machine) and the output equals an uninterrupted run's."""
    make_corpus(tmp_path / "corpus", n_good=16)
    args = ["--input", str(tmp_path / "corpus"), "--samples-per-shard", "3", "--workers", "1", *SMALL]
    reference = shard_corpus.main([*args, "--output", str(tmp_path / "ref")])
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 30)
        with pytest.raises(KeyboardInterrupt):
            shard_corpus.main([*args, "--output", str(out)])
    progress = out / "_progress"
    assert (progress / "dedupe.sqlite").is_file() and (progress / "rejects.open.jsonl").is_file()
    parts = sorted(progress.glob("shard-*.tar.rejects.jsonl"))
    records = [json.loads(p.read_text()) for p in sorted(progress.glob("shard-*.tar.json"))]
    assert parts and sum(r["rejects"] for r in records) == sum(len(p.read_text().splitlines()) for p in parts)
    if lose_filter:
        (progress / "dedupe.sqlite").unlink()
    assert shard_corpus.main([*args, "--output", str(out)]) == reference
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes()
                                                               for p in (tmp_path / "ref").iterdir()}


def test_seen_hashes_sync_drops_unfinished_and_restores_missing_shards(tmp_path):
    from dalle_ds.data.shards import Progress
    from data_prep._shard_state import SeenHashes

    progress = Progress(str(tmp_path))
    (tmp_path / "_progress").mkdir()
    hashes = [[f"{s:02x}{i:030x}" for i in range(3)] for s in range(3)]
    for s in range(3):
        (tmp_path / "_progress" / f"s{s}.json").write_text(json.dumps({"hashes": hashes[s]}))
    seen = SeenHashes(str(tmp_path / "db.sqlite"), "job-a")
    assert all(seen.add(h, 0) for h in hashes[0]) and not seen.add(hashes[0][1], 1)
    seen.commit(1)
    assert all(seen.add(h, 1) for h in hashes[1])  # shard 1 never committed (killed)
    seen.add("ff" * 16, 3)
    seen.close()
    seen = SeenHashes(str(tmp_path / "db.sqlite"), "job-a")
    assert len(seen) == 3 and seen.shards == 1
    seen.sync(progress, ["s0", "s1", "s2"])  # shards 1 and 2 are finished: re-added from their records
    assert len(seen) == 9 and seen.shards == 3 and not seen.add(hashes[2][2], 5)
    seen.sync(progress, ["s0"])  # fewer finished shards than the file knows: later rows go
    assert len(seen) == 3 and seen.add(hashes[1][0], 1)
    seen.close()
    other = SeenHashes(str(tmp_path / "db.sqlite"), "job-b")  # another job's file is emptied
    assert len(other) == 0
    other.close()


def test_output_with_foreign_tars_is_refused_and_overwrite_removes_a_foreign_jobs_shards(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus", n_good=8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "someone-else.tar").write_bytes(b"")
    args = ["--input", str(tmp_path / "corpus"), "--output", str(out), "--workers", "1", *SMALL]
    with pytest.raises(SystemExit, match=r"holds 1 \.tar file\(s\) this job did not write \(someone-else\.tar\)"):
        shard_corpus.main([*args, "--samples-per-shard", "4"])
    assert not (out / "_progress").exists()  # refused before claiming the output
    # a foreign job, interrupted: its shards (prefix "a") and its _progress are in the output
    (out / "someone-else.tar").unlink()
    with monkeypatch.context() as m:
        _interrupt_after(m, 20)
        with pytest.raises(KeyboardInterrupt):
            shard_corpus.main([*args, "--samples-per-shard", "3", "--prefix", "a"])
    assert list(out.glob("a-*.tar"))
    with pytest.raises(SystemExit, match="an unfinished job with other inputs or config"):
        shard_corpus.main([*args, "--samples-per-shard", "4"])
    m4 = shard_corpus.main([*args, "--samples-per-shard", "4", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl",
                                                      *(s["name"] for s in m4["shards"])]


def test_folder_with_tars_and_loose_images_reads_both(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(2):
            for name, data in ((f"{i:09d}.jpg", _jpeg(_noise(70 + i, 64, 64))), (f"{i:09d}.txt", b"a tar sample")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "00000.parquet").write_bytes(b"PAR1")  # img2dataset side files are not samples
    (folder / "00000_stats.json").write_text("{}")
    for i in range(3):
        (folder / f"loose{i}.jpg").write_bytes(_jpeg(_noise(80 + i, 64, 64)))
        (folder / f"loose{i}.txt").write_text(f"a loose image {i}")
    m = shard_corpus.main(["--input", str(folder), "--output", str(tmp_path / "out"), "--workers", "1", *SMALL])
    assert m["samples"] == m["inputs"] == 5
    assert sorted(f["txt"].decode() for f in read_shards(tmp_path / "out").values()) == [
        "a loose image 0", "a loose image 1", "a loose image 2", "a tar sample", "a tar sample"]


def _samples_by_content(out: Path) -> list[tuple[bytes, bytes, bytes]]:
    return sorted((f["json"], f["txt"], f["jpg"]) for f in read_shards(out).values())


def test_four_parts_and_finalize_equal_one_run(tmp_path, capsys):
    """--part/--num-parts split the inputs into contiguous ranges; --finalize merges the parts and
    drops duplicates across parts (first in input order kept): the same samples and counts as one run."""
    make_corpus(tmp_path / "corpus", n_good=10)
    base = ["--input", str(tmp_path / "corpus"), "--samples-per-shard", "3", "--workers", "1", *SMALL]
    one = shard_corpus.main([*base, "--output", str(tmp_path / "one")])
    for part in range(4):
        m = shard_corpus.main([*base, "--output", str(tmp_path / "four"), "--part", str(part), "--num-parts", "4"])
        assert m["config"]["part"] == part
    with pytest.raises(SystemExit):
        shard_corpus.main(["--output", str(tmp_path / "x")])
    assert "--input is required" in capsys.readouterr().err
    merged = shard_corpus.main(["--output", str(tmp_path / "four"), "--num-parts", "4", "--finalize"])
    assert merged["samples"] == one["samples"] and merged["inputs"] == one["inputs"]
    assert merged["dropped"] == one["dropped"] and merged["dropped"]["duplicate"] >= 1
    assert _samples_by_content(tmp_path / "four") == _samples_by_content(tmp_path / "one")
    rejects = (tmp_path / "four" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == sum(one["dropped"].values())
    again = shard_corpus.main(["--output", str(tmp_path / "four"), "--num-parts", "4", "--finalize"])
    assert again == merged  # finalize is repeatable: the recorded decisions, the same counts
    from dalle_ds.data.loaders import ImageShardLoader
    keys = _keys_of(ImageShardLoader(str(tmp_path / "four"), batch_size=4, mode="eval", size=16, infinite=False,
                                     shuffle=False))
    assert len(keys) == one["samples"]


def _keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["keys"]]


def test_part_comes_from_the_slurm_array(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")  # --array=1-5:2 -> ids 1, 3, 5 -> parts 0, 1, 2
    assert shard_corpus._array_part(None, None) == (2, 3)
    assert shard_corpus._array_part(0, 2) == (0, 2)  # explicit flags win
    with pytest.raises(SystemExit, match="need 0 <= part < num_parts"):
        shard_corpus._array_part(3, 2)


def test_resume_does_not_reread_consumed_tars(tmp_path, monkeypatch):
    """A resume starts at the tar holding the next sample: consumed tars are not opened again
    (here they are overwritten with zeros of the same size, which a re-read would notice)."""
    wds = tmp_path / "wds"
    wds.mkdir()
    for t in range(4):
        with tarfile.open(wds / f"{t:05d}.tar", "w") as tar:
            for i in range(5):
                for name, data in ((f"{t}{i:08d}.jpg", _jpeg(_noise(100 * t + i, 64, 64))),
                                   (f"{t}{i:08d}.txt", f"tar {t} sample {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    args = ["--input", str(wds), "--samples-per-shard", "4", "--workers", "1", *SMALL]
    reference = shard_corpus.main([*args, "--output", str(tmp_path / "ref")])
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 13)  # shards 0-2 (12 samples) finished: tars 0 and 1 consumed, tar 2 begun
        with pytest.raises(KeyboardInterrupt):
            shard_corpus.main([*args, "--output", str(out)])
    record = json.loads((out / "_progress" / "shard-000002.tar.json").read_text())
    assert record["next_item"] == 12 and record["cursor"] == [0, 2, 10]  # tar 2, whose first sample is 10
    for t in (0, 1):
        p = wds / f"{t:05d}.tar"
        p.write_bytes(bytes(p.stat().st_size))
    assert shard_corpus.main([*args, "--output", str(out)]) == reference
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes()
                                                               for p in (tmp_path / "ref").iterdir()}


def test_a_ten_mib_caption_is_truncated_or_dropped_and_counted(tmp_path):
    from data_prep._shard_sample import SampleConfig, _long_caption

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.jpg").write_bytes(_jpeg(_noise(300 + i, 64, 64)))
        (corpus / f"{i}.txt").write_text(f"an ordinary caption {i}")
    (corpus / "1.txt").write_text("many words " * (1 << 20))  # 11 MiB
    base = ["--input", str(corpus), "--workers", "1", *SMALL]
    m = shard_corpus.main([*base, "--output", str(tmp_path / "t")])
    assert m["samples"] == 3 and m["modified"] == {"caption_truncated": 1}
    long = [f["txt"] for f in read_shards(tmp_path / "t").values() if f["txt"].startswith(b"many")][0]
    assert 2040 <= len(long) <= 2048 and long.endswith(b"words")  # cut at a word boundary
    m = shard_corpus.main([*base, "--output", str(tmp_path / "d"), "--long-captions", "drop",
                           "--max-caption-bytes", "100"])
    assert m["samples"] == 2 and m["dropped"]["caption_too_long"] == 1 and m["modified"]["caption_truncated"] == 0
    cfg = SampleConfig(max_caption_bytes=7)
    assert _long_caption("ab cdéfg hij", cfg) == ("ab", True)  # 'é' is 2 bytes: "ab cdéf" would be 8
    assert _long_caption("abcdéfghij", cfg) == ("abcdéf", True)  # one long word: whole characters
    assert _long_caption("short", cfg) == ("short", False)


def test_resume_uses_the_listing_cached_when_the_job_began(tmp_path, monkeypatch, capsys):
    make_corpus(tmp_path / "corpus", n_good=8)
    args = ["--input", str(tmp_path / "corpus"), "--samples-per-shard", "3", "--workers", "1", *SMALL]
    reference = shard_corpus.main([*args, "--output", str(tmp_path / "ref")])
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 10)
        with pytest.raises(KeyboardInterrupt):
            shard_corpus.main([*args, "--output", str(out)])
    assert (out / "_progress" / "listing.json").is_file()
    (tmp_path / "corpus" / "zz" / "added-later.jpg").write_bytes(_jpeg(_noise(999, 64, 64)))
    (tmp_path / "corpus" / "zz" / "added-later.txt").write_text("a file added after the job began")
    capsys.readouterr()
    assert shard_corpus.main([*args, "--output", str(out)]) == reference  # not listed again: same inputs
    assert "inputs as listed when this job began" in capsys.readouterr().out
    assert not (out / "_progress").exists()


def test_boilerplate_captions_are_dropped_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    captions = ["IMG_1234.JPG", "Royalty free stock photo of a cat", "a photo of a red cat", "my own words here",
                "picture perfect sunset over the sea"]
    for i, c in enumerate(captions):
        (corpus / f"{i}.jpg").write_bytes(_jpeg(_noise(400 + i, 64, 64)))
        (corpus / f"{i}.txt").write_text(c)
    base = ["--input", str(corpus), "--workers", "1", *SMALL, "--min-caption-words", "1"]
    m = shard_corpus.main([*base, "--output", str(tmp_path / "a")])
    assert m["samples"] == 3 and m["dropped"]["caption_boilerplate"] == 2
    assert shard_corpus.main([*base, "--output", str(tmp_path / "a")]) == m  # a re-run finds it complete
    m = shard_corpus.main([*base, "--output", str(tmp_path / "b"), "--no-default-boilerplate",
                           "--boilerplate-pattern", r"\bown words\b"])
    assert m["samples"] == 4 and m["dropped"]["caption_boilerplate"] == 1
    rejects = [json.loads(x) for x in (tmp_path / "b" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["reason"] == "caption_boilerplate" and "own words" in rejects[0]["detail"]
