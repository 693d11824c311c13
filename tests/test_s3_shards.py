"""Sharding to and from a real S3-compatible server (SeaweedFS on 127.0.0.1, see tests/s3_server.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dalle_ds.data import storage
from dalle_ds.data.tokenizer import TextTokenizer
from data_prep import shard_corpus, train_text_tokenizer
from tests.s3_server import ACCESS_KEY, SECRET_KEY
from tests.test_shard_corpus import SMALL, _jpeg, make_corpus

REPO = Path(__file__).resolve().parents[1]


def _upload_tree(s3_server, local: Path, url: str) -> None:
    bucket, key = storage.split_s3(url)
    client = s3_server.client()
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.put_object(Bucket=bucket, Key=key + p.relative_to(local).as_posix(), Body=p.read_bytes())


def _all_objects(url: str) -> dict[str, bytes]:
    bucket, key = storage.split_s3(url)
    out = {}
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for o in page.get("Contents", []):
            out[o["Key"][len(key):]] = storage.read_bytes(f"s3://{bucket}/{o['Key']}")
    return out


def test_shard_local_corpus_to_s3_and_read_back_with_webdataset(s3_server, tmp_path):
    want = make_corpus(tmp_path / "corpus")
    out = s3_server.prefix()
    m = shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", out, "--samples-per-shard", "7",
                           "--workers", "2", *SMALL])
    assert (m["inputs"], m["samples"]) == (want["inputs"], want["kept"])
    assert storage.read_json(out + "manifest.json") == m
    urls = storage.expand_urls(out)
    assert [u.rsplit("/", 1)[-1] for u in urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == want["kept"] and len({s["__key__"] for s in samples}) == want["kept"]
    for s in samples:
        assert s["jpg"].mode == "RGB" and min(s["jpg"].size) == 48
        assert isinstance(s["txt"], str) and s["json"]["source"].startswith(str(tmp_path / "corpus"))
    objects = _all_objects(out)
    assert set(objects) == {"manifest.json", "rejects.jsonl", *(u.rsplit("/", 1)[-1] for u in urls)}
    rejects = objects["rejects.jsonl"].decode().splitlines()
    assert len(rejects) == sum(want["dropped"].values())
    for name, data in objects.items():  # credentials never end up in the output
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, name
    # same bytes as a local run: the output location does not change the shards
    local = shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "local"),
                               "--samples-per-shard", "7", "--workers", "1", *SMALL])
    assert local == m
    for u in urls:
        assert objects[u.rsplit("/", 1)[-1]] == (tmp_path / "local" / u.rsplit("/", 1)[-1]).read_bytes()


def test_s3_inputs_unreadable_objects_and_tokenizer_on_s3(s3_server, tmp_path):
    want = make_corpus(tmp_path / "corpus", n_good=6, seed=3)
    root = s3_server.prefix()
    _upload_tree(s3_server, tmp_path / "corpus", root + "folder/")
    goods = sorted(p for p in (tmp_path / "corpus").rglob("good*.jpg"))
    table = ("image\tcaption\n"
             f"{goods[0].relative_to(tmp_path / 'corpus').as_posix()}\ta relative s3 key\n"
             f"{root}folder/{goods[1].relative_to(tmp_path / 'corpus').as_posix()}\tan absolute s3 url\n"
             "no/such/object.jpg\tan object that is not there\n"
             f"s3://no-such-bucket-dalle/x.jpg\ta bucket that is not there\n")
    # the table's relative paths resolve against its own prefix: put it inside the corpus prefix
    storage.write_bytes_atomic(root + "folder/pairs.tsv", table.encode())
    out = s3_server.prefix()
    proc = subprocess.run(
        [sys.executable, str(REPO / "data_prep/shard_corpus.py"), "--input", root + "folder/pairs.tsv",
         root + "folder/", "--output", out, "--samples-per-shard", "4", "--workers", "2", *SMALL,
         "--s3-endpoint", s3_server.endpoint],  # the flag instead of AWS_ENDPOINT_URL
        env={k: v for k, v in dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1").items()
             if k != "AWS_ENDPOINT_URL"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert SECRET_KEY not in proc.stdout + proc.stderr and ACCESS_KEY not in proc.stdout + proc.stderr
    m = storage.read_json(out + "manifest.json")
    # the folder prefix holds the table too: one more (caption-less) sample there
    assert m["inputs"] == 4 + want["inputs"] + 1
    assert m["samples"] + sum(m["dropped"].values()) == m["inputs"]
    rejects = [json.loads(x) for x in storage.read_bytes(out + "rejects.jsonl").decode().splitlines()]
    unreadable = {r["source"] for r in rejects if r["reason"] == "read_error"}
    assert f"{root}folder/no/such/object.jpg" in unreadable and "s3://no-such-bucket-dalle/x.jpg" in unreadable
    # table rows come first: the folder's copies of those two images are duplicates (+ the corpus's own one)
    dups = {r["source"] for r in rejects if r["reason"] == "duplicate"}
    copies = {f"{root}folder/{g.relative_to(tmp_path / 'corpus').as_posix()}" for g in goods[:2]}
    assert len(dups) == 3 and copies < dups
    # tokenizer straight from the S3 shards to an S3 file
    tok_url = out + "tokenizer.json"
    train_text_tokenizer.main(["--shards", out, "--vocab-size", "300", "--output", tok_url, "--no-progress"])
    tok = TextTokenizer.from_file(tok_url, text_len=16, vocab_size=300)
    assert tok.decode(tok.encode(["A relative S3 key"])) == ["a relative s3 key"]


def test_big_shard_goes_up_multipart_and_resumes_after_kill(s3_server, tmp_path):
    corpus = tmp_path / "noise"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):  # 384 px noise, quality 100: about 290 KB per JPEG, so 36 samples make a > 8 MB shard
        (corpus / f"{i:03d}.jpg").write_bytes(_jpeg(Image.fromarray(rng.integers(0, 256, (384, 384, 3), np.uint8))))
        (corpus / f"{i:03d}.txt").write_text(f"noise picture {i}")
    out = s3_server.prefix()
    args = [str(REPO / "data_prep/shard_corpus.py"), "--input", str(corpus), "--output", out,
            "--samples-per-shard", "36", "--workers", "1", "--jpeg-quality", "100", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    bucket, key = storage.split_s3(out)
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        # The job is stopped while the bucket is listed, so it cannot finish the second shard between a
        # listing and the kill however slow the listing is (a race CI lost once on a fast machine).
        os.killpg(proc.pid, signal.SIGSTOP)
        listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key + "_progress/shard-")
        if listing.get("KeyCount", 0) >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    proc.wait()
    assert not storage.exists(out + "manifest.json"), "finished before it could be killed"
    done = subprocess.run([sys.executable, *args, "--workers", "2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming after" in done.stdout
    m = storage.read_json(out + "manifest.json")
    assert [s["samples"] for s in m["shards"]] == [36, 12]
    head = s3_server.client().head_object(Bucket=bucket, Key=key + "shard-000000.tar")
    assert head["ContentLength"] > 8 * 2**20 and "-" in head["ETag"], head  # a multipart upload's ETag
    keys = []
    for s in m["shards"]:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(out + s["name"]))) as tar:
            keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".jpg")]
    assert sorted(keys) == [f"{i:09d}" for i in range(48)]  # every sample exactly once
