"""Memory and communication planner for the prior under ZeRO-3-in-a-node + PowerSGD-across-nodes.

    python -m dalle_ds.plan --config paper --ds-config zero3_fp16_v100_16bit.json --nodes 128 \
        --gpus-per-node 8 --gpu-memory 16GB [--powersgd-rank 896] [--node-size 8] [--reserve 1GiB]

It plans the regime ``train.py`` runs (#14): :func:`regime_of` resolves the preset + DeepSpeed JSON +
cluster shape with train.py's own functions (``resolve_mode`` = block_scaling.resolve_ds_config plus the
16-bit rule, engine.build_optimizer's AdamW / AdamW16 choice on a meta-device prior, the one-node PowerSGD
rule). Memory per GPU, itemised (bytes; g = node size, every parameter padded to g partitions):
  model state (:func:`model_state_bytes`, checked against the live engine by tests/test_plan_engine.py):
      parameter partitions (storage dtype), whole copies of parameters under the persistence threshold,
      separate master partitions (none when the master has the storage dtype: DeepSpeed aliases it,
      deepspeed_internals.alias_master_partitions), gradient partitions, optimizer state (torch AdamW: m, v
      in the master dtype; AdamW16: bf16 m, v, and fp32 master + m + v for the fp32 set), PowerSGD's fp32
      error buffers (the compressed row block of each shard: on the GPU with
      ``powersgd.error_buffer_device=gpu``; in pinned host memory with ``host``, reported apart and not
      counted against the GPU) and its fixed Q matrices.
  activations (:func:`activation_bytes`): the residual stream at each layer's input (the prior
      checkpoints per layer, in the storage dtype), one layer recomputed with its saves (sparse attention:
      probabilities and key/value windows) and the residual gradients, fp32 logits + gradients, fp32
      copies of the heads' weights (16-bit storage).
  buffers (:func:`buffer_bytes`): gathered parameters (a layer, capped by stage3_max_live_parameters,
      plus the prefetch bucket), autocast's 16-bit weight copies of one branch, the ipg reduce bucket,
      the optimizer step's sub-group gradient copy, PowerSGD's fp32 working block (the largest compressed
      block: the fp32 copy of a 16-bit M for its products, or with host buffers the staged E / E').
FITS when total x 1.05 (fragmentation) + --reserve (context, NCCL, cuBLAS, unexposed memory) <= --gpu-memory.
Communication per optimizer step and GPU (payload, i.e. the tensor sizes handed to the collectives):
  intra-node (ZeRO-3, each micro-batch): all-gather of fp16 params in forward and again in backward,
      reduce-scatter of fp16 grads: 3 x 2N x (g-1)/g sent per GPU per micro-batch.
  cross-node (once per step): exact = fp32 all-reduce of the GPU's shard (4N/g); PowerSGD = 16-bit
      P (rows x r) and Q (cols x r) of each shard viewed as a (rows, cols) matrix (dalle_ds.parallel.powersgd),
      plus fp32 exact parts. Ring all-reduce puts 2 (k-1)/k x payload on the wire (k nodes).
Table 1 of the paper: compression of one d x 4d weight, 16-bit P and Q (r(d + 4d) x 2 bytes) against
its fp32 gradient (4d^2 x 4 bytes): rate = 1 - 5r / (8d).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass

from dalle_ds.config import ConfigError, ModelConfig, load_config
from dalle_ds.parallel.powersgd import FP32_BYTES, compressed_bytes, split_rows, worth_compressing, wire_bytes

GiB = 1024**3
GB = 1e9
DEFAULT_DS_CONFIG = "zero3_fp16_v100_16bit.json"
PAPER_TABLE1 = [("2.8B", 1920, 512, 0.83), ("5.6B", 2688, 640, 0.85), ("12B", 3968, 896, 0.86)]


def table1_compression(d: int, rank: int) -> float:
    """Paper Table 1: 1 - (16-bit P, Q of a d x 4d matrix) / (its fp32 gradient) = 1 - 5r/(8d)."""
    return 1.0 - compressed_bytes(d, 4 * d, rank, 2) / (4 * d * d * FP32_BYTES)


@dataclass(frozen=True)
class Matrix:
    name: str
    rows: int
    cols: int
    count: int  # how many of these in the model
    exact: bool  # embedding / unembedding / gain / bias: never compressed

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.count


def inventory(m: ModelConfig) -> list[Matrix]:
    """Every parameter of dalle_ds.models.prior.Prior as (rows, cols) x count, named like the model's."""
    d, r, L, g = m.d_model, m.mlp_ratio, m.n_layers, m.image_grid
    return [
        Matrix("embed.text_tok", m.text_vocab_size, d, 1, True),
        Matrix("embed.text_pos+text_pad", m.text_len, d, 2, True),
        Matrix("embed.image_tok", m.image_vocab_size, d, 1, True),
        Matrix("embed.image_row+col", g, d, 2, True),
        Matrix("embed.soi", 1, d, 1, True),
        Matrix("attn.qkv.weight", 3 * d, d, L, False),
        Matrix("attn.proj.weight", d, d, L, False),
        Matrix("mlp.fc.weight", r * d, d, L, False),
        Matrix("mlp.proj.weight", d, r * d, L, False),
        Matrix("ln gains+biases, linear biases", 1, 2 * d + 3 * d + d + 2 * d + r * d + d, L, True),
        Matrix("ln_f", 1, 2 * d, 1, True),
        Matrix("text_head", m.text_vocab_size, d, 1, True),
        Matrix("image_head", m.image_vocab_size, d, 1, True),
    ]


