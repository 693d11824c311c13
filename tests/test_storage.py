import json

import pytest
import webdataset as wds

from dalle_ds.data import storage


def _make(tmp_path, names):
    for n in names:
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_expand_brace_dir_glob_and_lists(tmp_path):
    _make(tmp_path, ["a/s-000000.tar", "a/s-000001.tar", "a/s-000002.tar", "a/notes.txt", "b/t.tar"])
    brace = storage.expand_urls(str(tmp_path / "a/s-{000000..000001}.tar"))
    assert [p.split("/")[-1] for p in brace] == ["s-000000.tar", "s-000001.tar"]
    assert len(storage.expand_urls(str(tmp_path / "a"))) == 3  # directory: *.tar only, sorted
    assert len(storage.expand_urls(str(tmp_path / "a/*.tar"))) == 3
    both = storage.expand_urls(f"{tmp_path / 'a/s-000002.tar'},{tmp_path / 'b'}")
    assert both[0].endswith("s-000002.tar") and both[1].endswith("t.tar")


def test_expand_errors_name_the_spec(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: directory has no .tar files"):
        storage.expand_urls(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="glob matches no files"):
        storage.expand_urls(str(tmp_path / "nope-*.tar"))


def test_atomic_writes_leave_no_temp_files(tmp_path):
    target = tmp_path / "d" / "manifest.json"
    storage.write_json_atomic(str(target), {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    storage.write_json_atomic(str(target), {"c": 3})
    assert storage.read_json(str(target)) == {"c": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00" * 3000)
    storage.upload_file(src, str(tmp_path / "out" / "copy.bin"))
    assert storage.read_bytes(str(tmp_path / "out" / "copy.bin")) == b"\x00" * 3000
    assert storage.listdir(str(tmp_path / "out")) == ["copy.bin"]


def test_local_shards_read_through_webdataset(tmp_path):
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"{i:04d}", "txt": f"caption {i}"})
    got = [s["txt"].decode() for s in wds.WebDataset(storage.expand_urls(str(tmp_path)), shardshuffle=False)]
    assert got == ["caption 0", "caption 1", "caption 2"]


def test_split_s3_validates():
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///x")


# ---------------------------------------------------------------- flaky S3 (real server, faults injected)


def test_s3_reads_survive_dropped_connections_and_count_retries(s3_server, monkeypatch):
    import os

    from tests.fault_proxy import FaultProxy

    url = s3_server.prefix() + "flaky.bin"
    data = os.urandom(300_000)
    storage.write_bytes_atomic(url, data)
    key = url.split("/", 3)[3].encode()
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    with FaultProxy(s3_server.endpoint, match=key, cuts=3, after=5000) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        before = storage.RETRIES["s3_read"]
        assert storage.read_bytes(url) == data  # three connections cut mid-body, resumed by Range
        assert storage.RETRIES["s3_read"] - before == 3 and proxy.cut_count == 3
    with FaultProxy(s3_server.endpoint, match=key, cuts=1000, after=100) as proxy:  # never gets anywhere
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with pytest.raises(OSError, match=r"flaky\.bin: "):  # an error naming the object, not a hang
            storage.read_bytes(url)


def test_incomplete_multipart_uploads_are_aborted(s3_server, tmp_path):
    from data_prep import shard_corpus
    from tests.test_shard_corpus import SMALL, make_corpus

    out = s3_server.prefix()
    client = s3_server.client()
    bucket, key = storage.split_s3(out + "shard-000000.tar")
    up = client.create_multipart_upload(Bucket=bucket, Key=key)  # as a job killed mid-upload leaves it
    client.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))
    prefix = storage.split_s3(out)[1]
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")
    make_corpus(tmp_path / "corpus", n_good=4)
    shard_corpus.main(["--input", str(tmp_path / "corpus"), "--output", out, "--workers", "1", *SMALL])
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")
    assert storage.abort_multipart_uploads(out) == 0
