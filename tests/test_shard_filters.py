"""shard_corpus's App. C filters beyond single files, on real files and the real S3 server:
caption language (py3langid), repeated captions, pHash near-duplicates (single run, parts +
finalize, resume) and .parquet input tables (img2dataset's formats, Hugging Face image structs)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import shard_corpus
from data_prep._shard_filters import _dct_matrix, caption_language, hamming, near_bands, perceptual_hash
from data_prep._shard_state import OrderRules, SeenHashes
from tests.test_shard_corpus import SMALL, _interrupt_after, _jpeg, _noise, read_shards


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def _reencoded(im: Image.Image, quality: int = 50, scale: float = 0.9) -> Image.Image:
    small = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


# ---------------------------------------------------------------- pHash


def test_phash_dct_is_orthonormal_and_matches_the_definition():
    d = _dct_matrix(32)
    assert np.allclose(d @ d.T, np.eye(32), atol=1e-12)
    x = np.random.default_rng(0).normal(size=32)
    k = 3  # DCT-II by its definition: sqrt(2/N) * sum x_i cos(pi (2i+1) k / 2N)
    direct = np.sqrt(2 / 32) * sum(x[i] * np.cos(np.pi * (2 * i + 1) * k / 64) for i in range(32))
    assert np.isclose((d @ x)[k], direct)


def test_phash_is_stable_under_reencoding_and_far_for_other_images():
    images = [_noise(700 + s, 96, 80) for s in range(12)]
    hashes = [perceptual_hash(_rgb(im)) for im in images]
    assert all(0 <= h < 1 << 64 for h in hashes)
    assert perceptual_hash(_rgb(images[0])) == hashes[0]  # deterministic
    near = [hamming(h, perceptual_hash(_rgb(_reencoded(im)))) for im, h in zip(images, hashes)]
    far = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert max(near) <= 6, near  # JPEG quality 50 and a 0.9x resize move a few bits
    assert min(far) >= 14, min(far)  # unrelated images: about half of the 64 bits differ
    flat = perceptual_hash(np.full((64, 64, 3), 128, np.uint8))  # no structure: only the DC term is set
    assert flat == 1 << 63


@pytest.mark.parametrize("distance", [0, 1, 5, 16])
def test_near_bands_find_every_hash_within_the_distance(distance):
    """Pigeonhole: hashes within D bits share at least one of the D + 1 bands exactly."""
    rng = np.random.default_rng(distance)
    for _ in range(200):
        a = int(rng.integers(0, 1 << 63)) * 2 + int(rng.integers(0, 2))
        b = a
        for bit in rng.choice(64, size=int(rng.integers(0, distance + 1)), replace=False):
            b ^= 1 << int(bit)
        assert set(near_bands(a, distance)) & set(near_bands(b, distance))
    assert len(near_bands(a, distance)) == distance + 1


def test_seen_hashes_order_rules_check_and_resume_rows(tmp_path):
    seen = SeenHashes(str(tmp_path / "db.sqlite"), "job", OrderRules(phash_distance=3, max_caption_repeats=2))
    cap = b"c" * 16
    assert seen.check("00" * 16, cap, 0xF0F0) is None
    seen.keep("00" * 16, cap, 0xF0F0, 0)
    assert seen.check("00" * 16, cap, 0xF0F0)[0] == "duplicate"
    assert seen.check("01" * 16, b"d" * 16, 0xF0F0 ^ 0b111)[0] == "near_duplicate"
    assert seen.check("01" * 16, b"d" * 16, 0xF0F0 ^ 0b1111) is None  # 4 bits away
    seen.keep("02" * 16, cap, 0x0123456789ABCDEF, 0)
    seen.commit(1)
    assert seen.check("03" * 16, cap, 0xFEDCBA9876543210)[0] == "caption_repeated"  # 2 kept already
    seen.keep("04" * 16, b"e" * 16, 0x5555555555555555, 1)  # shard 1, never committed
    seen.close()
    seen = SeenHashes(str(tmp_path / "db.sqlite"), "job", OrderRules(phash_distance=3, max_caption_repeats=2))
    assert seen.check("05" * 16, b"f" * 16, 0x5555555555555555) is None  # the uncommitted shard's rows are gone
    with pytest.raises(ValueError, match="phash-distance=17"):
        OrderRules(phash_distance=17)


# ---------------------------------------------------------------- caption language


def test_language_detector_ships_with_the_wheel():
    assert caption_language("un chat noir dort sur le toit de la maison")[0] == "fr"
    assert caption_language("ein roter Würfel liegt auf einem blauen Tisch")[0] == "de"
    assert caption_language("a black cat sleeping on the roof of the house")[0] == "en"


def test_caption_language_filter_counts_and_names_the_language(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    captions = ["a black cat sleeping on the roof of the house", "un chat noir dort sur le toit de la maison",
                "ein roter Würfel liegt auf einem blauen Tisch", "two dogs playing with a ball in the park",
                "un perro marrón corre por la playa al atardecer"]
    for i, c in enumerate(captions):
        (corpus / f"{i}.jpg").write_bytes(_jpeg(_noise(300 + i, 64, 64)))
        (corpus / f"{i}.txt").write_text(c)
    base = ["--input", str(corpus), "--workers", "1", *SMALL]
    m = shard_corpus.main([*base, "--output", str(tmp_path / "en"), "--languages", "en"])
    assert m["samples"] == 2 and m["dropped"]["caption_language"] == 3
    assert m["config"]["languages"] == ["en"]
    kept = sorted(s["txt"].decode() for s in read_shards(tmp_path / "en").values())
    assert kept == sorted([captions[0], captions[3]])
    rejects = [json.loads(x) for x in (tmp_path / "en" / "rejects.jsonl").read_text().splitlines()]
    assert {r["detail"].split(": ")[1].split(" ")[0] for r in rejects} == {"fr", "de", "es"}
    m = shard_corpus.main([*base, "--output", str(tmp_path / "enfr"), "--languages", "en", "fr"])
    assert m["samples"] == 3
    m = shard_corpus.main([*base, "--output", str(tmp_path / "sure"), "--languages", "en", "fr", "de", "es",
                           "--min-language-confidence", "1.0"])
    assert m["samples"] == 0 and m["dropped"]["caption_language"] == 5  # nothing is that certain
    m = shard_corpus.main([*base, "--output", str(tmp_path / "any")])
    assert m["samples"] == 5 and m["dropped"]["caption_language"] == 0  # off by default, still counted


def test_unknown_language_code_is_one_clear_error(tmp_path, capsys):
    from dalle_ds.cli_args import run

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jpg").write_bytes(_jpeg(_noise(1, 64, 64)))
    code = run(shard_corpus.main, ["--input", str(tmp_path / "c"), "--output", str(tmp_path / "o"),
                                   "--languages", "english", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--languages" in err and "'english'" in err


# ---------------------------------------------------------------- order-dependent filters: one run, parts, resume


def make_repeats_corpus(root: Path) -> dict:
    """Samples whose fate depends on earlier kept ones, in sorted (input) order:
    - caption "a red cube on a blue table" 5 times (distinct images): with N=2, the 3rd-5th are repeats;
    - an exact copy and a re-encoded near copy of earlier images;
    - sample 'k1' (caption repeated a 3rd time -> dropped) and later 'k2' with the same pixels and a new
      caption: k2 is kept, because the copy it duplicates was never kept;
    - a near copy of a near copy's original is judged against kept images only."""
    root.mkdir(parents=True)
    names = []

    def put(name: str, im: Image.Image, caption: str) -> None:
        (root / f"{name}.png").write_bytes(_png_bytes(im))
        (root / f"{name}.txt").write_text(caption)
        names.append(name)

    red = "a red cube on a blue table"
    put("a0", _noise(1, 64, 64), red)
    put("a1", _noise(2, 64, 64), "A Red Cube  on a blue table")  # the same caption (case, spaces)
    put("b0", _noise(3, 64, 64), "a green ball under a chair")
    put("b1", _noise(1, 64, 64), "the first image again")  # exact duplicate of a0
    put("c0", _reencoded(_noise(3, 64, 64)), "the green ball re-encoded")  # near duplicate of b0
    put("d0", _noise(4, 64, 64), "a yellow star in the sky")
    put("k1", _noise(5, 64, 64), red)  # the third red: caption_repeated
    put("m0", _noise(6, 64, 64), red)  # the fourth red: caption_repeated
    put("m1", _noise(7, 64, 64), "a purple cone on grass")
    put("k2", _noise(5, 64, 64), "the pixels of k1 with a new caption")  # kept: k1 was not kept
    put("z0", _noise(8, 64, 64), "a white cloud over hills")
    put("z1", _noise(9, 64, 64), red)  # the fifth red: caption_repeated
    return {"inputs": 12, "kept": 7, "dropped": {"duplicate": 1, "near_duplicate": 1, "caption_repeated": 3}}


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _captions(out: Path) -> list[str]:
    return sorted(s["txt"].decode() for s in read_shards(out).values())


