"""Run a function on N real gloo ranks (separate processes) on CPU and collect the results.

    results = run_ranks(my_fn, world_size=4, args=(tmp_path,), node_size=2)

``my_fn`` must be importable (module level in a test file or a helper module). Each rank gets
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun would set
them, with ``node_size`` ranks per (fake) node; the function calls ``dalle_ds.parallel.dist.init_distributed``
itself. A rank's exception is re-raised in the test with its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, env: dict[str, str], args: tuple, results: Any) -> None:
    os.environ.update(env)
    try:
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


class RankFailed(RuntimeError):
    pass


def run_ranks(fn: Callable, world_size: int, args: tuple = (), node_size: int | None = None,
              timeout_s: float = 300.0, extra_env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes; return the values in rank order."""
    node_size = node_size or world_size
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {
            "RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank % node_size), "LOCAL_WORLD_SIZE": str(node_size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "DS_ACCELERATOR": "cpu",
        }
        env.update(extra_env or {})
        p = ctx.Process(target=_rank_main, args=(fn, rank, env, args, results), daemon=False)
        p.start()
        procs.append(p)
    collected: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(collected) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise RankFailed(f"timed out after {timeout_s}s waiting for ranks "
                                 f"{sorted(set(range(world_size)) - set(collected))}") from None
            if ok:
                collected[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                break  # one failure is enough: the others may be blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 30)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise RankFailed("\n".join(failures))
    return [collected[r] for r in range(world_size)]
