"""slurm/shard_corpus.sh as a real SLURM job array on the local cluster (tests/slurm_cluster.py):
four array elements shard their parts of the inputs, a FINALIZE=1 job that depends on the array
merges them, and the result holds the same samples, counts and rejects as a one-part run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep import shard_corpus
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - fixture
from tests.test_shard_corpus import SMALL, _jpeg, _noise, make_corpus, read_shards

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
FILTERS = ["--max-caption-repeats", "1"]  # an order-dependent filter, applied by the finalize job


def _by_content(out: Path) -> list[tuple[bytes, bytes, str]]:
    return sorted((s["jpg"], s["txt"], json.loads(s["json"])["source"]) for s in read_shards(out).values())


def test_shard_corpus_array_then_finalize_equals_one_run(slurm_cluster, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, n_good=10)
    (corpus / "zz" / "zz-repeat.jpg").write_bytes(_jpeg(_noise(4242, 64, 64)))
    (corpus / "zz" / "zz-repeat.txt").write_text("A picture  number 3")  # good003's caption, repeated
    args = ["--samples-per-shard", "3", *SMALL, *FILTERS]
    one = shard_corpus.main(["--input", str(corpus), "--output", str(tmp_path / "one"), "--workers", "1", *args])
    assert one["dropped"]["caption_repeated"] == 1 and one["dropped"]["duplicate"] >= 1

    out = tmp_path / "array"
    env = {"INPUT": str(corpus), "OUTPUT": str(out), "SAMPLES_PER_SHARD": "3", "PYTHON": PYTHON,
           "DALLE_DS_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "EXTRA_ARGS": " ".join([*SMALL, *FILTERS])}
    common = ("--nodes=1", "--ntasks=1", "--cpus-per-task=1")
    array = slurm_cluster.sbatch(*common, "--array=0-3", "--output", str(tmp_path / "part-%a.out"),
                                 str(ROOT / "slurm" / "shard_corpus.sh"), env=env, cwd=str(ROOT))
    final = slurm_cluster.sbatch(*common, f"--dependency=afterok:{array}", "--output", str(tmp_path / "final.out"),
                                 str(ROOT / "slurm" / "shard_corpus.sh"),
                                 env=env | {"FINALIZE": "1", "NUM_PARTS": "4", "INPUT": ""}, cwd=str(ROOT))
    for element in range(4):
        state = slurm_cluster.wait_job(f"{array}_{element}", timeout_s=300)
        log = tmp_path / f"part-{element}.out"
        assert state == "COMPLETED", log.read_text()[-3000:] if log.exists() else state
        assert f"array element {element} of 4" in log.read_text()
    state = slurm_cluster.wait_job(final, timeout_s=300)
    text = (tmp_path / "final.out").read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "finalizing 4 part(s)" in text

    merged = json.loads((out / "manifest.json").read_text())
    assert [json.loads((out / f"part-{p:05d}" / "manifest.json").read_text())["config"]["part"]
            for p in range(4)] == [0, 1, 2, 3]  # each element took its part from SLURM_ARRAY_TASK_ID
    assert (merged["samples"], merged["inputs"], merged["dropped"]) == (one["samples"], one["inputs"], one["dropped"])
    assert _by_content(out) == _by_content(tmp_path / "one")  # the same samples, bytes and sources
    rejects = sorted((r["index"], r["reason"]) for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines()))
    assert rejects == sorted((r["index"], r["reason"])
                             for r in map(json.loads, (tmp_path / "one" / "rejects.jsonl").read_text().splitlines()))
    # keys: each part numbers its samples from its own first input, so shard keys are not the one
    # run's (the shard name part-PPPPP/ tells them apart); the rejects' indices above are global
    keys = [k.split("/", 2)[-1] for k in read_shards(out)]
    assert len(keys) == merged["samples"]