ORDER = ["--max-caption-repeats", "2", "--phash-distance", "6"]


def test_repeats_and_near_duplicates_one_run_parts_and_resume_agree(tmp_path, monkeypatch):
    want = make_repeats_corpus(tmp_path / "corpus")
    base = ["--input", str(tmp_path / "corpus"), "--samples-per-shard", "2", "--workers", "1", *SMALL, *ORDER]
    one = shard_corpus.main([*base, "--output", str(tmp_path / "one")])
    assert (one["inputs"], one["samples"]) == (want["inputs"], want["kept"])
    assert {k: v for k, v in one["dropped"].items() if v} == want["dropped"]
    assert set(one["dropped"]) >= {"near_duplicate", "caption_repeated", "caption_language"}  # zeros listed too
    kept = _captions(tmp_path / "one")
    assert "the pixels of k1 with a new caption" in kept and "the first image again" not in kept
    assert sum(c.lower().split() == "a red cube on a blue table".split() for c in kept) == 2
    metas = [json.loads(s["json"]) for s in read_shards(tmp_path / "one").values()]
    assert all(len(m["phash"]) == 16 for m in metas)

    # three parts: k1 and k2 fall in part 1, whose own view would keep k1 (its first red) and drop k2
    for part in range(3):
        shard_corpus.main([*base, "--output", str(tmp_path / "three"), "--part", str(part), "--num-parts", "3"])
    merged = shard_corpus.main(["--output", str(tmp_path / "three"), "--num-parts", "3", "--finalize"])
    assert (merged["samples"], merged["dropped"]) == (one["samples"], one["dropped"])
    assert _captions(tmp_path / "three") == kept
    rejects = [json.loads(x) for x in (tmp_path / "three" / "rejects.jsonl").read_text().splitlines()]
    one_rejects = [json.loads(x) for x in (tmp_path / "one" / "rejects.jsonl").read_text().splitlines()]
    # the same rejects with the same global input indices (only the order of lines differs)
    assert sorted((r["index"], r["reason"]) for r in rejects) == sorted((r["index"], r["reason"]) for r in one_rejects)

    # interrupted after 7 outcomes (3 shards finished), the filter file lost: rebuilt from the records
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _interrupt_after(m, 7)
        with pytest.raises(KeyboardInterrupt):
            shard_corpus.main([*base, "--output", str(out)])
    (out / "_progress" / "dedupe.sqlite").unlink()
    again = shard_corpus.main([*base, "--output", str(out)])
    assert again == one
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes()
                                                               for p in (tmp_path / "one").iterdir()}


