"""Cross-node averaging of gradient shards: exact (fp32 all-reduce) or rank-r PowerSGD (paper App. E).

Each rank holds, after the intra-node reduce-scatter, one flat shard per parameter (ZeRO-3).
The ranks holding the same shard on the other nodes (the ``cross`` group) average it:

- ``ExactAverager``: one fp32 all-reduce of all shards of a bucket (``powersgd.enabled=false``).
- ``PowerSGD``: each shard is viewed as a matrix and compressed to rank r.

How a flat shard becomes a matrix. A parameter of shape (d0, d1, ...) is a (d0, C) matrix with
C = d1*d2*... (an nn.Linear weight (out, in) keeps its rows). A shard covers the flat range
[offset, offset + L) of that matrix, which need not start or end on a row boundary, so it is split
into ``head`` (the end of a partial first row), ``rows`` full rows viewed in place as a (rows, C)
matrix, and ``tail`` (the start of a partial last row). Only the (rows, C) block is compressed; head
and tail (< C elements each) go with the exact pieces. Keeping the parameter's own row width keeps
the low-rank structure of the gradient (a reshape to another width would cut rows apart).

PowerSGD step for a block, with k nodes, error buffer E, gradient G, fixed Gaussian Q (C, r):
    M = G + E                          (gradients accumulate into the error feedback)
    P = allreduce(M Q / k)             (16-bit, clamped so the sum stays finite)
    P = householder_qr(P + eps I).Q    (fp32)
    Q' = allreduce(M^T P / k)          (16-bit, clamped)
    G <- P Q'^T ;  E <- M - P Q'^T     (fp32; E is zeroed only if it became non-finite)
Shards that are exact (embeddings, unembeddings, gains, biases), smaller than
``min_compression_numel``, or for which rank r would not save bytes are averaged exactly in fp32.

Accounting (``stats()``): bytes of payload this rank all-reduces across nodes per optimizer step,
compressed (P, Q, exact pieces, one flag) and uncompressed (every shard in fp32), and
compression_rate = 1 - compressed / uncompressed. A ring all-reduce over k nodes puts
2 (k - 1) / k times the payload on the wire; ``wire_bytes`` applies that factor.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dalle_ds.config import PowerSGDConfig

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP32_BYTES = 4


@dataclass
class Shard:
    """One rank's gradient shard of one parameter (a 1-D view into DeepSpeed's grad buffer)."""

    key: str  # stable name (the parameter's name): keys the error buffer and Q in checkpoints
    flat: torch.Tensor  # (L,) this rank's slice of the flattened gradient; averaged in place
    offset: int  # position of flat[0] in the flattened parameter
    row_width: int  # C: elements per row of the parameter viewed as (d0, C)
    exact: bool = False  # never compress (embeddings, unembeddings, gains, biases)


@dataclass(frozen=True)
class MatrixSplit:
    head: int  # elements before the first full row
    rows: int  # full rows of width C viewed as a matrix
    width: int  # C
    tail: int  # elements after the last full row

    @property
    def numel(self) -> int:
        return self.rows * self.width


def split_rows(offset: int, length: int, row_width: int) -> MatrixSplit:
    """Split the flat range [offset, offset+length) of a (., row_width) matrix into head | rows | tail."""
    head = min((-offset) % row_width, length)
    rows = (length - head) // row_width
    return MatrixSplit(head, rows, row_width, length - head - rows * row_width)


def effective_rank(rank: int, rows: int, cols: int) -> int:
    return max(0, min(rank, rows, cols))


def compressed_bytes(rows: int, cols: int, rank: int, comm_bytes: int) -> int:
    """Bytes of P (rows, r) and Q (cols, r) in the communication dtype."""
    return effective_rank(rank, rows, cols) * (rows + cols) * comm_bytes


def worth_compressing(split: MatrixSplit, rank: int, comm_bytes: int, min_numel: int) -> bool:
    return (split.rows >= 1 and split.numel >= min_numel
            and compressed_bytes(split.rows, split.width, rank, comm_bytes) < split.numel * FP32_BYTES)


def orthogonalize(p: torch.Tensor, eps: float) -> torch.Tensor:
    """Householder QR of P + eps*I (P: (n, r), n >= r) -> orthonormal columns, fp32."""
    p = p.float().clone()
    p.diagonal().add_(eps)
    return torch.linalg.qr(p, mode="reduced").Q  # (n, r)


def to_comm(x: torch.Tensor, dtype: torch.dtype, parts: int = 1) -> torch.Tensor:
    """Cast to the communication dtype, clamping +-inf and overflow to +-max/parts (NaN stays NaN)."""
    limit = torch.finfo(dtype).max / parts
    return x.clamp(-limit, limit).to(dtype)


def wire_bytes(payload_bytes: float, num_nodes: int) -> float:
    """Bytes each rank sends for a ring all-reduce of ``payload_bytes`` over ``num_nodes``."""
    return 2.0 * (num_nodes - 1) / num_nodes * payload_bytes if num_nodes > 1 else 0.0


class _StepStats:
    def __init__(self) -> None:
        self.steps = 0
        self.current = {"compressed": 0, "uncompressed": 0, "compressed_numel": 0, "exact_numel": 0}
        self.last = dict(self.current)
        self.total = dict(self.current)
        self.skipped = 0
        self.error_resets = 0

    def add(self, **kv: int) -> None:
        for k, v in kv.items():
            self.current[k] += v

    def end_step(self) -> None:
        if self.current["uncompressed"] == 0:
            return  # no boundary since the last step (e.g. a step with nothing to average)
        self.steps += 1
        self.last = self.current
        for k, v in self.current.items():
            self.total[k] += v
        self.current = {k: 0 for k in self.current}

    def as_dict(self, num_nodes: int) -> dict[str, Any]:
        last = self.last
        rate = 1.0 - last["compressed"] / last["uncompressed"] if last["uncompressed"] else 0.0
        return {
            "steps": self.steps,
            "num_nodes": num_nodes,
            "cross_node_bytes_per_step": last["compressed"],
            "cross_node_bytes_uncompressed_per_step": last["uncompressed"],
            "cross_node_wire_bytes_per_step": wire_bytes(last["compressed"], num_nodes),
            "compression_rate": rate,
            "compressed_numel_per_step": last["compressed_numel"],
            "exact_numel_per_step": last["exact_numel"],
            "cross_node_bytes_total": self.total["compressed"],
            "cross_node_bytes_uncompressed_total": self.total["uncompressed"],
            "skipped_nonfinite": self.skipped,
            "error_buffer_resets": self.error_resets,
        }


class ExactAverager:
    """``powersgd.enabled=false``: average every shard across nodes with one fp32 all-reduce."""

    def __init__(self, group: dist.ProcessGroup | None, num_nodes: int):
        self.group, self.num_nodes = group, num_nodes
        self._stats = _StepStats()

    def average_(self, shards: list[Shard]) -> None:
        pieces = [s.flat for s in shards if s.flat.numel()]
        if not pieces:
            return
        buf = torch.cat([p.float() for p in pieces]).div_(self.num_nodes)  # (sum L,) fp32
        _all_reduce(buf, self.group, self.num_nodes)
        _scatter_back(buf, pieces)
        nbytes = buf.numel() * FP32_BYTES
        self._stats.add(compressed=nbytes, uncompressed=nbytes, exact_numel=buf.numel())

    def end_step(self) -> None:
        self._stats.end_step()

    def stats(self) -> dict[str, Any]:
        return {"mode": "exact", **self._stats.as_dict(self.num_nodes)}

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "exact"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != "exact":
            raise ValueError(f"cross-node averager state has mode={state.get('mode')!r}, this run averages "
                             "exactly (powersgd.enabled=false): resume with the same powersgd.enabled")


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, num_nodes: int) -> None:
    if num_nodes > 1:  # one node: the sum over nodes is the tensor itself
        dist.all_reduce(t, group=group)


def _scatter_back(buf: torch.Tensor, pieces: list[torch.Tensor]) -> None:
    pos = 0
    for p in pieces:
        p.copy_(buf[pos:pos + p.numel()].view_as(p))
        pos += p.numel()


class PowerSGD:
    """Rank-r PowerSGD with error feedback across the ``group`` of ``num_nodes`` replicas."""

    def __init__(self, cfg: PowerSGDConfig, group: dist.ProcessGroup | None, num_nodes: int, seed: int = 0):
        self.cfg, self.group, self.num_nodes, self.seed = cfg, group, num_nodes, seed
        self.comm_dtype = _DTYPES[cfg.comm_dtype]
        self.comm_bytes = torch.finfo(self.comm_dtype).bits // 8
        self.errors: dict[str, torch.Tensor] = {}  # key -> (rows, C) fp32 error-feedback buffer
        self.qs: dict[str, torch.Tensor] = {}  # "fixed:CxR" (or the shard key with warm_start) -> (C, r) fp32
        self._stats = _StepStats()

    # ------------------------------------------------------------------ state
    def _q(self, key: str, cols: int, r: int, device: torch.device) -> torch.Tensor:
        """The fixed Gaussian Q (cols, r): one per width, shared by all shards of that width
        (a 12B model needs two, not one per matrix); with warm_start, one per shard, evolving."""
        key = key if self.cfg.warm_start else f"fixed:{cols}x{r}"
        q = self.qs.get(key)
        if q is None or q.shape != (cols, r):
            # Same seed on every node -> the same Gaussian Q everywhere without communication.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            q = self.qs[key] = torch.randn(cols, r, generator=gen).to(device)
        return q

    def _error(self, key: str, like: torch.Tensor) -> torch.Tensor:
        e = self.errors.get(key)
        if e is None or e.shape != like.shape:
            if e is not None:
                raise ValueError(f"powersgd error buffer {key!r} has shape {tuple(e.shape)}, the gradient "
                                 f"shard is {tuple(like.shape)}: the checkpoint was made with another "
                                 "model, node size or world size")
            e = self.errors[key] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return e

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "powersgd", "rank": self.cfg.rank, "num_nodes": self.num_nodes,
                "errors": {k: v.clone() for k, v in self.errors.items()},
                "qs": {k: v.clone() for k, v in self.qs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != "powersgd":
            raise ValueError(f"cross-node averager state has mode={state.get('mode')!r}; this run uses "
                             "PowerSGD (powersgd.enabled=true): resume with the same powersgd.enabled")
        for name in ("rank", "num_nodes"):
            mine = self.cfg.rank if name == "rank" else self.num_nodes
            if state[name] != mine:
                raise ValueError(f"powersgd state has {name}={state[name]}, this run has {name}={mine}")
        self.errors = {k: v.float().clone() for k, v in state["errors"].items()}
        self.qs = {k: v.float().clone() for k, v in state["qs"].items()}

    def end_step(self) -> None:
        self._stats.end_step()

    def stats(self) -> dict[str, Any]:
        return {"mode": "powersgd", "rank": self.cfg.rank, "comm_dtype": self.cfg.comm_dtype,
                **self._stats.as_dict(self.num_nodes)}

    # ------------------------------------------------------------------ averaging
    def plan(self, shard: Shard) -> MatrixSplit | None:
        """The block of ``shard`` that is compressed, or None when the whole shard is exact."""
        split = split_rows(shard.offset, shard.flat.numel(), shard.row_width)
        if shard.exact or not worth_compressing(split, self.cfg.rank, self.comm_bytes,
                                                self.cfg.min_compression_numel):
            return None
        return split

    def average_(self, shards: list[Shard]) -> None:
        """Average ``shards`` across nodes in place (called once per bucket at the accumulation boundary)."""
        k, eps = self.num_nodes, self.cfg.orthogonalization_eps
        exact: list[torch.Tensor] = []
        blocks: list[tuple[str, torch.Tensor]] = []  # (key, (rows, C) view into the grad buffer)
        for s in shards:
            split = self.plan(s)
            if split is None:
                exact.append(s.flat)
                continue
            exact += [s.flat[:split.head], s.flat[split.head + split.numel:]]
            blocks.append((s.key, s.flat[split.head:split.head + split.numel].view(split.rows, split.width)))
        exact = [t for t in exact if t.numel()]
        total = sum(s.flat.numel() for s in shards)

        # M = G + E in place in the grad buffer; one flag counts replicas with non-finite M.
        bad = 0.0
        for key, m in blocks:
            m.add_(self._error(key, m))
            bad += float(not bool(torch.isfinite(m).all()))
        ex = torch.cat([t.float() for t in exact] + [torch.zeros(1)]).div_(k)  # (n_exact + 1,)
        ex[-1] = bad
        _all_reduce(ex, self.group, k)
        _scatter_back(ex, exact)
        sent = ex.numel() * FP32_BYTES
        if ex[-1].item() > 0:  # some replica overflowed: everyone skips, the step is non-finite
            for _, m in blocks:  # E is left as it was; G is dropped like any skipped step
                m.fill_(float("nan"))
            self._stats.skipped += 1
            self._stats.add(compressed=sent, uncompressed=total * FP32_BYTES, exact_numel=ex.numel() - 1)
            return

        # P = mean_nodes(M Q), all-reduced in 16 bit, then orthogonalised in fp32.
        qs = [self._q(key, m.shape[1], effective_rank(self.cfg.rank, *m.shape), m.device) for key, m in blocks]
        ps = self._allreduce_factors([m.float() @ q for (_, m), q in zip(blocks, qs)])  # [(rows, r)]
        ps = [orthogonalize(p, eps) for p in ps]
        # Q' = mean_nodes(M^T P), all-reduced in 16 bit.
        new_qs = self._allreduce_factors([m.float().t() @ p for (_, m), p in zip(blocks, ps)])  # [(C, r)]
        for (key, m), p, q in zip(blocks, ps, new_qs):
            e = self.errors[key]
            e.copy_(m).addmm_(p, q.t(), alpha=-1.0)  # E = M - P Q'^T
            m.copy_(p @ q.t())  # (rows, C) decompressed in fp32
            if not bool(torch.isfinite(e).all()):
                e.zero_()  # contaminated: the only case where the error buffer is reset
                self._stats.error_resets += 1
            if self.cfg.warm_start:
                self.qs[key] = q
            sent += (p.numel() + q.numel()) * self.comm_bytes
        self._stats.add(compressed=sent, uncompressed=total * FP32_BYTES,
                        compressed_numel=sum(m.numel() for _, m in blocks), exact_numel=ex.numel() - 1)

    def _allreduce_factors(self, factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average fp32 factors over nodes through one all-reduce in the 16-bit comm dtype."""
        if not factors:
            return []
        k = self.num_nodes
        flat = torch.cat([to_comm(f.reshape(-1) / k, self.comm_dtype, k) for f in factors])
        _all_reduce(flat, self.group, k)
        out, pos = [], 0
        for f in factors:
            out.append(flat[pos:pos + f.numel()].view(f.shape).float())
            pos += f.numel()
        return out


def build_averager(cfg: PowerSGDConfig, group: dist.ProcessGroup | None, num_nodes: int,
                   seed: int = 0) -> ExactAverager | PowerSGD:
    return PowerSGD(cfg, group, num_nodes, seed) if cfg.enabled else ExactAverager(group, num_nodes)
