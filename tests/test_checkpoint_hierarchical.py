"""Hierarchical ZeRO checkpoints hold one copy of the model state (#15 item 5), on 2 fake nodes x 2 gloo
ranks with the real prior and DeepSpeed: the checkpoint's bytes on disk match a flat ZeRO-3 checkpoint
of the same model (within 10%), only node 0 writes DeepSpeed's files, the export gives the live
weights exactly, and PowerSGD's error buffers (saved once, as their mean over nodes) resume to the
uninterrupted run's losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tests.multirank import run_ranks
from tests.test_engine import ROOT

STEPS = 2


def model_cfg():
    from dalle_ds.config import ModelConfig

    return ModelConfig(n_layers=2, n_heads=2, d_model=64, mlp_ratio=4, text_len=8, text_vocab_size=64,
                       image_grid=4, image_vocab_size=64, conv_kernel=3, attention="dense",
                       activation_checkpointing=False)


def _batch(step: int, rank: int, cfg):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randint(1, cfg.text_vocab_size, (2, cfg.text_len), generator=g),
            torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len), generator=g))


def _build(mode: str):
    """mode: flat | exact | powersgd -> (engine, hierarchy or None)."""
    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.models.prior import Prior, no_decay
    from dalle_ds.parallel import hierarchy as hierarchical_zero
    from dalle_ds.parallel.engine import OptimSpec, build_engine

    hier = None
    if mode != "flat":
        pcfg = PowerSGDConfig(enabled=mode == "powersgd", hierarchical=True, node_size=2, rank=4,
                              min_compression_numel=256)
        hier = hierarchical_zero.from_config(pcfg, seed=1)
    torch.manual_seed(0)
    spec = OptimSpec(2, 1, 3e-3, (0.9, 0.96), 1e-8, 0.0)
    cfg = model_cfg()
    engine = build_engine(lambda: Prior(cfg), str(ROOT / "ds_configs/zero3_fp32_cpu.json"), spec,
                          no_decay=no_decay, **(hier.engine_kwargs() if hier else {}))
    return engine, hier


def _checkpointer(engine, hier, root):
    from dalle_ds.parallel.checkpoint import Checkpointer

    ckpt = Checkpointer(engine, root, every_steps=STEPS, keep_last=2, node_groups=hier.groups if hier else None)
    if hier is not None:
        ckpt.register_stateful("powersgd", hier.checkpoint_state(), scope="node_replica")
    return ckpt


def _train(engine, steps, rank) -> list[float]:
    losses = []
    for step in steps:
        loss, _ = engine(*_batch(step, rank, model_cfg()))
        engine.engine_step(loss)
        losses.append(float(loss.detach()))
    return losses


def _tree_bytes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _ranks(tmp: str) -> dict:
    from dalle_ds.parallel.checkpoint import consolidated_state_dict, tag_for
    from dalle_ds.parallel.dist import barrier, init_distributed
    from dalle_ds.parallel.engine import gathered_state_dict

    info = init_distributed()
    out: dict = {}
    for mode in ("flat", "exact", "powersgd"):
        engine, hier = _build(mode)
        ckpt = _checkpointer(engine, hier, Path(tmp) / mode)
        _train(engine, range(1, STEPS + 1), info.rank)
        ckpt.save(STEPS)
        live = gathered_state_dict(engine.model)  # collective
        if info.rank == 0:
            out[mode] = _tree_bytes(Path(tmp) / mode / tag_for(STEPS))
            exported = consolidated_state_dict(Path(tmp) / mode)
            out[mode + "_export_keys"] = set(exported) == set(live)
            out[mode + "_export_diff"] = max((exported[k] - live[k]).abs().max().item() for k in live)
        barrier()
        if mode == "powersgd":
            out["uninterrupted"] = _train(engine, range(STEPS + 1, STEPS + 4), info.rank)
            engine, hier = _build(mode)  # fresh engine and averager: resume from step 2
            ckpt = _checkpointer(engine, hier, Path(tmp) / mode)
            out["resumed_step"] = ckpt.resume()["step"]
            out["errors_after_resume"] = sorted(hier.averager.errors)
            out["resumed"] = _train(engine, range(STEPS + 1, STEPS + 4), info.rank)
            engine, hier = _build(mode)  # the same without the error buffers: they matter
            ckpt = _checkpointer(engine, None, Path(tmp) / mode)
            ckpt.node_groups = hier.groups
            ckpt.resume()
            out["resumed_without_errors"] = _train(engine, range(STEPS + 1, STEPS + 4), info.rank)
    return out


def _ds_bytes(files: dict[str, int]) -> int:
    return sum(n for name, n in files.items() if not name.startswith("project/"))


def test_one_copy_of_the_model_state_exports_and_resumes(tmp_path):
    out = run_ranks(_ranks, 4, args=(str(tmp_path),), node_size=2, timeout_s=400)
    files = out[0]
    flat, exact, psgd = (files[m] for m in ("flat", "exact", "powersgd"))
    # flat ZeRO-3 over 4 ranks: 4 partitions; hierarchical: node 0's 2 partitions, nothing from node 1
    assert sorted(n for n in flat if n.endswith("_optim_states.pt")) == [
        f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(4)]
    for tree in (exact, psgd):
        assert sorted(n for n in tree if n.endswith("_states.pt")) == [
            f"zero_pp_rank_{i}_mp_rank_00_{kind}_states.pt" for i in range(2) for kind in ("model", "optim")]
    assert sorted(n for n in psgd if n.startswith("project/node_rank")) == [
        "project/node_rank_00000.pt", "project/node_rank_00001.pt"]
    total = {m: sum(t.values()) for m, t in (("flat", flat), ("exact", exact), ("powersgd", psgd))}
    errors = sum(n for name, n in psgd.items() if name.startswith("project/node_rank"))
    print(f"checkpoint bytes: flat {total['flat']} (DeepSpeed {_ds_bytes(flat)}), hierarchical exact "
          f"{total['exact']} (DeepSpeed {_ds_bytes(exact)}), hierarchical PowerSGD {total['powersgd']} "
          f"(DeepSpeed {_ds_bytes(psgd)}, mean error buffers {errors})")
    assert abs(total["exact"] / total["flat"] - 1) <= 0.10, total
    assert abs(_ds_bytes(psgd) / _ds_bytes(flat) - 1) <= 0.10, total
    for mode in ("flat", "exact", "powersgd"):  # the export is the live model, bit for bit (fp32)
        assert files[mode + "_export_keys"] and files[mode + "_export_diff"] == 0.0, mode
    for r, o in enumerate(out):
        assert o["resumed_step"] == STEPS and o["errors_after_resume"], r
        torch.testing.assert_close(torch.tensor(o["resumed"]), torch.tensor(o["uninterrupted"]), rtol=1e-4, atol=0)
        assert o["resumed_without_errors"] != o["uninterrupted"]
