"""The model bundle (dalle_ds/export.py, dalle_ds/sampling/bundle.py) and Pipeline.from_pretrained:
sharded safetensors with an index, dtypes, the model card, sampling from the bundle by API and CLI,
CLIP by folder or by a Hugging Face id in the local cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from dalle_ds.config import ConfigError
from dalle_ds.sampling import bundle
from tests.eval_fixtures import make_exports, train_tokenizer, write_image_shards


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A finished run folder (config.yaml, metrics.jsonl, eval.jsonl, checkpoints/latest) whose
    checkpoint consolidates to a tiny random prior, plus its dVAE export and tokenizer."""
    from dalle_ds.sampling.generate import load_prior

    root = tmp_path_factory.mktemp("bundle")
    prior_dir, dvae_dir = make_exports(root, grid=4, text_len=8, text_vocab=320)
    write_image_shards(root / "shards", 48, size=16)
    tok = train_tokenizer(root / "shards", root / "tokenizer.json", vocab_size=320)
    prior = load_prior(str(prior_dir))
    run_dir = root / "run"
    (run_dir / "checkpoints" / "step_00000040").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000040")
    cfg = {"run": {"dir": str(run_dir)}, "model": dataclasses.asdict(prior.cfg),
           "data": {"token_shards": "data/tokens", "tokenizer": str(tok), "dvae": str(dvae_dir)}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 6.0 - s / 10, "text_loss": 1.0,
                                                               "image_loss": 5.0 - s / 10}) + "\n"
                                                   for s in range(1, 41)))
    (run_dir / "eval.jsonl").write_text(json.dumps({"step": 40, "psnr": 27.5}) + "\n")
    return {"root": root, "run_dir": run_dir, "prior": prior, "dvae": dvae_dir, "tokenizer": tok}


@pytest.fixture()
def exported(run, monkeypatch):
    """``export(*argv)`` runs ``python -m dalle_ds.export`` on the run (its checkpoint: the tiny prior)."""
    from dalle_ds import export
    from dalle_ds.parallel import checkpoint

    state = {k: v.clone() for k, v in run["prior"].state_dict().items()}
    monkeypatch.setattr(checkpoint, "consolidated_state_dict", lambda root, tag=None: state)

    def go(*argv: str) -> Path:
        return export.main([str(run["run_dir"]), *argv])

    return go