def param_count(m: ModelConfig) -> int:
    """12 d^2 + 13 d per layer (r = 4), embeddings, heads, final LayerNorm."""
    return sum(x.numel for x in inventory(m))


def shard_comm(x: Matrix, g: int, rank: int, comm_bytes: int = 2, min_numel: int = 65536) -> tuple[float, float]:
    """(PowerSGD payload, exact fp32 payload) per GPU for all copies of ``x``, averaged over local ranks."""
    numel = x.rows * x.cols
    part = math.ceil(numel / g)
    psgd = 0.0
    for local in range(g):
        off = part * local
        valid = max(0, min(part, numel - off))
        split = split_rows(off, valid, x.cols) if valid else None
        if x.exact or not split or split.rows < 1 or split.numel < min_numel:
            psgd += valid * FP32_BYTES
        elif not worth_compressing(split, rank, comm_bytes, min_numel):  # exact in 16 bit (powersgd)
            psgd += split.numel * comm_bytes + (valid - split.numel) * FP32_BYTES
        else:
            psgd += compressed_bytes(split.rows, split.width, rank, comm_bytes) + (valid - split.numel) * FP32_BYTES
    return psgd / g * x.count, numel / g * FP32_BYTES * x.count


def communication(m: ModelConfig, g: int, nodes: int, rank: int, micro_steps: int = 1,
                  min_numel: int = 65536) -> dict[str, float]:
    n = param_count(m)
    psgd = exact = 0.0
    for x in inventory(m):
        p, e = shard_comm(x, g, rank, min_numel=min_numel)
        psgd, exact = psgd + p, exact + e
    intra = 3 * 2 * n * (g - 1) / g * micro_steps
    return {"intra_node_bytes": intra, "cross_node_exact_bytes": exact, "cross_node_powersgd_bytes": psgd,
            "cross_node_exact_wire_bytes": wire_bytes(exact, nodes),
            "cross_node_powersgd_wire_bytes": wire_bytes(psgd, nodes),
            "cross_node_exact_fp16_bytes": exact / 2, "cross_node_exact_fp16_wire_bytes": wire_bytes(exact / 2, nodes),
            "compression_rate": 1.0 - psgd / exact, "compression_rate_vs_fp16": 1.0 - psgd / (exact / 2)}


# ---------------------------------------------------------------- the regime train.py runs (#14)


