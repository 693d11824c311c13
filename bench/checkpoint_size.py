"""Bytes on disk of one checkpoint: flat ZeRO-3 against hierarchical ZeRO (#15 item 5), 2 fake nodes x 2 gloo ranks.

    PYTHONPATH=. DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/checkpoint_size.py

The prior of tests/test_checkpoint_hierarchical.py (d_model 64, 2 layers), 2 updates, then one save each:
flat ZeRO-3 over the 4 ranks; hierarchical exact (ZeRO-3 inside each node) saved the way DeepSpeed
does it alone (``before``: files keyed by global rank, every node writes) and through
:class:`dalle_ds.parallel.checkpoint.Checkpointer` (``after``: node 0 writes); hierarchical
PowerSGD through the Checkpointer (its error buffers saved once, as their mean over nodes).
Sizes are exact byte counts, not timings, so the shared machine's load does not matter.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import Recorder  # noqa: E402
from tests.multirank import run_ranks  # noqa: E402


def _ranks(tmp: str) -> dict:
    from dalle_ds.parallel.checkpoint import tag_for
    from dalle_ds.parallel.dist import barrier, init_distributed
    from tests.test_checkpoint_hierarchical import STEPS, _build, _checkpointer, _train, _tree_bytes

    info = init_distributed()
    out = {}
    for name, mode in (("flat", "flat"), ("hierarchical_exact_before", "exact"), ("hierarchical_exact", "exact"),
                       ("hierarchical_powersgd", "powersgd")):
        engine, hier = _build(mode)
        _train(engine, range(1, STEPS + 1), info.rank)
        root = Path(tmp) / name
        if name.endswith("_before"):  # DeepSpeed's own layout under hierarchical ZeRO
            engine.ds.save_checkpoint(str(root), tag=tag_for(STEPS), save_latest=False)
        else:
            _checkpointer(engine, hier, root).save(STEPS)
        barrier()
        if info.rank == 0:
            out[name] = _tree_bytes(root / tag_for(STEPS))
        barrier()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trees = run_ranks(_ranks, 4, args=(tmp,), node_size=2, timeout_s=600)[0]
    with Recorder("checkpoint_size") as rec:
        flat_ds = sum(n for f, n in trees["flat"].items() if not f.startswith("project/"))
        for name, tree in trees.items():
            deepspeed = sum(n for f, n in tree.items() if not f.startswith("project/"))
            errors = sum(n for f, n in tree.items() if f.startswith("project/node_rank"))
            total = sum(tree.values())
            rec.add(f"{name}_deepspeed_bytes", deepspeed, unit="B", vs_flat=round(deepspeed / flat_ds, 4),
                    optim_files=sorted(f for f in tree if f.endswith("optim_states.pt")))
            if errors:
                rec.add(f"{name}_error_buffer_bytes", errors, unit="B", vs_flat_deepspeed=round(errors / flat_ds, 4))
            if not name.endswith("_before"):
                rec.add(f"{name}_total_bytes", total, unit="B", vs_flat=round(total / sum(trees["flat"].values()), 4))


if __name__ == "__main__":
    main()
