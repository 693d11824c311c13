"""The prior trainer's hooks: validation on held-out token shards (2 gloo ranks, ZeRO-3 with
partitioned parameters), training-time sample grids (ZeRO-3 and plain), the learning-curve PNG,
the cosine schedule, augmented views (tokenize_images --views, the view-per-epoch token loader)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ds.data.loaders import ShardError, TokenShardLoader
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
GRID, CODEBOOK, TEXT_LEN, TEXT_VOCAB = 4, 16, 8, 320


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tokens(folder: Path, counts: list[int], views: int = 1, seed: int = 0) -> list[str]:
    """Token shards of shapes captions with random codes (``views`` per sample, view v = base + v mod
    CODEBOOK so a test can tell which view it got), a manifest and a tokenizer; returns the captions."""
    from data_prep.make_shapes_corpus import make_sample
    from data_prep.train_text_tokenizer import build, pad_vocab

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions, listed, i = [], [], 0
    for s, n in enumerate(counts):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for _ in range(n):
                caption = make_sample(seed, i, 16)[1]
                base = rng.integers(0, CODEBOOK, GRID * GRID)
                codes = np.concatenate([(base + v) % CODEBOOK for v in range(views)]).astype("<u2")
                _add(tar, f"{i:06d}.codes", codes.tobytes())
                _add(tar, f"{i:06d}.txt", caption.encode())
                captions.append(caption)
                i += 1
        listed.append({"name": name, "samples": n})
    manifest = {"shards": listed, "grid_size": GRID, "codebook_size": CODEBOOK, "dvae_hash": "synthetic"}
    if views > 1:
        manifest["views"] = views
    (folder / "manifest.json").write_text(json.dumps(manifest))
    tok, trainer = build(TEXT_VOCAB, min_frequency=1)
    tok.train_from_iterator(captions, trainer)
    tok, _ = pad_vocab(tok, TEXT_VOCAB)
    tok.save(str(folder / "tokenizer.json"))
    return captions


def _model_cfg():
    from tests.eval_fixtures import tiny_model_config

    return tiny_model_config(image_grid=GRID, text_len=TEXT_LEN, text_vocab_size=TEXT_VOCAB, image_vocab_size=CODEBOOK)


# ---------------------------------------------------------------- validation + samples on 2 ZeRO-3 ranks
def _hooks_rank(data: str, run_dir: str, dvae: str) -> dict:
    from dalle_ds.config import Config
    from dalle_ds.data.tokenizer import TextTokenizer
    from dalle_ds.models.prior import Prior, no_decay
    from dalle_ds.parallel import deepspeed_internals as ds_internals
    from dalle_ds.parallel.dist import init_distributed
    from dalle_ds.parallel.engine import OptimSpec, build_engine, gathered_state_dict, load_ds_config
    from dalle_ds.sampling.generate import SamplingSettings, generate
    from dalle_ds.training.logger import MetricsLogger
    from dalle_ds.training.prior_hooks import SampleHook, Validator

    info = init_distributed()
    torch.manual_seed(0)
    mcfg = _model_cfg()
    ds = load_ds_config(ROOT / "ds_configs/zero3_fp32_cpu.json")
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    spec = OptimSpec(micro_batch_size=4, grad_accum_steps=1, lr=1e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.0)
    engine = build_engine(lambda: Prior(mcfg), ds, spec, no_decay=no_decay, run_dir=run_dir, run_config=Config())
    out = {"partitioned": all(ds_internals.is_partitioned(p) for p in engine.model.parameters())}
    tok = TextTokenizer.from_file(f"{data}/tokenizer.json", TEXT_LEN, TEXT_VOCAB)
    # 3 shards on 2 ranks: rank 0 reads 2 shards, rank 1 one, and each has fewer samples than
    # batches x batch size: the infinite loader wraps around, every rank runs exactly 3 forwards
    loader = TokenShardLoader(data, 4, tokenizer=tok, grid=GRID, codebook_size=CODEBOOK, num_workers=0, seed=0,
                              shuffle=False, infinite=True)
    val = Validator(loader, batches=3, text_len=TEXT_LEN, image_len=GRID * GRID)
    before = gathered_state_dict(engine.model)
    first, second = val(engine), val(engine)
    out["first"], out["second"] = first, second
    out["grads_left"] = any(p.grad is not None for p in engine.model.parameters())
    out["module_training"] = engine.ds.module.training
    after = gathered_state_dict(engine.model)
    out["params_changed"] = max((before[k] - after[k]).abs().max().item() for k in before)

    # by hand: the same 3 batches through a plain replica, losses weighted by their targets
    ref = Prior(mcfg)
    ref.load_state_dict(after)
    ref.eval()
    check = TokenShardLoader(data, 4, tokenizer=tok, grid=GRID, codebook_size=CODEBOOK, num_workers=0, seed=0,
                             shuffle=False, infinite=True)
    it, sums = iter(check), [0.0, 0, 0.0, 0]
    with torch.no_grad():
        for _ in range(3):
            b = next(it)
            _, parts = ref.loss(b["text"], b["codes"])
            n = b["codes"].shape[0]
            sums[0] += float(parts["text_loss"]) * n * (TEXT_LEN - 1)
            sums[1] += n * (TEXT_LEN - 1)
            sums[2] += float(parts["image_loss"]) * n * GRID * GRID
            sums[3] += n * GRID * GRID
    out["ref_sums"] = sums

    # samples: fixed captions and seeds; rank 0 writes the PNG and the TensorBoard image
    log = MetricsLogger(run_dir, tensorboard=True)
    captions = ["a red circle", "a small blue square on the left"]
    hook = SampleHook(mcfg, captions, 2, 1.0, dvae, tok, run_dir, info.rank == 0)
    p1, p2 = hook(5, engine, log), hook(10, engine, log)
    log.close()
    if info.rank == 0:
        out["png_equal"] = Path(p1).read_bytes() == Path(p2).read_bytes()
        want = generate(ref, tok.encode(captions).repeat_interleave(2, 0), [10_000 + i for i in range(4)],
                        SamplingSettings())
        got = generate(hook.replica, tok.encode(captions).repeat_interleave(2, 0), [10_000 + i for i in range(4)],
                       SamplingSettings())
        out["replica_codes_equal"] = torch.equal(want, got)
        out["png_size"] = Image.open(p1).size
        out["txt"] = Path(p1).with_suffix(".txt").read_text().splitlines()
    return out


def test_validation_and_samples_on_two_zero3_ranks(tmp_path):
    from tests.eval_fixtures import make_exports

    data = tmp_path / "val_tokens"
    make_tokens(data, [5, 4, 3])
    _, dvae = make_exports(tmp_path / "exp", grid=GRID)  # codebook 16, images 2 * GRID
    run = tmp_path / "run"
    r0, r1 = run_ranks(_hooks_rank, 2, args=(str(data), str(run), str(dvae)), timeout_s=600)
    assert r0["partitioned"] and r1["partitioned"]
    # both ranks report the same reduced values, the same every call, and they equal the hand
    # computation over both ranks' batches
    assert r0["first"]["loss"] == r1["first"]["loss"]
    assert r0["first"]["image_loss"] == r0["second"]["image_loss"] and r0["first"]["text_loss"] == r0["second"]["text_loss"]
    s = [a + b for a, b in zip(r0["ref_sums"], r1["ref_sums"])]
    assert r0["first"]["text_loss"] == pytest.approx(s[0] / s[1], rel=1e-5)
    assert r0["first"]["image_loss"] == pytest.approx(s[2] / s[3], rel=1e-5)
    assert r0["first"]["loss"] == pytest.approx(s[0] / s[1] / 8 + 7 * s[2] / s[3] / 8, rel=1e-5)
    assert r0["first"]["samples"] == 2 * 3 * 4
    assert not r0["grads_left"] and r0["module_training"] and r0["params_changed"] == 0.0
    # sample grid: same weights + same seeds = same PNG; rank 0's replica holds the gathered weights
    assert r0["png_equal"] and r0["replica_codes_equal"]
    assert r0["txt"] == ["a red circle", "a small blue square on the left"]
    w, h = r0["png_size"]
    assert w == 2 + 2 * (64 + 2) and h == 2 + 2 * (64 + 2)  # 2 captions x 2 samples of 8 px, shown at 64 px
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_00000005.png", "step_00000010.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert "train/samples" in acc.Tags()["images"]


def test_sample_hook_without_zero3_and_hooks_cadence(tmp_path):
    """Stage 0/1/2 path (full parameters on every rank): the replica copies the model directly; the
    hooks run validation every K updates and at the last, samples every image_every_steps."""
    from types import SimpleNamespace

    from dalle_ds.config import load_config
    from dalle_ds.data.tokenizer import TextTokenizer
    from dalle_ds.models.prior import Prior
    from dalle_ds.training.logger import MetricsLogger
    from dalle_ds.training.prior_hooks import PriorHooks, SampleHook, first_captions
    from tests.eval_fixtures import make_exports

    data = tmp_path / "tokens"
    caps = make_tokens(data, [6])
    _, dvae = make_exports(tmp_path / "exp", grid=GRID)
    tok = TextTokenizer.from_file(data / "tokenizer.json", TEXT_LEN, TEXT_VOCAB)
    torch.manual_seed(1)
    model = Prior(_model_cfg())
    engine = SimpleNamespace(model=model, ds=SimpleNamespace(module=model))
    hook = SampleHook(model.cfg, first_captions(data, 2), 3, 1.0, str(dvae), tok, tmp_path / "run", True)
    assert hook.captions == list(dict.fromkeys(caps))[:2]
    path = hook(7, engine)
    assert torch.equal(hook.replica.state_dict()["ln_f.weight"], model.state_dict()["ln_f.weight"])
    assert Image.open(path).size == (2 + 3 * (64 + 2), 2 + 2 * (64 + 2))

    class Eng:  # a stand-in engine: forward = the model's loss
        def __init__(self, m):
            self.model, self.ds = m, SimpleNamespace(module=m)

        def __call__(self, text, codes):
            return self.model.loss(text, codes)

    cfg = load_config("tiny", ["optim.max_steps=7", "logging.validate_every_steps=3", "logging.image_every_steps=5",
                               "logging.validation_batches=2", "optim.micro_batch_size=2", f"data.dvae={dvae}",
                               f"run.dir={tmp_path / 'run2'}", f"model.image_grid={GRID}", "data.image_size=8",
                               f"model.text_len={TEXT_LEN}", f"model.text_vocab_size={TEXT_VOCAB}",
                               f"model.image_vocab_size={CODEBOOK}", f"dvae.codebook_size={CODEBOOK}",
                               "dvae.group_count=2", "model.conv_kernel=3", "model.d_model=32", "model.n_heads=2",
                               "logging.sample_count=2", "logging.samples_per_caption=1"])
    model2 = Prior(cfg.model)
    extra_calls = []
    hooks = PriorHooks.from_config(cfg, str(data), tok, True, [lambda s, e: extra_calls.append(s)])
    log = MetricsLogger(cfg.run.dir, tensorboard=False)
    vals = {}
    for step in range(1, 8):
        v = hooks.validate(step, Eng(model2), log)
        log.log(step, {"loss": 1.0, "text_loss": 2.0, "image_loss": 3.0 - 0.1 * step, **v})
        hooks.samples(step, Eng(model2), log)
        vals[step] = v
    log.close()
    assert [s for s, v in vals.items() if v] == [3, 6, 7]
    assert set(vals[3]) == {"val_loss", "val_text_loss", "val_image_loss"}
    assert extra_calls == [5, 7]
    run2 = Path(cfg.run.dir)
    assert [json.loads(line)["step"] for line in (run2 / "eval.jsonl").read_text().splitlines()] == [3, 6, 7]
    rows = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    assert "val_image_loss" in rows[2] and "val_image_loss" not in rows[3]
    assert sorted(p.name for p in (run2 / "samples").glob("*.png")) == ["step_00000005.png", "step_00000007.png"]
    curve = Image.open(run2 / "learning_curve.png")
    assert curve.size[0] > 600
    assert len({curve.getpixel((x, y)) for x in range(0, curve.size[0], 7) for y in range(0, curve.size[1], 7)}) > 3


def test_learning_curve_draws_train_and_validation_points(tmp_path):
    from dalle_ds.training.curves import PANEL_H, VAL, write_learning_curve

    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "image_loss": 5 * math.exp(-s / 50), "text_loss": 2.0}) + "\n" for s in range(1, 201)))
    path = write_learning_curve(tmp_path)
    empty_val = np.asarray(Image.open(path))[:PANEL_H]  # the panels, not the legend
    assert not (empty_val == np.array(VAL)).all(-1).any()  # no validation colour without eval rows
    (tmp_path / "eval.jsonl").write_text("".join(
        json.dumps({"step": s, "image_loss": 5 * math.exp(-s / 50) + 0.2, "text_loss": 2.1}) + "\n"
        for s in (50, 100, 150, 200)))
    img = np.asarray(Image.open(write_learning_curve(tmp_path)))[:PANEL_H]
    assert (img == np.array(VAL)).all(-1).sum() > 40  # the validation markers are drawn


def test_comparison_curve_draws_each_run_in_its_colour_where_its_values_are(tmp_path):
    from dalle_ds.training.curves import PALETTE, PANEL_H, write_comparison_curve

    high, low = [5.0] * 100, [1.0] * 100
    img = np.asarray(Image.open(write_comparison_curve(tmp_path / "c.png", "loss", {"a": high, "b": low})))
    rows_a = np.nonzero((img[:PANEL_H] == np.array(PALETTE[0])).all(-1).any(1))[0]
    rows_b = np.nonzero((img[:PANEL_H] == np.array(PALETTE[1])).all(-1).any(1))[0]
    assert len(rows_a) and len(rows_b)
    assert rows_a.max() < rows_b.min()  # the higher curve is drawn above the lower one


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from dalle_ds.config import load_config
    from dalle_ds.training.schedules import WarmupCosineLR, WarmupPlateauLR, prior_lr_schedule

    cfg = load_config("tiny", ["optim.schedule=cosine", "optim.lr=2e-3", "optim.warmup_steps=10",
                               "optim.max_steps=110", "optim.min_lr_ratio=0.1"]).optim
    s = prior_lr_schedule(cfg)
    assert isinstance(s, WarmupCosineLR)
    lrs = []
    for _ in range(110):
        lrs.append(s.lr)
        s.step(1.0)
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == pytest.approx(2e-3)
    assert lrs[10] == pytest.approx(2e-3) and lrs[60] == pytest.approx(1.1e-3) and s.lr == pytest.approx(2e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert s.grad_clip == 0.0
    state = s.state_dict()
    t = prior_lr_schedule(cfg)
    t.load_state_dict(state)
    assert t.lr == s.lr
    assert type(prior_lr_schedule(load_config("tiny").optim)) is WarmupPlateauLR


# ---------------------------------------------------------------- augmented views
def test_token_loader_uses_view_epoch_mod_k_and_resumes_on_it(tmp_path):
    from dalle_ds.data.tokenizer import TextTokenizer

    data = tmp_path / "tok3"
    make_tokens(data, [4], views=3)
    tok = TextTokenizer.from_file(data / "tokenizer.json", TEXT_LEN, TEXT_VOCAB)

    def loader(**kw):
        return TokenShardLoader(data, 2, tokenizer=tok, grid=GRID, codebook_size=CODEBOOK, num_workers=0, seed=0,
                                shuffle=False, infinite=True, views=3, rank=0, world_size=1, **kw)

    raw = {}
    with tarfile.open(data / "shard-000000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".codes"):
                raw[m.name[:-6]] = np.frombuffer(tar.extractfile(m).read(), "<u2").reshape(3, -1).astype(np.int64)
    it = iter(loader())
    for epoch in range(7):  # 4 samples / batch 2 = 2 batches per epoch
        for _ in range(2):
            b = next(it)
            for key, codes in zip(b["keys"], b["codes"]):
                assert torch.equal(codes, torch.from_numpy(raw[key][epoch % 3])), (epoch, key)
    # resume mid-run: the state holds the epoch, so the restored loader picks the same view
    a = loader()
    ia = iter(a)
    for _ in range(5):
        next(ia)
    state = a.state_dict()
    want = [next(ia)["codes"] for _ in range(4)]
    b = loader()
    b.load_state_dict(state)
    ib = iter(b)
    assert all(torch.equal(w, next(ib)["codes"]) for w in want)
    # use_views=1: always view 0 (no augmentation) from the same shards
    it = iter(loader(use_views=1))
    for _ in range(6):
        batch = next(it)
        for key, codes in zip(batch["keys"], batch["codes"]):
            assert torch.equal(codes, torch.from_numpy(raw[key][0]))
    # a loader told 2 views reads 3 views' bytes: refused, naming the sample
    bad = TokenShardLoader(data, 2, tokenizer=tok, grid=GRID, codebook_size=CODEBOOK, num_workers=0, views=2,
                           rank=0, world_size=1)
    with pytest.raises(ShardError, match="2 views of grid 4x4"):
        next(iter(bad))


def test_tokenize_images_views_keep_view_zero_and_are_deterministic(tmp_path):
    from data_prep import tokenize_images as tk
    from tests.eval_fixtures import write_image_shards
    from tests.test_tokenize_images import make_export

    write_image_shards(tmp_path / "img", 6, size=24, per_shard=3)  # 24 px sources -> 16 px views
    dvae = make_export(tmp_path / "dvae")
    common = ["--dvae", dvae, "--input", str(tmp_path / "img"), "--batch-size", "4", "--no-progress", "--workers", "1"]
    tk.main(common + ["--output", str(tmp_path / "one")])
    tk.main(common + ["--output", str(tmp_path / "three"), "--views", "3"])
    tk.main(common + ["--output", str(tmp_path / "three_again"), "--views", "3"])

    def codes(folder):
        out = {}
        for shard in sorted((tmp_path / folder).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".codes"):
                        out[m.name] = np.frombuffer(tar.extractfile(m).read(), "<u2")
        return out

    one, three, again = codes("one"), codes("three"), codes("three_again")
    n = one[next(iter(one))].size
    assert all(three[k].size == 3 * n for k in three)
    assert all(np.array_equal(three[k][:n], one[k]) for k in one)  # view 0 = the centre crop's codes
    assert all(np.array_equal(three[k], again[k]) for k in three)  # deterministic
    assert any(not np.array_equal(three[k][n:2 * n], three[k][:n]) for k in three)  # views differ
    manifest = json.loads((tmp_path / "three" / "manifest.json").read_text())
    assert manifest["views"] == 3 and "views" not in json.loads((tmp_path / "one" / "manifest.json").read_text())
    from dalle_ds.training.prior_hooks import token_views

    assert token_views(str(tmp_path / "three")) == 3 and token_views(str(tmp_path / "one")) == 1

    # images already at the view size (as shard_corpus stores them): the augmented views still differ
    from PIL import Image

    rng = np.random.default_rng(0)
    views = tk.ViewAugment(16, 4, 0)
    differ = 0
    for _ in range(8):
        v = views(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))  # (4, 3, 16, 16)
        differ += sum(not torch.equal(v[i], v[0]) for i in range(1, 4))
    assert differ >= 12  # of 24 augmented views; a view equals the centre crop only when t = 16 (1 in 3)


def test_caption_dropout_empties_a_fraction_of_captions_and_resumes_exactly():
    from dalle_ds.config import ConfigError, load_config
    from dalle_ds.training.prior_hooks import CaptionDropout

    text = torch.arange(1, 1 + 64 * TEXT_LEN).view(64, TEXT_LEN) % 300 + 3  # no [PAD] anywhere
    codes = torch.randint(0, CODEBOOK, (64, GRID * GRID))
    batches = [{"text": text.clone(), "codes": codes} for _ in range(50)]
    drop = CaptionDropout(0.2, seed=5, rank=0)
    out = [drop(b) for b in batches[:25]]
    state = drop.state_dict()
    out += [drop(b) for b in batches[25:]]
    dropped = torch.stack([(o["text"] == 0).all(1) for o in out])  # (50, 64)
    kept = torch.stack([(o["text"] == text).all(1) for o in out])
    assert bool((dropped ^ kept).all())  # a row is either the empty caption or untouched
    assert 0.15 < float(dropped.float().mean()) < 0.25  # 3200 rows at p = 0.2
    assert all(o["codes"] is codes for o in out)  # images are never touched
    # resumed from the state after 25 batches: the same rows dropped; another rank drops others
    resumed = CaptionDropout(0.2, seed=5, rank=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed(b)["text"], o["text"]) for b, o in zip(batches[25:], out[25:]))
    other = CaptionDropout(0.2, seed=5, rank=1)
    assert not all(torch.equal(other(b)["text"], o["text"]) for b, o in zip(batches, out))
    assert torch.equal(CaptionDropout(0.0, seed=5, rank=0)(batches[0])["text"], text)
    with pytest.raises(ValueError, match="caption_dropout"):
        CaptionDropout(1.0, seed=5, rank=0)
    with pytest.raises(ConfigError, match="data.caption_dropout"):
        load_config("tiny", ["data.caption_dropout=1.5"])
