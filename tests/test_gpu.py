"""GPU tests (#14): `pytest -m gpu` / `make test-gpu`. On CUDA with NCCL: world size 1 on one GPU,
2 ranks when there are 2 or more. Each skips with a reason on a machine without CUDA.

- the tiny prior through dalle_ds/train.py with fp16 block scaling in the 16-bit regime and PowerSGD on
  (2 ranks: 2 one-GPU nodes; 1 rank: PowerSGD forced over the 1-rank cross group by its own test),
  FlexAttention (sm_80+; sparse below), checkpoint, resume, export, KV-cache sampling; the same in bf16;
- PowerSGD's averaging of CUDA shards under NCCL (the device discipline: no CPU tensor in a collective);
- flex refused below sm_80, flex = dense on sm_80+;
- `evaluate` and `tokenize_images` with model and inputs on the GPU;
- the dVAE through dalle_ds/train_dvae.py: host batches moved to the rank's GPU, Gumbel noise drawn there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multirank import free_port, run_ranks

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)")]


def _ranks() -> int:
    return min(2, torch.cuda.device_count())


def _sm80() -> bool:
    return torch.cuda.get_device_capability(0) >= (8, 0)


def _env(rank: int, world: int, port: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed picks CUDA
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    return env


def _train(run_dir: Path, data: Path, ds_json: str, extra: list[str], max_steps: int) -> str:
    world, port = _ranks(), str(free_port())
    args = [sys.executable, str(ROOT / "dalle_ds/train.py"), "--deepspeed-config", ds_json, "--config", "tiny",
            f"run.dir={run_dir}", f"data.token_shards={data}/shard-{{000000..000003}}.tar",
            f"data.tokenizer={data}/tokenizer.json", "data.num_workers=1", "optim.micro_batch_size=4",
            "optim.warmup_steps=2", f"optim.max_steps={max_steps}", "checkpoint.every_steps=3",
            "logging.every_steps=2", "logging.progress_bar=false", "logging.tensorboard=false",
            f"model.attention={'flex' if _sm80() else 'sparse'}", *extra]
    if world > 1:  # 2 one-GPU nodes: ZeRO-3 inside each, PowerSGD across
        args += ["powersgd.enabled=true", "powersgd.node_size=1", "powersgd.rank=4",
                 "powersgd.min_compression_numel=64"]
    procs = [subprocess.Popen(args, env=_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT) for r in range(world)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outs)
    return outs[0]


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from tests.test_train_prior import make_token_corpus

    folder = tmp_path_factory.mktemp("gpu_tokens")
    make_token_corpus(folder)
    return folder


@pytest.mark.parametrize("regime, ds_json, extra", [
    ("fp16_block16", "zero3_fp16_v100_16bit.json", ["precision.branch_dtype=float16", "precision.block_scaling=true"]),
    ("bf16", "zero3_bf16.json", []),
])
def test_train_checkpoint_resume_export_sample(tmp_path, token_data, regime, ds_json, extra):
    run = tmp_path / "run"
    out = _train(run, token_data, ds_json, extra, max_steps=4)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 4 and all(r["loss"] == r["loss"] for r in rows), out[-3000:]
    out = _train(run, token_data, ds_json, extra, max_steps=6)  # resumes from `latest` (step 4: the final save)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6, out[-3000:]
    res = subprocess.run([sys.executable, "-m", "dalle_ds.export", str(run), str(run / "export")],
                         env=_env(0, 1, str(free_port())), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "export" / "model.safetensors").is_file()
    # KV-cache sampling from the export on the GPU, equal to the uncached sampler
    from dalle_ds.sampling.generate import generate, load_prior

    prior = load_prior(str(run / "export"), device="cuda")
    text = torch.randint(1, prior.cfg.text_vocab_size, (2, prior.cfg.text_len), device="cuda")
    cached = generate(prior, text, [0, 1], use_cache=True, max_codes=8)
    plain = generate(prior, text, [0, 1], use_cache=False, max_codes=8)
    assert cached.device.type == "cuda" and cached.shape == plain.shape
    # same seeds: the cache changes only the order of float sums, so draws agree but for rare ties
    assert (cached[:, :8] == plain[:, :8]).float().mean() >= 0.9, (cached[:, :8], plain[:, :8])


def test_train_dvae_on_cuda(tmp_path):
    from tests.test_dvae_train import OVERRIDES, _write_shards

    shards = _write_shards(tmp_path / "shards")
    world, port = _ranks(), str(free_port())
    run = tmp_path / "dvae"
    args = [sys.executable, str(ROOT / "dalle_ds/train_dvae.py"), "--deepspeed-config", "dvae.json", "--config",
            "tiny", *OVERRIDES, f"data.image_shards={shards}/shard-{{000000..000001}}.tar", f"run.dir={run}",
            "dvae_train.max_steps=4", "logging.tensorboard=false"]
    procs = [subprocess.Popen(args, env=_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT) for r in range(world)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outs)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows and rows[-1]["step"] == 4 and all(r["loss"] == r["loss"] for r in rows), outs[0][-3000:]
    assert (run / "export" / "model.safetensors").is_file()


def _powersgd_nccl() -> dict:
    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.parallel.dist import init_distributed
    from dalle_ds.parallel.powersgd import PowerSGD, Shard

    init_distributed()
    assert torch.distributed.get_backend() == "nccl"
    # forced on over the 1-rank cross group (build_averager would turn compression off on one node)
    psgd = PowerSGD(PowerSGDConfig(enabled=True, rank=4, min_compression_numel=64), None, 1)
    g = torch.randn(64 * 32, device="cuda")
    ok = psgd.average_([Shard("w", g, 0, 32), Shard("b", torch.randn(32, device="cuda"), 0, 32, exact=True)])
    return {"ok": bool(ok), "finite": bool(torch.isfinite(g).all()), "errors_on": str(psgd.errors["w"].device)}


def test_powersgd_averages_cuda_shards_under_nccl():
    r = run_ranks(_powersgd_nccl, world_size=1, timeout_s=300,
                  extra_env={"DALLE_DS_TEST_GPU": "1"})[0]
    assert r["ok"] and r["finite"] and r["errors_on"].startswith("cuda")


def test_flex_on_this_gpu():
    from dalle_ds.models.attention import build_backend

    if not _sm80():
        with pytest.raises(RuntimeError, match="triton-lang/triton#5066"):
            build_backend("flex", "row", 64, 32, 11)
        return
    q, k, v = (torch.randn(1, 2, 64 + 1024, 64, device="cuda", requires_grad=True) for _ in range(3))
    out = build_backend("flex", "row", 64, 32, 11)(q, k, v)
    ref = build_backend("dense", "row", 64, 32, 11)(q, k, v)
    assert torch.allclose(out, ref, atol=2e-3, rtol=2e-3)
    out.sum().backward()


def test_tokenize_images_and_evaluate_on_cuda(tmp_path):
    from tests.eval_fixtures import make_exports, write_image_shards
    write_image_shards(tmp_path / "shards", 32, size=8)
    _, dvae = make_exports(tmp_path)
    env = _env(0, 1, str(free_port()))
    res = subprocess.run([sys.executable, str(ROOT / "data_prep/tokenize_images.py"), "--dvae", str(dvae),
                          "--input", str(tmp_path / "shards"), "--output", str(tmp_path / "tokens"),
                          "--device", "cuda", "--batch-size", "8", "--verify", "2", "--no-progress"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "tokens" / "manifest.json").read_text())["shards"]
    clip = _tiny_clip(tmp_path / "clip")
    res = subprocess.run([sys.executable, "-m", "dalle_ds.evaluate", "--samples", str(tmp_path / "shards"),
                          "--reference", str(tmp_path / "shards"), "--clip", str(clip), "--radii", "0",
                          "--device", "cuda", "--is-splits", "2", "--json", str(tmp_path / "eval.json")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "eval.json").is_file()


def _tiny_clip(folder: Path) -> Path:
    """A random 2-layer Hugging Face CLIP folder (as tests/test_clip_rerank.py builds one)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in ("a</w>", "red</w>", "blue</w>", "circle</w>", "square</w>", "a", "b", "c", "d", "e", "l", "r", "u"):
        vocab[w] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    hf = folder / "hf"
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(hf))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, eos_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=16, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(hf))
    return hf
