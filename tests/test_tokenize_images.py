"""data_prep/tokenize_images.py: token format round trip, manifest and the trainer-side refusal,
rank / array-task splits, resume after kill -9, --verify PSNR, bad input, S3 on both sides.

The dVAE is a tiny randomly initialised DiscreteVAE exported with dalle_ds.models.dvae.save_dvae; image
shards are real webdataset tars with one corrupt JPEG and one sample without a caption; the S3
store and the SLURM cluster (for slurm/tokenize_images.sh as a job array) are real local servers."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dalle_ds.data import storage
from dalle_ds.data.augment import Augment
from dalle_ds.config import DVAEConfig
from dalle_ds.data.loaders import TokenShardLoader, check_token_manifest, iter_shard
from dalle_ds.models.dvae import DiscreteVAE, save_dvae
from dalle_ds.models.dvae_io import dvae_hash, load_dvae
from data_prep import tokenize_images as tok
from tests.multirank import run_ranks
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
SIZE, CFG = 16, DVAEConfig(n_hid=16, n_blk_per_group=1, group_count=2, codebook_size=64, n_init=16)
GRID = SIZE // CFG.downsample
COUNTS = [4, 3, 5, 2, 4]  # 5 shards; shard 1 has a corrupt JPEG, shard 3 a sample without caption
BAD = {"s01i001": "corrupt_image", "s03i000": "missing_caption"}


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, counts: list[int] = COUNTS) -> dict[str, dict]:
    """Image shards; returns key -> {"jpg", "txt", "json", "shard"} for every sample written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = {}
    for s, n in enumerate(counts):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for i in range(n):
                key = f"s{s:02d}i{i:03d}"
                h, w_ = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                sample = {"__key__": key, "jpg": _jpeg(rng, h, w_), "txt": f"a caption for {key}".encode(),
                          "json": json.dumps({"width": w_, "height": h}).encode()}
                if BAD.get(key) == "corrupt_image":
                    sample["jpg"] = sample["jpg"][:40]  # a truncated JPEG
                if BAD.get(key) == "missing_caption":
                    del sample["txt"]
                w.write(sample)
                samples[key] = {**sample, "shard": f"shard-{s:06d}.tar"}
    return samples


