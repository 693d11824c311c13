"""dalle_ds/parallel/checkpoint.py on 2 real gloo ranks with the real prior under ZeRO-3: save / resume with
project state, a crash mid-save keeps the previous checkpoint, a signal on one rank makes every
rank checkpoint at the same step, keep-last-K, and the safetensors export gives the live logits."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from dalle_ds.parallel.checkpoint import Checkpointer, read_latest, tag_for
from tests.multirank import run_ranks
from tests.test_engine import ROOT, tiny_model_cfg


class Counter:
    """A registered stateful object (stands for the precision scaler / PowerSGD buffers)."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _batch(step: int, rank: int, cfg):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randint(0, cfg.text_vocab_size, (2, cfg.text_len), generator=g),
            torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len), generator=g))


def _ckpt_rank(root: str, export_dir: str) -> dict:
    import dataclasses

    from dalle_ds.parallel.checkpoint import export, load_export
    from dalle_ds.parallel.dist import barrier, init_distributed
    from dalle_ds.parallel.engine import OptimSpec, build_engine, gathered_state_dict
    from dalle_ds.training.schedules import WarmupPlateauLR
    from dalle_ds.models.prior import Prior, no_decay

    info = init_distributed()
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    spec = OptimSpec(2, 1, 3e-3, (0.9, 0.96), 1e-8, 0.05)
    engine = build_engine(lambda: Prior(cfg), str(ROOT / "ds_configs/zero3_fp32_cpu.json"), spec,
                          no_decay=no_decay)
    sched = WarmupPlateauLR(3e-3, warmup_steps=2, patience=2, grad_clip=1.0)
    counter = Counter()
    ckpt = Checkpointer(engine, root, every_steps=2, keep_last=2)
    ckpt.register_stateful("schedule", sched)
    ckpt.register_stateful("counter", counter)
    out: dict = {"losses": {}}

    def train_step(step: int) -> None:
        engine.set_lr(sched.lr)
        engine.set_grad_clip(sched.grad_clip)
        loss, _ = engine(*_batch(step, info.rank, cfg))
        out["losses"].setdefault(step, []).append(float(loss.detach()))
        engine.engine_step(loss)
        sched.step(float(loss.detach()))
        counter.n += 1
        torch.rand(3)  # consume RNG: resume must restore it

    for step in (1, 2):
        train_step(step)
        if ckpt.should_save(step):
            ckpt.save(step)
    out["saved_2"] = sorted(p.name for p in Path(root).iterdir())
    params_2 = gathered_state_dict(engine.model)
    sched_2, rng_2 = sched.state_dict(), torch.get_rng_state()

    # steps 3, 4, then a crash after every rank wrote its shards but before `latest` moved
    for step in (3, 4):
        train_step(step)
    assert ckpt.should_save(4)
    commit = ckpt._commit
    ckpt._commit = lambda tag: (_ for _ in ()).throw(RuntimeError("simulated crash mid-save"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        ckpt.save(4)
    ckpt._commit = commit
    barrier()
    out["latest_after_crash"] = read_latest(root)
    out["partial_exists"] = (Path(root) / tag_for(4)).is_dir()

    state = ckpt.resume()  # back to step 2: parameters, optimizer, schedule, counter, RNG
    out["resumed_step"] = state["step"]
    params = gathered_state_dict(engine.model)
    out["param_diff_after_resume"] = max((params[k] - params_2[k]).abs().max().item() for k in params)
    out["sched_equal"] = sched.state_dict() == sched_2
    out["counter"] = counter.n
    out["rng_equal"] = torch.equal(torch.get_rng_state(), rng_2)

    for step in (3, 4):  # the same steps again: same losses (fp32, same data, same state)
        train_step(step)
        if ckpt.should_save(step):
            ckpt.save(step)

    # step 5: SIGTERM reaches rank 1 only; every rank checkpoints at step 5
    train_step(5)
    if info.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    out["should_save_5"] = ckpt.should_save(5)
    out["stop_requested"] = ckpt.stop_requested
    if out["should_save_5"]:
        ckpt.save(5)
    barrier()
    out["kept"] = sorted(p.name for p in Path(root).iterdir() if p.name.startswith("step_"))
    out["latest"] = read_latest(root)

    # export (rank 0, offline API) and compare logits with the live ZeRO-3 model
    text, codes = _batch(99, 0, cfg)
    engine.model.eval()
    with torch.no_grad():
        live = engine.model(text, codes)  # collective: ZeRO-3 gathers per module
    if info.rank == 0:
        export(root, export_dir, dataclasses.asdict(cfg))
        tensors, config = load_export(export_dir)
        model = Prior(type(cfg)(**config))
        model.load_state_dict(tensors)
        model.eval()
        with torch.no_grad():
            exported = model(text, codes)
        out["export_logit_diff"] = max((a - b).abs().max().item() for a, b in zip(live, exported))
        out["export_keys_match"] = set(tensors) == set(model.state_dict())
    barrier()
    return out


def test_save_crash_resume_signal_keep_and_export(tmp_path):
    root, export_dir = tmp_path / "ckpt", tmp_path / "export"
    res = run_ranks(_ckpt_rank, 2, args=(str(root), str(export_dir)), timeout_s=220)
    for r in res:
        assert {"latest", tag_for(2)} <= set(r["saved_2"]) and tag_for(1) not in r["saved_2"]
        assert r["latest_after_crash"] == tag_for(2)  # the crash left the previous checkpoint
        assert r["partial_exists"]
        assert r["resumed_step"] == 2
        assert r["param_diff_after_resume"] == 0.0
        assert r["sched_equal"] and r["rng_equal"] and r["counter"] == 2
        for step in (3, 4):  # replayed steps reproduce the losses exactly
            first, replay = r["losses"][step]
            assert first == replay, (step, first, replay)
        assert r["should_save_5"] and r["stop_requested"]  # rank 0 got no signal, still stops
        assert r["kept"] == [tag_for(4), tag_for(5)]  # keep_last=2
        assert r["latest"] == tag_for(5)
    assert res[0]["export_keys_match"]
    assert res[0]["export_logit_diff"] < 1e-5, res[0]["export_logit_diff"]
    assert (export_dir / "config.json").is_file()


def test_latest_naming_a_missing_folder_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step_00000007\n")
    with pytest.raises(FileNotFoundError, match="step_00000007"):
        read_latest(tmp_path)
    assert read_latest(tmp_path / "nothing") is None


def test_register_stateful_refuses_reserved_and_duplicate_names():
    ck = Checkpointer.__new__(Checkpointer)
    ck._stateful, ck._scopes = {}, {}
    ck.register_stateful("data", Counter())
    for name in ("data", "rng", "step"):
        with pytest.raises(ValueError, match=name):
            ck.register_stateful(name, Counter())
