"""Hierarchical data parallelism on DeepSpeed ZeRO-3: shard within a node, average across nodes.

The paper's scheme (App. E) on DeepSpeed 0.19.8, which has no gradient-communication hook:

1. ``deepspeed.zero.Init(data_parallel_group=groups.intra)`` partitions every parameter over the
   ranks of its node only (``Hierarchy.zero_init_kwargs()``); nodes hold replicas.
2. ZeRO-3 reduce-scatters each gradient bucket inside the node and divides by the node size,
   then calls ``DeepSpeedZeroOptimizer_Stage3.partition_grads`` to accumulate the shard into its
   grad buffer. ``install()`` wraps that method (through :mod:`dalle_ds.parallel.deepspeed_internals`,
   which owns every touch of DeepSpeed's internals): at the gradient-accumulation boundary the
   accumulated shard buffers of the bucket are averaged over the ``cross`` group (the ranks with
   the same local index on the other nodes) by an averager from ``dalle_ds.parallel.powersgd``, which also
   divides by the number of nodes, so the shard holds the global mean, as with flat ZeRO-3.
   The wrapper only records the bucket's shards during backward; the averaging runs inside the
   optimizer step, once the step's skip decision is known (fp16 overflow, the block scaler's vote;
   ``deepspeed_internals.run_at_update_decision``) and before the gradient norm: a skipped step
   leaves PowerSGD's error buffers and Q exactly as they were (#15). A non-finite shard on any node
   (one flag all-reduce per step) makes every node skip.
3. Gradient norms, clipping and overflow checks in DeepSpeed reduce over the parameter's partition
   group (the node); every node holds the same averaged shards, so they see the global values.

``install()`` must run before ``deepspeed.initialize`` (the engine imports the optimizer class
while initialising); the wrapper is inert for optimizers without an attached averager, and
``Hierarchy.attach(engine)`` attaches it afterwards. CPU-offloaded optimizers are refused
(their gradients leave the device inside ``partition_grads`` before the cross-node step).

With :func:`dalle_ds.parallel.engine.build_engine` all of this is one call::

    hierarchy = hierarchical_zero.from_config(cfg.powersgd, seed=cfg.run.seed)   # None: flat ZeRO-3
    engine = build_engine(..., **(hierarchy.engine_kwargs() if hierarchy else {}))
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dalle_ds.config import PowerSGDConfig
from dalle_ds.parallel import deepspeed_internals as ds_internals
from dalle_ds.parallel.dist import NodeGroups, all_reduce_, all_reduce_values, build_node_groups, get_rank, print0
from dalle_ds.parallel.powersgd import ExactAverager, PowerSGD, Shard, build_averager

_EXACT_NAME = re.compile(r"(emb|logits|unembed|pad|pos_|norm|ln_|gain|bias)", re.IGNORECASE)


def default_exact(name: str, param: torch.nn.Parameter) -> bool:
    """Embeddings, unembeddings, gains and biases: averaged exactly in fp32, never compressed."""
    shape = ds_internals.full_shape(param)
    from dalle_ds.models.prior import keep_fp32  # the prior names its parameters so these are identifiable

    return keep_fp32(name, param) or len(shape) < 2 or bool(_EXACT_NAME.search(name))


def mark_params(model: torch.nn.Module, exact: Callable[[str, torch.nn.Parameter], bool] = default_exact) -> int:
    """Tag parameters with their name (error-buffer key) and whether they are averaged exactly."""
    n_exact = 0
    for name, p in model.named_parameters():
        p.cross_node_key = name
        p.cross_node_exact = bool(exact(name, p))
        n_exact += p.cross_node_exact
    return n_exact


def _shards(opt: Any, params: list, buffers: list[torch.Tensor]) -> list[Shard]:
    shards = []
    for p, buf in zip(params, buffers):
        shape = ds_internals.full_shape(p)
        _, numel = ds_internals.local_and_full_numel(p)
        offset = ds_internals.shard_offset(opt, p)
        valid = min(buf.numel(), numel - offset)  # the last shard is padded with zeros
        key = getattr(p, "cross_node_key", None)
        if key is None:
            raise RuntimeError(f"parameter ds_id={ds_internals.param_id(p)} shape={shape} was not tagged: call "
                               "hierarchical_zero.mark_params(model) before deepspeed.initialize")
        width = math.prod(shape[1:]) if len(shape) >= 2 else max(1, numel)
        shards.append(Shard(key, buf.view(-1)[:valid], offset, width, getattr(p, "cross_node_exact", False)))
    return shards


def install() -> None:
    """Wrap ``DeepSpeedZeroOptimizer_Stage3.partition_grads`` (idempotent). Call before deepspeed.initialize."""
    ds_internals.patch_stage3_partition_grads()


@dataclass
class Hierarchy:
    """Node groups plus the cross-node averager; one per training run."""

    groups: NodeGroups
    averager: ExactAverager | PowerSGD

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dalle_ds.parallel.engine.build_engine``, the one way to wire a hierarchy
        into the engine: parameters partitioned within the node, the DeepSpeed override installed and
        the parameters tagged before ``deepspeed.initialize`` (ZeRO stage 3 checked), then :meth:`attach`."""

        def before(model: torch.nn.Module, ds_config: dict) -> None:
            if ds_config.get("zero_optimization", {}).get("stage") != 3:
                raise ValueError("powersgd.enabled / powersgd.hierarchical need zero_optimization.stage=3 "
                                 "in the DeepSpeed JSON")
            install()
            mark_params(model)

        return {"zero_partition_group": self.groups.intra, "before_initialize": [before],
                "after_initialize": [self.attach]}

    def describe(self) -> str:
        """One line for the run log: the node layout and how shards are averaged across nodes."""
        how = f"PowerSGD rank {self.averager.cfg.rank}" if isinstance(self.averager, PowerSGD) else "exact fp32"
        return (f"ZeRO-3 inside nodes of {self.groups.node_size} ranks, {self.groups.num_nodes} nodes, "
                f"cross-node average: {how}")

    def zero_init_kwargs(self) -> dict[str, Any]:
        """Arguments for ``deepspeed.zero.Init`` so parameters are partitioned within the node."""
        return {"data_parallel_group": self.groups.intra}

    def attach(self, engine_or_optimizer: Any) -> None:
        """After deepspeed.initialize: route the engine's ZeRO-3 optimizer through the averager."""
        opt = getattr(engine_or_optimizer, "optimizer", engine_or_optimizer)
        if not ds_internals.is_stage3_optimizer(opt):
            raise TypeError(f"hierarchical data parallelism needs ZeRO stage 3, got {type(opt).__name__}")
        if ds_internals.offloads_optimizer(opt):
            raise ValueError("hierarchical data parallelism does not support offload_optimizer: "
                             "remove zero_optimization.offload_optimizer from the DeepSpeed config")
        if not ds_internals.partition_grads_patched():
            raise RuntimeError("hierarchical_zero.install() must run before deepspeed.initialize")
        averager = self.averager
        pending: list[list[Shard]] = []  # this step's buckets, averaged once the skip decision is known

        def decide(skipped: bool) -> bool:
            buckets = list(pending)
            pending.clear()
            if skipped or not buckets:  # an fp16 overflow or a skip vote: E and Q stay as they were
                return False
            return not averager.average_buckets_(buckets)  # non-finite on some node: skip everywhere

        ds_internals.set_partition_grads_hook(
            opt, lambda params, buffers: pending.append(_shards(opt, params, buffers)))
        ds_internals.run_at_update_decision(opt, decide)
        ds_internals.call_after_step(opt, averager.end_step)

    def stats(self) -> dict[str, Any]:
        return {"node_size": self.groups.node_size, **self.averager.stats()}

    # this rank's own averager state (its error buffers); checkpoints use checkpoint_state()
    def state_dict(self) -> dict[str, Any]:
        return self.averager.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averager.load_state_dict(state)

    def checkpoint_state(self) -> "CrossNodeState":
        """The averager's state as a checkpoint holds it: one copy per node-local rank (register it
        with scope "node_replica" in :class:`dalle_ds.parallel.checkpoint.Checkpointer`)."""
        return CrossNodeState(self)