def make_export(folder: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    save_dvae(DiscreteVAE(CFG), str(folder), extra={"image_size": SIZE})
    return str(folder)


def preprocess(jpg: bytes) -> torch.Tensor:
    return Augment("eval", SIZE)(Image.open(io.BytesIO(jpg))).float().div(255.0)  # (3, S, S) in [0, 1]


def read_tokens(folder: str) -> dict[str, dict]:
    """key -> {"codes", "txt", "json", "shard"} over every token shard in the folder (keys must be unique)."""
    out: dict[str, dict] = {}
    for url in storage.expand_urls(folder):
        for s in iter_shard(url):
            assert s["__key__"] not in out, f"{s['__key__']} twice"
            out[s["__key__"]] = {"codes": np.frombuffer(s["codes"], "<u2"), "txt": s["txt"],
                                 "json": json.loads(s["json"]), "shard": tok.shard_name(url)}
    return out


def run(export: str, shards: str, out: str, *extra: str) -> dict:
    return tok.main(["--dvae", export, "--input", shards, "--output", out, "--batch-size", "3", "--no-progress",
                     *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize")
    samples = write_shards(root / "shards")
    export = make_export(root / "export")
    result = run(export, str(root / "shards"), str(root / "tokens"), "--verify", "7")
    return {"root": root, "samples": samples, "export": export, "shards": str(root / "shards"),
            "tokens": str(root / "tokens"), "result": result}


# ---------------------------------------------------------------- format and manifest


def test_round_trip_codes_equal_dvae_encode(corpus):
    vae = load_dvae(corpus["export"])
    tokens = read_tokens(corpus["tokens"])
    kept = {k: s for k, s in corpus["samples"].items() if k not in BAD}
    assert sorted(tokens) == sorted(kept)
    keys = sorted(kept)
    x = torch.stack([preprocess(kept[k]["jpg"]) for k in keys])  # (N, 3, S, S)
    want = vae.encode(x).flatten(1).numpy()  # (N, grid*grid)
    got = np.stack([tokens[k]["codes"] for k in keys])
    assert got.shape == (len(keys), GRID * GRID) and got.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(got.astype(np.int64), want)
    for k in keys:
        assert tokens[k]["txt"] == kept[k]["txt"]
        assert tokens[k]["shard"] == kept[k]["shard"]  # one token shard per image shard, same name
        assert tokens[k]["json"] == {**json.loads(kept[k]["json"]), "source_shard": kept[k]["shard"]}
    # stored order within a shard is the input order
    for url in storage.expand_urls(corpus["tokens"]):
        names = [s["__key__"] for s in iter_shard(url)]
        assert names == sorted(names)


def test_manifest_and_trainer_refusal(corpus, tmp_path):
    m = json.loads((Path(corpus["tokens"]) / "manifest.json").read_text())
    h = dvae_hash(corpus["export"])
    meta = json.loads((Path(corpus["export"]) / "config.json").read_text())
    assert h == meta["weights_sha256"] == m["dvae_hash"] == load_dvae(corpus["export"]).export_meta["dvae_hash"]
    assert (m["grid_size"], m["codebook_size"], m["image_size"]) == (GRID, CFG.codebook_size, SIZE)
    per_shard = Counter(s["shard"] for k, s in corpus["samples"].items() if k not in BAD)
    assert m["shards"] == [{"name": f"shard-{i:06d}.tar", "samples": per_shard[f"shard-{i:06d}.tar"]}
                           for i in range(len(COUNTS))]
    assert m["samples"] == sum(COUNTS) - 2 and m["inputs"] == sum(COUNTS)
    assert m["dropped"] == {"missing_image": 0, "corrupt_image": 1, "missing_caption": 1, "caption_not_utf8": 0}
    side = json.loads((Path(corpus["tokens"]) / "_progress" / "shard-000001.tar.json").read_text())
    assert [(r["key"], r["reason"]) for r in side["rejects"]] == [("s01i001", "corrupt_image")]

    # the trainer's check: accepts this dVAE, refuses another one or another grid
    check_token_manifest(corpus["tokens"], GRID, CFG.codebook_size, expected_dvae_hash=h)
    other = dvae_hash(make_export(tmp_path / "other", seed=1))
    assert other != h
    with pytest.raises(ValueError, match="dvae_hash"):
        check_token_manifest(corpus["tokens"], GRID, CFG.codebook_size, expected_dvae_hash=other)
    with pytest.raises(ValueError, match="grid_size"):
        check_token_manifest(corpus["tokens"], GRID * 2, CFG.codebook_size, expected_dvae_hash=h)

    # the prior's loader reads them back
    class Tok:
        def encode(self, captions, dropout=0.0):
            return torch.zeros(len(captions), 4, dtype=torch.long)

    loader = TokenShardLoader(corpus["tokens"], 4, tokenizer=Tok(), grid=GRID, codebook_size=CFG.codebook_size,
                              rank=0, world_size=1, shuffle=False, infinite=False)
    tokens = read_tokens(corpus["tokens"])
    seen = []
    for batch in loader:
        for key, codes in zip(batch["keys"], batch["codes"]):
            np.testing.assert_array_equal(codes.numpy(), tokens[key]["codes"].astype(np.int64))
            seen.append(key)
    assert sorted(seen) == sorted(tokens)


def test_rerun_skips_finished_and_refuses_another_dvae(corpus, tmp_path):
    out = Path(corpus["tokens"])
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run(corpus["export"], corpus["shards"], corpus["tokens"])
    assert again["shards"] == [] and len(again["skipped"]) == len(COUNTS)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    assert again["manifest"]["shards"] == corpus["result"]["manifest"]["shards"]
    with pytest.raises(SystemExit, match="job.json.*dvae_hash"):
        run(make_export(tmp_path / "other", seed=2), corpus["shards"], corpus["tokens"])


def test_verify_psnr_equals_direct_reconstruction(corpus):
    v = corpus["result"]["verify"]
    assert v["samples"] == 7 and len(set(v["keys"])) == 7 and not set(v["keys"]) & set(BAD)
    vae = load_dvae(corpus["export"])
    x = torch.stack([preprocess(corpus["samples"][k]["jpg"]) for k in v["keys"]])  # (7, 3, S, S)
    recon = vae.decode(vae.encode(x))
    mse = float(((recon.double() - x.double()) ** 2).mean())
    assert v["psnr"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-6)
    assert v["code_agreement"] == 1.0
    # the dVAE's own evaluation on the same images agrees (float32 sums: looser)
    from dalle_ds.evaluation.reconstruction import evaluate_reconstruction

    assert evaluate_reconstruction(vae, [{"images": x}])["psnr"] == pytest.approx(v["psnr"], abs=1e-3)
    # --finalize --verify on the finished output: same samples for the same seed
    again = run(corpus["export"], corpus["shards"], corpus["tokens"], "--finalize", "--verify", "7")
    assert again["verify"]["keys"] == v["keys"] and again["verify"]["psnr"] == pytest.approx(v["psnr"], abs=1e-9)


# ---------------------------------------------------------------- splits


def _rank_main(export: str, shards: str, out: str) -> dict:
    torch.set_num_threads(1)
    return run(export, shards, out)


def test_two_ranks_take_disjoint_shards(corpus, tmp_path):
    out = str(tmp_path / "tokens")
    results = run_ranks(_rank_main, 2, args=(corpus["export"], corpus["shards"], out), timeout_s=120)
    mine = [set(r["shards"]) for r in results]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == {f"shard-{i:06d}.tar" for i in range(len(COUNTS))}
    assert all(r["world_size"] == 2 for r in results) and {r["rank"] for r in results} == {0, 1}
    tokens = read_tokens(out)  # asserts every key once
    assert sorted(tokens) == sorted(k for k in corpus["samples"] if k not in BAD)
    assert sum(r["images"] for r in results) == len(tokens)
    assert json.loads((Path(out) / "manifest.json").read_text())["shards"] == corpus["result"]["manifest"]["shards"]


def test_plan_and_array_parts_cover_every_shard_once(corpus, tmp_path, monkeypatch):
    for n in (1, 5, 16, 37):
        for parts in (1, 2, 3, 16):
            for world in (1, 2, 8):
                got = [i for p in range(parts) for r in range(world) for i in tok.plan_shards(n, p, parts, r, world)]
                assert sorted(got) == list(range(n)), (n, parts, world)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert tok.array_part(None, None) == (3, 4)
    assert tok.array_part(0, 1) == (0, 1)  # flags win over the array
    with pytest.raises(SystemExit, match="part"):
        tok.array_part(2, 2)
    for v in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(v)
    # independent array tasks: the last one to finish writes the manifest
    out = str(tmp_path / "tokens")
    second = run(corpus["export"], corpus["shards"], out, "--part", "1", "--num-parts", "2")
    assert second["shards"] == ["shard-000002.tar", "shard-000003.tar", "shard-000004.tar"]
    assert second["manifest"] is None and not (tmp_path / "tokens" / "manifest.json").exists()
    with pytest.raises(SystemExit, match="2 of 5 shards are not finished"):
        run(corpus["export"], corpus["shards"], out, "--finalize")
    first = run(corpus["export"], corpus["shards"], out, "--part", "0", "--num-parts", "2")
    assert first["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert first["manifest"] == corpus["result"]["manifest"] | {"config": first["manifest"]["config"]}
    assert sorted(read_tokens(out)) == sorted(read_tokens(corpus["tokens"]))


# ---------------------------------------------------------------- resume after kill -9


def test_resume_after_kill(corpus, tmp_path):
    out = tmp_path / "tokens"
    cmd = [sys.executable, str(ROOT / "data_prep" / "tokenize_images.py"), "--dvae", corpus["export"],
           "--input", corpus["shards"], "--output", str(out), "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", tok.TEST_DELAY_ENV: "0.4"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list((out / "_progress").glob("*.tar.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no shard finished within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = {p.name[: -len(".json")] for p in (out / "_progress").glob("*.tar.json")}
    assert 2 <= len(done) < len(COUNTS) and not (out / "manifest.json").exists()
    before = {name: (out / name).stat().st_mtime_ns for name in done}

    again = run(corpus["export"], corpus["shards"], str(out))
    assert set(again["skipped"]) == done and set(again["shards"]) == {f"shard-{i:06d}.tar"
                                                                      for i in range(len(COUNTS))} - done
    assert {name: (out / name).stat().st_mtime_ns for name in done} == before  # finished shards not redone
    tokens = read_tokens(str(out))  # every key once
    assert sorted(tokens) == sorted(read_tokens(corpus["tokens"]))
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["samples"] == len(tokens)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_work(corpus, tmp_path):
    out = tmp_path / "tokens"
    with pytest.raises(SystemExit, match=str(tmp_path / "nope")):
        run(str(tmp_path / "nope"), corpus["shards"], str(out))
    broken = tmp_path / "broken"
    make_export(broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit, match=f"{broken}.*cannot load"):
        run(str(broken), corpus["shards"], str(out))
    with pytest.raises(SystemExit, match="shard-000009.tar"):
        run(corpus["export"], corpus["shards"] + "/shard-{000003..000009}.tar", str(out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=f"--input: {tmp_path / 'empty'}: directory has no .tar"):
        run(corpus["export"], str(tmp_path / "empty"), str(out))
    with pytest.raises(SystemExit, match="overwrite the input"):
        run(corpus["export"], corpus["shards"], corpus["shards"])
    assert not out.exists()  # nothing was started
    # a shard that is not a tar at all stops the job naming it
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-000000.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(Exception, match="shard-000000.tar"):
        run(corpus["export"], str(bad), str(out))


# ---------------------------------------------------------------- S3 on both sides


def test_s3_input_output_and_dvae(corpus, s3_server):
    prefix = s3_server.prefix()
    for p in Path(corpus["shards"]).glob("*.tar"):
        storage.upload_file(p, f"{prefix}shards/{p.name}")
    for p in Path(corpus["export"]).iterdir():
        storage.upload_file(p, f"{prefix}export/{p.name}")
    assert dvae_hash(f"{prefix}export") == dvae_hash(corpus["export"])
    result = run(f"{prefix}export", f"{prefix}shards/", f"{prefix}tokens/")
    assert len(result["shards"]) == len(COUNTS)
    m = storage.read_json(f"{prefix}tokens/manifest.json")
    assert m["shards"] == corpus["result"]["manifest"]["shards"] and m["dvae_hash"] == dvae_hash(corpus["export"])
    check_token_manifest(f"{prefix}tokens/", GRID, CFG.codebook_size, expected_dvae_hash=m["dvae_hash"])
    local = read_tokens(corpus["tokens"])
    remote = read_tokens(f"{prefix}tokens/")
    assert sorted(remote) == sorted(local)
    for k in local:
        np.testing.assert_array_equal(remote[k]["codes"], local[k]["codes"])


# ---------------------------------------------------------------- slurm/tokenize_images.sh, a real job array


def test_sbatch_job_array(corpus, slurm_cluster, tmp_path):
    out = tmp_path / "tokens"
    env = {"DVAE": corpus["export"], "INPUT": corpus["shards"], "OUTPUT": str(out), "DALLE_DS_ROOT": str(ROOT),
           "PYTHON": sys.executable, "VERIFY": "3", "BATCH_SIZE": "2", "OMP_NUM_THREADS": "1"}
    job = slurm_cluster.sbatch("--array=0-1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                               "--output", str(tmp_path / "job-%A_%a.out"), str(ROOT / "slurm" / "tokenize_images.sh"),
                               env=env, cwd=str(ROOT))
    states = [slurm_cluster.wait_job(f"{job}_{i}", timeout_s=180) for i in (0, 1)]
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("job-*.out")))
    assert states == ["COMPLETED", "COMPLETED"], logs
    for part, rank in ((0, 0), (0, 1), (1, 0), (1, 1)):  # every element ran 2 tasks
        assert f"[part {part}/2 rank {rank}/2]" in logs
    assert "verify: 3 samples" in logs
    assert sorted(read_tokens(str(out))) == sorted(read_tokens(corpus["tokens"]))  # every key once
    assert json.loads((out / "manifest.json").read_text())["shards"] == corpus["result"]["manifest"]["shards"]