@dataclass(frozen=True)
class Regime:
    """Everything that decides a rank's bytes, derived as ``train.py`` derives it (:func:`regime_of`)."""

    mode: str  # resolve_mode: fp32 | bf16 | fp16 | fp16_block (fp32 master) | fp16_block16 (16-bit state)
    optimizer: str  # engine.build_optimizer's choice: AdamW | AdamW16
    storage: int  # bytes per element of DeepSpeed's parameter partitions (and of the residual stream)
    master: int  # bytes of a separate master partition; 0 when DeepSpeed aliases it to the parameters
    grad: int  # bytes per element of the gradient-partition buffer
    moments: int  # optimizer state per element (m + v, + AdamW16's fp32 master for the fp32 set: see fp32set)
    fp32set: int  # optimizer state per element of the paper's fp32 set (AdamW16: fp32 master + m + v = 12)
    branch: int  # bytes of the branches' compute dtype (fp16/bf16 2, fp32 4)
    persistence: int  # stage3_param_persistence_threshold: parameters this small stay whole on every rank
    sub_group: int
    reduce_bucket: int
    prefetch: int
    max_live: int
    comm_copy: int  # bytes per element of a communication_data_type copy of the ipg bucket (0: none)
    node_size: int
    num_nodes: int
    powersgd: PowerSGDConfig | None  # None when off, or with one node (nothing crosses nodes)
    checkpointing: bool
    attention: str
    micro_batch: int


def resolve_mode(ds_json: dict, precision) -> tuple[str, dict]:
    """(mode, the JSON DeepSpeed gets) for a DeepSpeed JSON and the YAML's precision section: the same
    resolution ``train.py`` runs (``block_scaling.resolve_ds_config`` plus the 16-bit regime rule)."""
    from dalle_ds.parallel import block_scaling

    mode, resolved = block_scaling.resolve_ds_config(ds_json, precision)
    if mode == "bf16" and precision.branch_dtype == "float16" and precision.block_scaling:
        mode = "fp16_block16"  # bf16 storage (16-bit regime), fp16 branches with block scales
    return mode, resolved


def _for_target_gpu(precision):
    """Plans are for the cluster's GPUs: resolve fp16 JSONs as a GPU would (no CPU fp16 refusal)."""
    from contextlib import contextmanager
    from unittest import mock

    from dalle_ds.parallel import block_scaling

    @contextmanager
    def ctx():
        with mock.patch.object(block_scaling, "fp16_supported", lambda: True):
            yield
    return ctx()


