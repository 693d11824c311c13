"""Memory and communication planner for the prior under ZeRO-3-in-a-node + PowerSGD-across-nodes.

    python -m dalle_ds.plan --config dalle_ds/configs/paper.yaml --nodes 128 --gpus-per-node 8 \\
        --gpu-memory 16GB [--powersgd-rank 896] [--node-size 8] [--layout deepspeed|paper]

Memory per GPU (bytes; N parameters, g = ranks a parameter is sharded over, b = micro-batch):
  layout "deepspeed" (this project on DeepSpeed, fp16/bf16): fp16 params 2N/g, fp16 grads 2N/g,
      fp32 master 4N/g, fp32 Adam m and v 8N/g  (16 B/param); PowerSGD adds fp32 error buffers
      (4 B per compressed element / g) and its fixed Q matrices.
  layout "paper" (App. D/E): 16-bit params, 16-bit gradients accumulated in the error buffers and
      16-bit Adam moments (8 B/param); gains, biases, embeddings and unembeddings fp32 (16 B/param).
  activations, per-resblock checkpointing: the fp32 residual stream at the input of each of the 2L
      resblocks (2L x b x S x d x 4), plus one resblock recomputed at a time (the larger of the MLP
      hidden activations and dense attention scores, with gradients), plus fp32 logits and their
      gradients, plus the fp16 parameters of two gathered layers (ZeRO-3 prefetch).
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


def memory(m: ModelConfig, g: int, micro_batch: int, layout: str, rank: int | None) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring for the model)."""
    inv = inventory(m)
    n = param_count(m)
    n_exact = sum(x.numel for x in inv if x.exact)
    n_mat = n - n_exact
    if layout == "deepspeed":
        states = {"fp16 params": 2 * n / g, "fp16 grads": 2 * n / g, "fp32 master": 4 * n / g,
                  "fp32 Adam m+v": 8 * n / g}
    elif layout == "paper":
        states = {"params (16-bit; fp32 exact)": (2 * n_mat + 4 * n_exact) / g,
                  "grads in error buffers": (2 * n_mat + 4 * n_exact) / g,
                  "Adam m+v (16-bit; fp32 exact)": (4 * n_mat + 8 * n_exact) / g}
    else:
        raise ConfigError(f"layout={layout!r}: must be 'deepspeed' or 'paper'")
    if rank and layout == "deepspeed":
        q = sum(min(rank, w) * w * 4 for w in {x.cols for x in inv if not x.exact})  # one fixed Q per width
        states["PowerSGD error buffers + Q"] = 4 * n_mat / g + q
    b, s, d, a = micro_batch, m.seq_len, m.d_model, 2
    mlp = 4 * b * s * m.mlp_ratio * d * a
    attn = 2 * b * s * 3 * d * a + 2 * b * m.n_heads * s * s * a
    acts = {"checkpointed residual stream (fp32)": 2 * m.n_layers * b * s * d * 4,
            "one resblock recomputed": max(mlp, attn) + 4 * b * s * d * 4,
            "fp32 logits + grads": 2 * b * (m.text_len * m.text_vocab_size + m.image_len * m.image_vocab_size) * 4,
            "gathered fp16 params (2 layers)": 2 * (2 + 2 * m.mlp_ratio) * d * d * 2}
    return {**states, **acts}