def test_a_killed_finalize_rerun_reaches_the_same_verdicts(tmp_path, monkeypatch):
    """finalize records each shard's verdicts before rewriting it: interrupted after its first
    rewrite and run again, it keeps what it decided and judges the rest as one run does."""
    from data_prep import _shard_parts

    make_repeats_corpus(tmp_path / "corpus")
    base = ["--input", str(tmp_path / "corpus"), "--samples-per-shard", "2", "--workers", "1", *SMALL, *ORDER]
    one = shard_corpus.main([*base, "--output", str(tmp_path / "one")])
    for part in range(3):
        shard_corpus.main([*base, "--output", str(tmp_path / "three"), "--part", str(part), "--num-parts", "3"])
    real, calls = _shard_parts._rewrite, []

    def rewrite_then_die(*a):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a)
    with monkeypatch.context() as m:
        m.setattr(_shard_parts, "_rewrite", rewrite_then_die)
        with pytest.raises(KeyboardInterrupt):
            shard_corpus.main(["--output", str(tmp_path / "three"), "--num-parts", "3", "--finalize"])
    assert not (tmp_path / "three" / "manifest.json").exists()
    merged = shard_corpus.main(["--output", str(tmp_path / "three"), "--num-parts", "3", "--finalize"])
    assert (merged["samples"], merged["dropped"]) == (one["samples"], one["dropped"])
    assert _captions(tmp_path / "three") == _captions(tmp_path / "one")


def test_parts_with_different_order_rules_refuse_to_finalize(tmp_path):
    make_repeats_corpus(tmp_path / "corpus")
    base = ["--input", str(tmp_path / "corpus"), "--workers", "1", *SMALL, "--num-parts", "2",
            "--output", str(tmp_path / "o")]
    shard_corpus.main([*base, "--part", "0", "--max-caption-repeats", "2"])
    shard_corpus.main([*base, "--part", "1", "--max-caption-repeats", "3"])
    with pytest.raises(SystemExit, match="different --phash-distance / --max-caption-repeats"):
        shard_corpus.main(["--output", str(tmp_path / "o"), "--num-parts", "2", "--finalize"])


# ---------------------------------------------------------------- parquet inputs


def _images(n: int, seed: int = 0) -> list[bytes]:
    return [_jpeg(_noise(seed + i, 64, 64)) for i in range(n)]