def _logits(prior, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = prior.cfg
    text = torch.randint(1, c.text_vocab_size, (2, c.text_len), generator=g)
    codes = torch.randint(0, c.image_vocab_size, (2, c.image_len), generator=g)
    with torch.no_grad():
        return prior(text, codes)


def test_bundle_round_trip_fp32_equal_fp16_close_and_model_card(run, exported, tmp_path):
    from dalle_ds.sampling.pipeline import Pipeline

    out = exported(str(tmp_path / "b32"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "bundle.json", "config.json", "dvae",
                                                    "model.safetensors", "run_config.yaml", "tokenizer.json"]
    assert yaml.safe_load((out / "run_config.yaml").read_text()) == yaml.safe_load(
        (run["run_dir"] / "config.yaml").read_text())
    assert (out / "dvae" / "model.safetensors").read_bytes() == (run["dvae"] / "model.safetensors").read_bytes()
    pipe = Pipeline.from_pretrained(out)
    want = _logits(run["prior"])
    for got, ref in zip(_logits(pipe.prior), want):
        assert torch.equal(got, ref)  # fp32: bit for bit
    card = (out / "README.md").read_text()
    assert "updates: 40 (checkpoint step_00000040)" in card and "data/tokens" in card
    assert "loss 2.45" in card and "image_loss 1.45" in card  # mean of the last 10 logged updates
    assert "eval.jsonl: psnr 27.5" in card

    out16 = exported("--output", str(tmp_path / "b16"), "--dtype", "fp16")
    from safetensors import safe_open

    with safe_open(str(out16 / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert (out16 / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    pipe16 = Pipeline.from_pretrained(out16)  # fp16 weights, fp32 compute
    for got, ref in zip(_logits(pipe16.prior), want):
        assert not torch.equal(got, ref) and torch.allclose(got, ref, atol=2e-2, rtol=1e-2)
    images = pipe16("a red circle", n=4, keep=2)
    assert len(images) == 2 and images[0].size == (pipe16.image_size, pipe16.image_size)
    bf16 = Pipeline.from_pretrained(out, dtype="bf16")  # bf16 compute (logits stay fp32)
    assert next(bf16.prior.parameters()).dtype == torch.bfloat16 and len(bf16("a blue square", n=2, keep=1)) == 1


def test_sharded_export_writes_an_index_and_loads_back(run, exported, tmp_path):
    from dalle_ds.sampling.pipeline import Pipeline

    out = exported(str(tmp_path / "sharded"), "--max-shard-size", "40KB")
    index = json.loads((out / bundle.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"]) == set(run["prior"].state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in run["prior"].state_dict().values())
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    state = run["prior"].state_dict()
    for s, keys in per_shard.items():  # at most 40 KB of tensors, unless one tensor alone is larger
        assert len(keys) == 1 or sum(state[k].numel() * 4 for k in keys) <= 40_000, (s, keys)
    for got, ref in zip(_logits(Pipeline.from_pretrained(out).prior), _logits(run["prior"])):
        assert torch.equal(got, ref)
    (out / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[1]}: shard listed in {bundle.INDEX} is missing"):
        bundle.load_weights(out)


def test_sample_and_serve_take_the_bundle(run, exported, tmp_path):
    from dalle_ds import sample
    from dalle_ds.sampling.pipeline import Pipeline

    out = exported(str(tmp_path / "b"))
    record = sample.main(["--bundle", str(out), "--prompt", "a red circle", "-n", "2", "--keep", "1",
                          "--out", str(tmp_path / "s"), "--device", "cpu"])  # --out: the old spelling
    assert record["bundle"] == str(out) and (tmp_path / "s" / "grid_000.png").is_file()
    args = sample.parse_args(["--bundle", str(out), "--prompt", "x", "--tokenizer", str(run["tokenizer"])])
    assert Pipeline.paths_from_args(args) == (str(out), str(out / "dvae"), str(run["tokenizer"]))
    args = sample.parse_args(["--prompt", "x", "--checkpoint", str(out)])
    with pytest.raises(ConfigError, match="--dvae, --tokenizer: required"):
        Pipeline.paths_from_args(args)
    with pytest.raises(ConfigError, match="not a model bundle"):
        Pipeline.paths_from_args(sample.parse_args(["--prompt", "x", "--bundle", str(tmp_path)]))


def test_export_errors_name_the_input(run, exported, tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer='/nope.json': no such file"):
        exported(str(tmp_path / "x"), "--tokenizer", "/nope.json")
    with pytest.raises(ConfigError, match="--max-shard-size='lots'"):
        exported(str(tmp_path / "x"), "--max-shard-size", "lots")
    assert bundle.parse_bytes("5GB") == 5 * 10**9 and bundle.parse_bytes("2GiB") == 2 * 2**30


def test_clip_from_a_folder_or_the_local_hf_cache_only(run, tmp_path, monkeypatch):
    from dalle_ds.sampling.pipeline import load_clip
    from dalle_ds.sampling.rerank import ProjectClipProcessor
    from dalle_ds.train_clip import build_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # empty: the id is not cached
    proc = ProjectClipProcessor(str(run["tokenizer"]), 8, 16, (0.5,) * 3, (0.25,) * 3)
    model = build_clip(proc, width=32, layers=1, heads=2, patch=8, embed_dim=16)
    model.save_pretrained(str(tmp_path / "clip"))
    proc.save(tmp_path / "clip")
    scorer = load_clip(str(tmp_path / "clip"))
    assert scorer.image_embeds(torch.rand(2, 3, 16, 16)).shape == (2, 16)
    with pytest.raises(ConfigError, match=r"--clip='openai/clip-vit-base-patch32': not a folder, and not a model "
                                          r"in the local Hugging Face cache \(no downloads"):
        load_clip("openai/clip-vit-base-patch32")