def regime_of(cfg, ds_json: dict, nodes: int, gpus_per_node: int, node_size: int | None = None) -> Regime:
    """The regime ``train.py`` runs for preset ``cfg``, DeepSpeed JSON ``ds_json`` on the cluster shape:
    the same resolvers (``resolve_mode``, ``engine.resolve_ds_config``, ``engine.build_optimizer``
    on a meta-device model, ``hierarchy.is_enabled``, ``powersgd.build_averager``'s one-node rule)."""
    from dalle_ds.parallel import hierarchy
    from dalle_ds.parallel.engine import OptimSpec, build_optimizer, resolve_ds_config

    world = nodes * gpus_per_node
    hier = hierarchy.is_enabled(cfg.powersgd)
    node_size = node_size or (cfg.powersgd.node_size or gpus_per_node if hier else world)
    with _for_target_gpu(cfg.precision):
        mode, resolved = resolve_mode(ds_json, cfg.precision)
    resolved = resolve_ds_config(resolved, OptimSpec.from_optim(cfg.optim), world)
    opt = build_optimizer(_meta_prior(cfg.model), OptimSpec.from_optim(cfg.optim), resolved,
                          *_prior_predicates())
    fp16 = resolved.get("fp16", {}).get("enabled", False)
    bf16 = resolved.get("bf16", {})
    storage = 2 if fp16 or bf16.get("enabled", False) else 4
    aliased = storage == 4 or (bf16.get("enabled") and bf16.get("bf16_master_weights_and_grads")) or \
        (fp16 and resolved["fp16"].get("fp16_master_weights_and_grads"))
    master_dtype = storage if aliased else 4
    grad = {"fp32": 4, "fp16": 2, "bf16": 2}.get(str(resolved.get("data_types", {}).get("grad_accum_dtype")),
                                                  storage)
    sixteen = type(opt).__name__ == "AdamW16"
    z = resolved.get("zero_optimization", {})
    comm = {"fp32": 4, "fp16": 2, "bf16": 2}.get(str(resolved.get("communication_data_type")), grad)
    nodes_k = world // node_size
    psgd = cfg.powersgd if cfg.powersgd.enabled and nodes_k > 1 else None
    return Regime(mode=mode, optimizer=type(opt).__name__, storage=storage, master=0 if aliased else 4,
                  grad=grad, moments=(4 if sixteen else 2 * master_dtype), fp32set=(12 if sixteen else 2 * master_dtype),
                  branch=4 if mode == "fp32" else 2,
                  persistence=int(z.get("stage3_param_persistence_threshold", 1e5)),
                  sub_group=int(z.get("sub_group_size", 1e9)), reduce_bucket=int(z.get("reduce_bucket_size", 5e8)),
                  prefetch=int(z.get("stage3_prefetch_bucket_size", 5e7)),
                  max_live=int(z.get("stage3_max_live_parameters", 1e9)), comm_copy=comm if comm != grad else 0,
                  node_size=node_size, num_nodes=nodes_k, powersgd=psgd,
                  checkpointing=cfg.model.activation_checkpointing, attention=cfg.model.attention,
                  micro_batch=cfg.optim.micro_batch_size)


def _prior_predicates():
    from dalle_ds.models.prior import keep_fp32, no_decay

    return no_decay, keep_fp32


def _meta_prior(m: ModelConfig):
    """The prior's parameters (names, shapes) without memory: built on the meta device (the backend
    does not change parameter shapes; ``dense`` builds there)."""
    import dataclasses

    import torch

    from dalle_ds.models.prior import Prior

    key = repr(m)
    if key not in _META_PRIORS:
        with torch.device("meta"):
            _META_PRIORS[key] = Prior(dataclasses.replace(m, attention="dense"))
    return _META_PRIORS[key]


_META_PRIORS: dict[str, object] = {}


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    fp32set: bool  # AdamW16's fp32-master groups (gains, biases, embeddings, heads)
    exact: bool  # averaged exactly across nodes (hierarchy.default_exact)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_infos(m: ModelConfig) -> list[ParamInfo]:
    from dalle_ds.parallel.hierarchy import default_exact

    no_decay, keep_fp32 = _prior_predicates()
    return [ParamInfo(name, tuple(p.shape), bool(no_decay(name, p) or keep_fp32(name, p)), default_exact(name, p))
            for name, p in _meta_prior(m).named_parameters()]