def parse_size(text: str) -> float:
    """'16GB' / '16GiB' / '80G' -> bytes; GPU memory 'GB' means GiB (a 16 GB V100 has 16 GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(G|GB|GiB|M|MB|MiB)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-memory={text!r}: expected a size like 16GB or 80GiB")
    unit = (match.group(2) or "GB").lower()
    return float(match.group(1)) * (GiB if unit.startswith("g") else 1024**2)


def report(cfg_path: str, nodes: int, gpus_per_node: int, gpu_memory: float, rank: int, node_size: int,
           micro_batch: int, grad_accum: int, layout: str, reserve: float,
           model: ModelConfig | None = None) -> list[str]:
    m = model or load_config(cfg_path).model
    n = param_count(m)
    out = [f"model {cfg_path}: {m.n_layers} layers, d {m.d_model}: {n:,} parameters "
           f"({n / 1e9:.2f}B); fp16 parameters {2 * n / GB:.1f} GB ({2 * n / GiB:.1f} GiB)",
           f"cluster: {nodes} nodes x {gpus_per_node} GPUs of {gpu_memory / GiB:.0f} GiB; ZeRO-3 within "
           f"{node_size} GPUs, replicas across {nodes * gpus_per_node // node_size}; micro-batch {micro_batch}, "
           f"layout {layout}, {reserve / GiB:.1f} GiB reserved for the runtime"]
    for g in sorted({1, 2, 4, 8, node_size} & set(range(1, gpus_per_node + 1)) | {node_size}):
        parts = memory(m, g, micro_batch, layout, rank)
        total = sum(parts.values()) + reserve
        verdict = "fits" if total <= gpu_memory else "DOES NOT FIT"
        out.append(f"  sharded {g:>2} ways: {total / GiB:6.1f} GiB per GPU -> {verdict}")
        if g == node_size:
            chosen, chosen_total = parts, total
    out.append(f"per-GPU memory at node size {node_size}:")
    out += [f"  {k:<38} {v / GiB:8.2f} GiB" for k, v in chosen.items()]
    out.append(f"  {'total (+ reserve)':<38} {chosen_total / GiB:8.2f} GiB of {gpu_memory / GiB:.0f} GiB: "
               + ("fits" if chosen_total <= gpu_memory else
                  f"DOES NOT FIT (short by {(chosen_total - gpu_memory) / GiB:.1f} GiB)"))
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


def run_plan(cfg, world_size: int, node_size: int, layout: str = "deepspeed") -> list[str]:
    """The memory plan of one resolved config on ``world_size`` ranks in ZeRO-3 groups of ``node_size``
    (the trainers' ``--dry-run``): bytes per rank by component, and the total."""
    m, o = cfg.model, cfg.optim
    rank = cfg.powersgd.rank if cfg.powersgd.enabled else None
    parts = memory(m, node_size, o.micro_batch_size, layout, rank)
    n = param_count(m)
    out = [f"plan: {n:,} parameters ({n / 1e9:.3f}B); {world_size} ranks, ZeRO-3 over {node_size}; "
           f"global batch {o.micro_batch_size} x {o.grad_accum_steps} x {world_size} = "
           f"{o.micro_batch_size * o.grad_accum_steps * world_size}; per-rank memory ({layout} layout):"]
    out += [f"  {k:<38} {v / GiB:8.3f} GiB" for k, v in parts.items()]
    out.append(f"  {'total':<38} {sum(parts.values()) / GiB:8.3f} GiB")
    return out


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
    ap.add_argument("--layout", choices=["deepspeed", "paper"], default="paper",
                    help="optimizer-state layout (see the module docstring)")
    ap.add_argument("--reserve", default="0.5GiB", help="runtime reserve per GPU (CUDA context, fragmentation)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from dalle_ds.cli_args import print_config

        print_config(cfg)
        return 0
    node_size = args.node_size or args.gpus_per_node
    for name, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node), ("--node-size", node_size)):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be >= 1")
    if (args.nodes * args.gpus_per_node) % node_size:
        raise ConfigError(f"--node-size={node_size}: must divide nodes x gpus per node = "
                          f"{args.nodes * args.gpus_per_node}")
    lines = report(args.config, args.nodes, args.gpus_per_node, parse_size(args.gpu_memory),
                   args.powersgd_rank or cfg.powersgd.rank, node_size,
                   args.micro_batch or cfg.optim.micro_batch_size, cfg.optim.grad_accum_steps, args.layout,
                   parse_size(args.reserve), model=cfg.model)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from dalle_ds.cli_args import run

    sys.exit(run(main))