class CrossNodeState:
    """PowerSGD's error buffers and Qs, one copy for all nodes: their mean over nodes.

    With M_i = G_i + E_i on node i, PowerSGD computes P = mean_i(M_i) Q and Q' = mean_i(M_i)^T P
    (``dalle_ds.parallel.powersgd``), so the averaged update depends on the error buffers only through
    mean_i(E_i) (and, through the 16-bit payload's rounding, a little on the split). Saving that mean
    and giving it to every node on resume repeats the uninterrupted run's updates, on any number of
    nodes, for one buffer per node-local rank instead of one per rank. Qs are the same on every node.
    ``state_dict`` is collective over the cross-node group (one all-reduce per buffer). Buffers that
    cannot be re-split are reset, with a warning: another node size, or a switch between PowerSGD and
    exact averaging (a run on one node averages exactly: nothing crosses nodes)."""

    def __init__(self, hierarchy: Hierarchy):
        self.hierarchy = hierarchy

    def _layout(self) -> dict[str, int]:
        g = self.hierarchy.groups
        return {"node_size": g.node_size, "num_nodes": g.num_nodes}

    def state_dict(self) -> dict[str, Any]:
        averager, groups = self.hierarchy.averager, self.hierarchy.groups
        if not isinstance(averager, PowerSGD):
            return {"mode": "exact", **self._layout()}
        state = averager.state_dict()  # host copies
        keys = sorted(state["errors"])
        counts = all_reduce_values([len(keys), -len(keys)], "max", group=groups.cross)
        if counts[0] != -counts[1]:
            raise RuntimeError(f"powersgd: nodes hold different numbers of error buffers ({-counts[1]}..{counts[0]}) "
                               f"for node-local rank {get_rank() % groups.node_size}; cannot average them")
        for key in keys:  # same keys in the same order on every node: the same shards
            all_reduce_(state["errors"][key], "sum", group=groups.cross).div_(groups.num_nodes)
        return {**state, **self._layout(), "errors_are": "mean over nodes"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        averager, layout = self.hierarchy.averager, self._layout()
        saved_mode = state.get("mode")
        if state.get("node_size") != layout["node_size"]:
            print0(f"powersgd: WARNING the checkpoint's error buffers belong to nodes of {state.get('node_size')} "
                   f"ranks, these are {layout['node_size']}: they cannot be re-split, starting from zero")
            return
        if isinstance(averager, PowerSGD) and saved_mode == "powersgd":
            averager.load_state_dict(state)
            if state.get("num_nodes") != layout["num_nodes"]:
                print0(f"powersgd: error buffers saved on {state.get('num_nodes')} nodes (their mean) continue "
                       f"on {layout['num_nodes']}")
        elif isinstance(averager, PowerSGD):
            print0(f"powersgd: WARNING the checkpoint has no error buffers (saved by a run that averaged exactly: "
                   f"{state.get('num_nodes')} node(s), or powersgd.enabled=false): starting from zero")
        elif saved_mode == "powersgd":
            print0(f"powersgd: WARNING the checkpoint's PowerSGD error buffers are dropped: this run averages "
                   f"exactly ({layout['num_nodes']} node(s), or powersgd.enabled=false); the gradient they "
                   f"still owed is lost")


def is_enabled(cfg: PowerSGDConfig) -> bool:
    return cfg.enabled or cfg.hierarchical


def from_config(cfg: PowerSGDConfig, seed: int = 0) -> Hierarchy | None:
    """The run's hierarchy, or None for flat ZeRO over all ranks (powersgd.enabled/hierarchical false)."""
    return setup(cfg, seed=seed) if is_enabled(cfg) else None


def setup(cfg: PowerSGDConfig, model: torch.nn.Module | None = None, seed: int = 0) -> Hierarchy:
    """Build node groups and the averager and install the DeepSpeed override (every rank, before
    building the model under zero.Init). ``model`` may be tagged here or later with ``mark_params``."""
    install()
    groups = build_node_groups(cfg.node_size)
    if model is not None:
        mark_params(model)
    return Hierarchy(groups, build_averager(cfg, groups.cross, groups.num_nodes, seed))