def model_state_bytes(infos: list[ParamInfo], r: Regime, local_rank: int = 0) -> dict[str, float]:
    """Bytes of model state on the rank with index ``local_rank`` in its ZeRO-3 group, by item (the same
    keys as :func:`dalle_ds.parallel.engine.model_state_bytes` measures on a live engine)."""
    from dalle_ds.parallel.powersgd import effective_rank

    g = r.node_size
    out = dict.fromkeys(("params", "persistent", "master", "grads", "optimizer", "errors", "errors_host", "q"), 0.0)
    qs: set[tuple[int, int]] = set()
    for x in infos:
        n = x.numel
        part = -(-n // g)  # DeepSpeed pads every parameter to g equal partitions
        out["params"] += part * r.storage
        out["persistent"] += n * r.storage if n <= r.persistence else 0
        out["master"] += part * r.master
        out["grads"] += part * r.grad
        out["optimizer"] += part * (r.fp32set if x.fp32set else r.moments)
        if r.powersgd is None or x.exact:
            continue
        off = part * local_rank
        valid = max(0, min(part, n - off))
        width = math.prod(x.shape[1:]) if len(x.shape) >= 2 else max(1, n)
        split = split_rows(off, valid, width) if valid else None
        if split and worth_compressing(split, r.powersgd.rank, 2 if r.powersgd.comm_dtype != "float32" else 4,
                                       r.powersgd.min_compression_numel):
            where = "errors_host" if r.powersgd.error_buffer_device == "host" else "errors"
            out[where] += split.numel * FP32_BYTES  # (rows, C) fp32 error-feedback buffer
            qs.add((width, effective_rank(r.powersgd.rank, split.rows, width)))
    out["q"] = float(sum(c * k * FP32_BYTES for c, k in qs))  # fixed Q: one per (width, rank)
    return out


def _window(m: ModelConfig) -> int:
    """The widest key window of the sparse path over the layer types (keys per image query block)."""
    from dalle_ds.models.attention import BlockSparseAttention
    from dalle_ds.models.masks import build_mask

    kinds = ("row", "column", "conv")
    return max(BlockSparseAttention(build_mask(k, m.text_len, m.image_grid, m.conv_kernel), m.text_len,
                                    m.image_grid, transposed=(k == "column")).window for k in kinds)


def activation_bytes(m: ModelConfig, r: Regime) -> dict[str, float]:
    """Activations at the backward's peak, micro-batch ``r.micro_batch``: the residual stream saved at
    each layer's input (the prior checkpoints per layer, in the storage dtype: the branches cast back to
    it), one layer recomputed with its saves, the logits, and the heads' fp32 weight copies."""
    b, s, d, t, n, h = r.micro_batch, m.seq_len, m.d_model, m.text_len, m.image_len, m.n_heads
    a, bsd = r.branch, r.micro_batch * m.seq_len * m.d_model
    if r.attention == "sparse":
        w = _window(m)
        attn = b * h * (t * t + n * (t + w)) * a + 2 * b * n * d * (w // m.image_grid) * a  # probs + K,V windows
    elif r.attention == "dense":
        attn = b * h * s * s * a  # probabilities (SDPA's math path; the efficient kernel keeps less)
    else:
        attn = b * h * s * 4  # flex: log-sum-exp only
    # LN out, qkv, attention out (attn); LN out, fc out, GELU out (mlp): 14 bsd in the branch dtype,
    # plus the fp32 gradient of the residual stream coming in and going out
    layer = 14 * bsd * a + attn + 2 * bsd * 4
    out = {"residual checkpoints (per layer)": m.n_layers * bsd * r.storage if r.checkpointing else 0.0,
           "one layer recomputed (saves + dh)": layer * (1 if r.checkpointing else m.n_layers),
           "fp32 logits + grads, fp32 h for the heads": 2 * b * (t * m.text_vocab_size + n * m.image_vocab_size) * 4
           + bsd * 4,
           "heads' fp32 weight copies": (m.text_vocab_size + m.image_vocab_size) * d * 4 if r.storage != 4 else 0.0}
    return out


def largest_compressed_block(infos: list[ParamInfo], r: Regime) -> int:
    """Elements of the largest (rows, C) block PowerSGD compresses on any local rank (0 without PowerSGD)."""
    if r.powersgd is None:
        return 0
    g, best = r.node_size, 0
    for x in infos:
        if x.exact:
            continue
        n, part = x.numel, -(-x.numel // r.node_size)
        width = math.prod(x.shape[1:]) if len(x.shape) >= 2 else max(1, n)
        for local in range(g):
            valid = max(0, min(part, n - part * local))
            split = split_rows(part * local, valid, width) if valid else None
            if split and worth_compressing(split, r.powersgd.rank, 2 if r.powersgd.comm_dtype != "float32" else 4,
                                           r.powersgd.min_compression_numel):
                best = max(best, split.numel)
    return best


def buffer_bytes(m: ModelConfig, r: Regime) -> dict[str, float]:
    """DeepSpeed's and autocast's working buffers: gathered parameters (the live layer, capped by
    stage3_max_live_parameters, plus the prefetch bucket), fp16 autocast copies of one branch's weights,
    the ipg reduce bucket (+ a communication_data_type copy), the optimizer step's sub-group gradient copy."""
    d, layer = m.d_model, (4 + 2 * m.mlp_ratio) * m.d_model ** 2
    out = {"gathered params (live layer + prefetch)": (min(r.max_live, layer) + r.prefetch) * r.storage,
           "autocast 16-bit weight copies (one branch)": 2 * m.mlp_ratio * d * d * 2 if r.branch == 2 else 0.0,
           "ipg reduce bucket": r.reduce_bucket * (r.grad + r.comm_copy),
           "step: sub-group gradient copy": min(r.sub_group, layer) * (r.master or r.storage)}
    if r.powersgd is not None:  # one block alive at a time: M.float() for M Q / M^T P, or the staged E, E'
        out["PowerSGD fp32 working block (largest)"] = largest_compressed_block(param_infos(m), r) * FP32_BYTES
    return out


HOST = "host memory (pinned; not on the GPU)"


def gpu_total(parts: dict[str, dict[str, float]]) -> float:
    """Bytes on the GPU: every part of :func:`memory_plan` but the host part."""
    return sum(sum(items.values()) for name, items in parts.items() if name != HOST)


def memory_plan(cfg, ds_json: dict, nodes: int, gpus_per_node: int, node_size: int | None = None,
                local_rank: int | None = 0) -> tuple[Regime, dict[str, dict[str, float]]]:
    """(regime, {"model state": ..., "activations": ..., "buffers": ..., HOST: ...}) bytes per GPU (the
    HOST part: what the GPU's process keeps in host memory instead); ``local_rank`` None: the local rank
    with the most model state on the GPU (PowerSGD's error buffers differ by shard)."""
    r = regime_of(cfg, ds_json, nodes, gpus_per_node, node_size)
    infos = param_infos(cfg.model)
    if local_rank is None:
        def on_gpu(i: int) -> float:
            state = model_state_bytes(infos, r, i)
            return sum(state.values()) - state["errors_host"]
        local_rank = max(range(r.node_size), key=on_gpu)
    names = {"params": "parameter partitions", "persistent": "persistent small parameters (whole)",
             "master": "separate master partitions", "grads": "gradient partitions",
             "optimizer": "optimizer state (m, v; AdamW16: fp32 masters of the fp32 set)",
             "errors": "PowerSGD error buffers (fp32, GPU)", "q": "PowerSGD fixed Q"}
    state = model_state_bytes(infos, r, local_rank)
    host = {"PowerSGD error buffers (fp32, pinned host)": state.pop("errors_host")}
    state = {names[k]: v for k, v in state.items()}
    return r, {"model state": state, "activations": activation_bytes(cfg.model, r), "buffers": buffer_bytes(cfg.model, r),
               HOST: host}


def memory_lines(cfg, ds_json: dict, ds_name: str, nodes: int, gpus_per_node: int, gpu_memory: float,
                 reserve: float, node_size: int | None = None, margin: float = 0.05) -> tuple[list[str], bool]:
    """The per-GPU memory breakdown of the regime train.py runs, and FITS / DOES NOT FIT: the total plus
    ``reserve`` (CUDA context, NCCL, cuBLAS, what the GPU does not expose) plus a ``margin`` for the
    allocator's fragmentation must stay within ``gpu_memory``. Every local rank is planned; the largest shown."""
    r, worst = memory_plan(cfg, ds_json, nodes, gpus_per_node, node_size, local_rank=None)
    total = gpu_total(worst)
    need = total * (1 + margin) + reserve
    fits = need <= gpu_memory
    psgd = f"PowerSGD rank {r.powersgd.rank} across {r.num_nodes} nodes" if r.powersgd else "no PowerSGD"
    out = [f"regime: DeepSpeed JSON {ds_name} -> mode {r.mode}, {r.optimizer}; storage {r.storage} B, grads {r.grad} B, "
           f"separate master {r.master} B, optimizer {r.moments} B/elem (fp32 set {r.fp32set} B); ZeRO-3 over "
           f"{r.node_size} GPUs, {psgd}; attention {r.attention}, micro-batch {r.micro_batch}, checkpointing "
           f"{'per layer' if r.checkpointing else 'off'}",
           f"per-GPU memory (largest of the {r.node_size} local ranks):"]
    for part, items in worst.items():
        if part == HOST:
            continue
        out += [f"  {part}:"] + [f"    {k:<60} {v / GB:7.3f} GB" for k, v in items.items()]
        out.append(f"    {'= ' + part:<60} {sum(items.values()) / GB:7.3f} GB")
    out.append(f"  {'total on the GPU':<62} {total / GB:7.3f} GB; +{100 * margin:.0f}% fragmentation + {reserve / GB:.2f} GB "
               f"reserve = {need / GB:.2f} GB of {gpu_memory / GB:.2f} GB: "
               + ("FITS" if fits else f"DOES NOT FIT (short by {(need - gpu_memory) / GB:.2f} GB)"))
    host = sum(worst[HOST].values())
    out.append(f"  {HOST}: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in worst[HOST].items())
               + f"; {host * gpus_per_node / GB:.1f} GB per node of {gpus_per_node} GPUs")
    return out, fits


def parse_size(text: str) -> float:
    """'16GB' / '16GiB' / '80G' -> bytes; GPU memory 'GB' means GiB (a 16 GB V100 has 16 GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(G|GB|GiB|M|MB|MiB)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory={text!r}: expected a size like 16GB or 80GiB")
    unit = (match.group(2) or "GB").lower()
    return float(match.group(1)) * (GiB if unit.startswith("g") else 1024**2)


def report(cfg_path: str, nodes: int, gpus_per_node: int, gpu_memory: float, rank: int, node_size: int,
           micro_batch: int, grad_accum: int, ds_config: str, reserve: float, cfg=None) -> list[str]:
    cfg = cfg or load_config(cfg_path)
    m = cfg.model
    n = param_count(m)
    ds_path = _ds_config_path(ds_config)
    ds_json = _load_json(ds_path)
    out = [f"model {cfg_path}: {m.n_layers} layers, d {m.d_model}: {n:,} parameters "
           f"({n / 1e9:.2f}B); 16-bit parameters {2 * n / GB:.1f} GB",
           f"cluster: {nodes} nodes x {gpus_per_node} GPUs of {gpu_memory / GB:.2f} GB ({gpu_memory / GiB:.2f} GiB); "
           f"replicas across {nodes * gpus_per_node // node_size}; micro-batch {micro_batch}"]
    lines, _ = memory_lines(cfg, ds_json, ds_config, nodes, gpus_per_node, gpu_memory, reserve, node_size)
    out += lines
    k = nodes * gpus_per_node // node_size
    c = communication(m, node_size, k, rank, grad_accum)
    out += [f"communication per step and GPU (payload; ring wire bytes in brackets), PowerSGD rank {rank}:",
            f"  intra-node ZeRO-3 gathers + reduce-scatter: {c['intra_node_bytes'] / GB:8.2f} GB",
            f"  cross-node exact fp32 all-reduce:           {c['cross_node_exact_bytes'] / GB:8.3f} GB "
            f"[{c['cross_node_exact_wire_bytes'] / GB:.3f}]",
            f"  cross-node exact fp16 all-reduce:           {c['cross_node_exact_fp16_bytes'] / GB:8.3f} GB "
            f"[{c['cross_node_exact_fp16_wire_bytes'] / GB:.3f}]",
            f"  cross-node PowerSGD:                        {c['cross_node_powersgd_bytes'] / GB:8.3f} GB "
            f"[{c['cross_node_powersgd_wire_bytes'] / GB:.3f}]  compression {100 * c['compression_rate']:.1f}% "
            f"vs fp32, {100 * c['compression_rate_vs_fp16']:.1f}% vs fp16 "
            f"(per-GPU shards of 1/{node_size} of each matrix)",
            "paper Table 1 recomputed, one d x 4d matrix, 16-bit P,Q vs fp32 gradient, 1 - 5r/(8d):"]
    out += [f"  {name:>4} d={d} rank {r}: {100 * table1_compression(d, r):.1f}% (paper ~{100 * p:.0f}%)"
            for name, d, r, p in PAPER_TABLE1]
    return out


def run_plan(cfg, world_size: int, node_size: int, ds_json: dict | None = None, ds_name: str = "") -> list[str]:
    """The memory plan of one resolved config on ``world_size`` ranks in ZeRO-3 groups of ``node_size``
    (the trainers' ``--dry-run``): the regime, bytes per rank by item, and the total."""
    o = cfg.optim
    n = param_count(cfg.model)
    out = [f"plan: {n:,} parameters ({n / 1e9:.3f}B); {world_size} ranks, ZeRO-3 over {node_size}; "
           f"global batch {o.micro_batch_size} x {o.grad_accum_steps} x {world_size} = "
           f"{o.micro_batch_size * o.grad_accum_steps * world_size}"]
    if ds_json is not None:
        r, parts = memory_plan(cfg, ds_json, world_size // node_size, node_size, node_size)
        out.append(f"  regime {r.mode} ({ds_name}), {r.optimizer}; per-rank memory:")
        for name, items in parts.items():
            out += [f"  {k + (' [host]' if name == HOST else ''):<60} {v / GiB:8.3f} GiB" for k, v in items.items()]
        out.append(f"  {'total on the device':<60} {gpu_total(parts) / GiB:8.3f} GiB")
    return out


def _ds_config_path(name: str) -> str:
    from dalle_ds.cli_args import resolve_ds_config

    return resolve_ds_config(name)


def _load_json(path: str) -> dict:
    from dalle_ds.parallel.engine import load_ds_config

    return load_ds_config(path)


def main(argv: list[str] | None = None) -> int:
    from dalle_ds.cli_args import Parser

    ap = Parser(prog="python -m dalle_ds.plan", description=__doc__.split("\n\n")[0], config=True,
                default_preset=None)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-memory", default="16GB", help="e.g. 16GB (V100), 80GB (A100/H100)")
    ap.add_argument("--powersgd-rank", type=int, default=None, help="default: powersgd.rank of the config")
    ap.add_argument("--node-size", type=int, default=None, help="ZeRO-3 group size; default: gpus per node")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: optim.micro_batch_size")
    ap.add_argument("--ds-config", "--deepspeed-config", dest="ds_config", default=DEFAULT_DS_CONFIG,
                    help=f"the DeepSpeed JSON train.py gets (default {DEFAULT_DS_CONFIG}, slurm/train_prior.sh's)")
    ap.add_argument("--reserve", default="1GiB", help="per GPU: CUDA context, NCCL, cuBLAS workspace, and what "
                    "the GPU does not expose (a '16 GB' V100 exposes 15.78 GiB)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from dalle_ds.cli_args import print_config

        print_config(cfg)
        return 0
    node_size = args.node_size or args.gpus_per_node
    if args.micro_batch:  # the planned run's values, as overrides would set them
        cfg.optim.micro_batch_size = args.micro_batch
    if args.powersgd_rank:
        cfg.powersgd.rank = args.powersgd_rank
    for name, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node), ("--node-size", node_size)):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be >= 1")
    if (args.nodes * args.gpus_per_node) % node_size:
        raise ConfigError(f"--node-size={node_size}: must divide nodes x gpus per node = "
                          f"{args.nodes * args.gpus_per_node}")
    lines = report(args.config, args.nodes, args.gpus_per_node, parse_size(args.gpu_memory),
                   args.powersgd_rank or cfg.powersgd.rank, node_size,
                   args.micro_batch or cfg.optim.micro_batch_size, cfg.optim.grad_accum_steps, args.ds_config,
                   parse_size(args.reserve), cfg=cfg)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from dalle_ds.cli_args import run

    sys.exit(run(main))