def test_parquet_with_image_bytes_img2dataset_and_hugging_face_layouts(tmp_path):
    imgs = _images(4, seed=50)
    # img2dataset --output_format parquet: the image in a binary column named after its encoding
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002"],
                             "jpg": [imgs[0], b"not an image", imgs[1]],
                             "txt": ["a parquet row with bytes", "a broken image row", None]}),
                   tmp_path / "img2dataset.parquet", row_group_size=2)
    # Hugging Face datasets: {"bytes", "path"} structs, written in small row groups
    pq.write_table(pa.table({"image": [{"bytes": imgs[2], "path": "x.jpg"}, {"bytes": imgs[3], "path": "y.jpg"}],
                             "text": ["a hugging face row", "another hugging face row"]}),
                   tmp_path / "hf.parquet", row_group_size=1)
    # img2dataset --output_format files: 00000.parquet (metadata) beside 00000/<key>.jpg
    files = tmp_path / "files"
    (files / "00000").mkdir(parents=True)
    for i, data in enumerate(_images(2, seed=60)):
        (files / "00000" / f"00000000{i}.jpg").write_bytes(data)
        (files / "00000" / f"00000000{i}.txt").write_text(f"img2dataset files sample {i}")
    pq.write_table(pa.table({"url": ["http://a/0.jpg", "http://a/1.jpg", "http://a/2.jpg"],
                             "caption": ["metadata row zero", "metadata row one", "metadata row two"],
                             "key": ["000000000", "000000001", "000000002"],
                             "status": ["success", "success", "failed_to_download"],
                             "error_message": [None, None, "HTTP 404"]}), files / "00000.parquet")
    m = shard_corpus.main(["--input", str(tmp_path / "img2dataset.parquet"), str(tmp_path / "hf.parquet"),
                           str(files / "00000.parquet"), "--output", str(tmp_path / "out"), "--workers", "2", *SMALL])
    dropped = {k: v for k, v in m["dropped"].items() if v}
    assert m["samples"] == 5 and dropped == {"not_an_image": 1, "missing_caption": 1, "missing_image": 1}
    assert _captions(tmp_path / "out") == ["a hugging face row", "a parquet row with bytes",
                                           "another hugging face row", "metadata row one", "metadata row zero"]
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert any("failed_to_download" in r["detail"] and "HTTP 404" in r["detail"] for r in rejects)

    # the files layout given as a folder: its images and .txt captions; the metadata parquet is a side file
    m = shard_corpus.main(["--input", str(files), "--output", str(tmp_path / "folder"), "--workers", "1", *SMALL])
    assert m["samples"] == 2 and _captions(tmp_path / "folder") == ["img2dataset files sample 0",
                                                                    "img2dataset files sample 1"]
    # a folder of parquet files only (img2dataset's parquet output) is read as tables, one unit each
    tables = tmp_path / "tables"
    tables.mkdir()
    for k in range(2):
        (tables / f"{k:05d}.parquet").write_bytes((tmp_path / ("img2dataset.parquet", "hf.parquet")[k]).read_bytes())
    m = shard_corpus.main(["--input", str(tables), "--output", str(tmp_path / "t"), "--workers", "1", *SMALL])
    assert m["samples"] == 3 and m["inputs"] == 5


def test_parquet_without_an_image_or_caption_column_names_the_columns(tmp_path):
    pq.write_table(pa.table({"caption": ["a caption here"], "width": [5]}), tmp_path / "noimage.parquet")
    with pytest.raises(ValueError, match=r"noimage.parquet: no image column .*'caption', 'width'"):
        shard_corpus.main(["--input", str(tmp_path / "noimage.parquet"), "--output", str(tmp_path / "o"),
                           "--workers", "1", *SMALL])
    pq.write_table(pa.table({"jpg": [b"x"], "width": [5]}), tmp_path / "nocaption.parquet")
    with pytest.raises(ValueError, match=r"nocaption.parquet: no caption column"):
        shard_corpus.main(["--input", str(tmp_path / "nocaption.parquet"), "--output", str(tmp_path / "p"),
                           "--workers", "1", *SMALL])


def test_parquet_on_s3_through_a_dropped_connection(s3_server, tmp_path, monkeypatch):
    """A parquet table on the real S3 server is copied to a temp file (readers seek to the footer);
    the copy survives connections dropped mid-body (storage's ranged retry)."""
    from dalle_ds.data import storage
    from tests.fault_proxy import FaultProxy

    buf = io.BytesIO()
    pq.write_table(pa.table({"jpg": _images(3, seed=80), "caption": [f"an s3 parquet row {i}" for i in range(3)]}),
                   buf)
    url = s3_server.prefix() + "t.parquet"
    storage.write_bytes_atomic(url, buf.getvalue())
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    with FaultProxy(s3_server.endpoint, match=url.split("/", 3)[3].encode(), cuts=2, after=3000) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        m = shard_corpus.main(["--input", url, "--output", str(tmp_path / "o"), "--workers", "1", *SMALL])
        assert proxy.cut_count == 2
    assert m["samples"] == 3 and _captions(tmp_path / "o") == [f"an s3 parquet row {i}" for i in range(3)]
