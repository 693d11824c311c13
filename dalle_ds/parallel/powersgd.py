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
    P = allreduce16(M Q) / k           (16-bit payload, see below)
    P = householder_qr(P + eps I).Q    (fp32)
    Q' = allreduce16(M^T P) / k        (16-bit payload)
    G <- P Q'^T ;  E <- M - P Q'^T     (fp32; E is zeroed only if it became non-finite)

16-bit payload (#15). Gradients arrive unscaled (the block scales are divided out per rank), and a
12B run has k = 128 nodes: casting M Q / k to fp16 flushed per-element gradients of 1e-6 to zero
entirely (and lost 87% of a 1e-5 shard), which error feedback then absorbed silently. Now each factor
is multiplied by a power of two 2^s before the cast, with s from its max-abs agreed across nodes by
one MAX all-reduce of one fp32 scalar per factor, so that k payloads sum to at most half the fp16
maximum (:func:`comm_scale_log2`); the division by 2^s and by k happens after the cast back to fp32
(:func:`encode_factor`, :func:`decode_factor`). Power-of-two scaling is exact, so the result does not
depend on the gradient's magnitude: on a 496x3968 shard over 128 simulated nodes magnitudes 1e-8 ..
1e2 decompress within 0.2% of fp32 PowerSGD (tests/test_powersgd.py).
Shards that are exact (embeddings, unembeddings, gains, biases) or smaller than
``min_compression_numel`` are averaged exactly in fp32. A matrix block for which P and Q would not
cost fewer bytes than an fp16 exact all-reduce of it (:func:`worth_compressing`; e.g. the 12B
model's 496-row shards at rank 896, where r = 496 is full rank) is averaged exactly through the
same scaled 16-bit path as P and Q (no QR, no error feedback).

Where the error buffers live (``powersgd.error_buffer_device``, #14). The buffers are fp32 (rows, C)
blocks, one per compressed shard: 3.53 GB per GPU for the paper preset on 8 x 128 V100s, which with the
16-bit model state (12.5 GB), activations and DeepSpeed's buffers does not fit a 16 GB V100
(``python -m dalle_ds.plan``). Options weighed:
- ``gpu``: beside the gradient shards; no transfers. The default, and the choice when memory allows.
- 16-bit buffers on the GPU: 1.76 GB still leaves the paper preset 1.4 GB short, and rounding the
  residual to 8 mantissa bits (bf16) is exactly the information error feedback exists to keep.
- buffers doubling as the gradient accumulators (the paper's choice): the accumulators here are
  DeepSpeed's ZeRO-3 gradient partitions, which the averager does not own (they are reused per bucket
  and sized by DeepSpeed), so this would mean replacing DeepSpeed's gradient path.
- ``host`` (the paper preset's choice): fp32 buffers in host memory, pinned where CUDA exists (so copies
  are DMA, asynchronous to the Python thread), staged through the GPU one block at a time at the update:
  before the finiteness vote, each E is copied in and added to its gradient block (M = G + E in place,
  the staging copy freed at once); after P and Q' are known, E' = M - P Q'^T is formed in a fresh GPU
  block, reset there if non-finite, and copied back with ``non_blocking``. The GPU holds at most one
  bucket's worth of E' (plus one block of E) at a time. Costs: 4 bytes per compressed element each way
  per optimizer step over PCIe (2 x 3.53 GB for the paper, about 0.6 s at 12 GB/s of PCIe 3 x16),
  serialised on the compute stream, and 3.53 GB of pinned host memory per GPU (28 GB of a node's RAM).
  The arithmetic is the same as ``gpu``'s, operation for operation, so the results are identical bit
  for bit (tests/test_powersgd.py, on 2 gloo ranks). ``state_dict`` waits for pending copies.

Accounting (``stats()``): bytes of payload this rank all-reduces across nodes per optimizer step,
compressed (P, Q, exact pieces, one flag, the per-factor scale scalars) and uncompressed (every shard in fp32), and
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
from dalle_ds.parallel.dist import comm_device

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP32_BYTES = 4
FP16_BYTES = 2  # the baseline a compressed block must beat: an fp16 exact all-reduce of it


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
    """Compress only when P and Q cost fewer bytes than an fp16 exact all-reduce of the block (#15):
    e.g. the 12B model's 496-row shards at rank 896 (r = 496, full rank) are not compressed."""
    return (split.rows >= 1 and split.numel >= min_numel
            and compressed_bytes(split.rows, split.width, rank, comm_bytes) < split.numel * FP16_BYTES)


def orthogonalize(p: torch.Tensor, eps: float) -> torch.Tensor:
    """Householder QR of P + eps*I (P: (n, r), n >= r) -> orthonormal columns, fp32."""
    p = p.float().clone()
    p.diagonal().add_(eps)
    return torch.linalg.qr(p, mode="reduced").Q  # (n, r)


def to_comm(x: torch.Tensor, dtype: torch.dtype, parts: int = 1) -> torch.Tensor:
    """Cast to the communication dtype, clamping +-inf and overflow to +-max/parts (NaN stays NaN)."""
    limit = torch.finfo(dtype).max / parts
    return x.clamp(-limit, limit).to(dtype)


MAX_SCALE_LOG2 = 100  # 2^100 * the smallest fp32 normal is still far from fp32 overflow


def comm_scale_log2(maxabs: torch.Tensor, dtype: torch.dtype, num_nodes: int) -> torch.Tensor:
    """Power-of-two exponent s per factor so that the sum over ``num_nodes`` of values of magnitude
    <= ``maxabs`` (the MAX over nodes) times 2^s stays below half the dtype's max: the largest entry
    lands near max/(2k), so small entries keep their bits instead of flushing to zero in 16 bit.
    ``maxabs`` (n,) -> (n,) float64 exponents in [-MAX_SCALE_LOG2, MAX_SCALE_LOG2]; 0 where maxabs is 0."""
    m = maxabs.detach().to("cpu", torch.float64)
    limit = torch.finfo(dtype).max / (2.0 * num_nodes)  # one bit of headroom for rounding up
    s = torch.floor(torch.log2(limit / m.clamp_min(torch.finfo(torch.float64).tiny)))
    s = torch.where(m > 0, s, torch.zeros_like(s))
    return s.clamp(-MAX_SCALE_LOG2, MAX_SCALE_LOG2)


def encode_factor(f: torch.Tensor, scale_log2: float, dtype: torch.dtype, num_nodes: int) -> torch.Tensor:
    """fp32 factor -> the 16-bit payload this node adds to the all-reduce: f * 2^s, clamped so the
    sum over ``num_nodes`` stays finite (exact power-of-two scaling, no division by the node count)."""
    return to_comm(f.float() * (2.0 ** scale_log2), dtype, num_nodes)


def decode_factor(total: torch.Tensor, scale_log2: float, num_nodes: int) -> torch.Tensor:
    """The all-reduced 16-bit sum -> the fp32 mean over nodes: sum / 2^s / k, after the cast back."""
    return total.float().mul_(2.0 ** -scale_log2).div_(num_nodes)


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
        fp16 = last["uncompressed"] // FP32_BYTES * FP16_BYTES  # every shard as one fp16 exact all-reduce
        return {
            "steps": self.steps,
            "num_nodes": num_nodes,
            "cross_node_bytes_per_step": last["compressed"],
            "cross_node_bytes_uncompressed_per_step": last["uncompressed"],
            "cross_node_wire_bytes_per_step": wire_bytes(last["compressed"], num_nodes),
            "cross_node_bytes_fp16_exact_per_step": fp16,
            "compression_rate": rate,  # against the fp32 exact all-reduce
            "compression_rate_vs_fp32": rate,
            "compression_rate_vs_fp16": 1.0 - last["compressed"] / fp16 if fp16 else 0.0,
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

    def average_buckets_(self, buckets: list[list[Shard]]) -> bool:
        """Average every bucket of a step (no state: a non-finite gradient shows in the norm)."""
        for shards in buckets:
            self.average_(shards)
        return True

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


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, num_nodes: int,
                op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if num_nodes > 1:  # one node: the sum (or max) over nodes is the tensor itself
        assert t.device == comm_device(group), f"all-reduce of a {t.device} tensor, backend needs {comm_device(group)}"
        dist.all_reduce(t, op=op, group=group)


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
        self.errors_on_host = cfg.error_buffer_device == "host"
        # key -> (rows, C) fp32 error-feedback buffer: beside the gradients, or (pinned) host memory
        self.errors: dict[str, torch.Tensor] = {}
        self._copies_back: list[Any] = []  # CUDA events of pending non_blocking device -> host copies
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
        """The stored buffer of ``key`` (created zero, or moved where ``error_buffer_device`` puts it,
        e.g. after a load), in its storage place: beside ``like`` or in (pinned) host memory."""
        e = self.errors.get(key)
        if e is None or e.shape != like.shape:
            if e is not None:
                raise ValueError(f"powersgd error buffer {key!r} has shape {tuple(e.shape)}, the gradient "
                                 f"shard is {tuple(like.shape)}: the checkpoint was made with another "
                                 "model, node size or world size")
            e = self.errors[key] = self._placed(torch.zeros(like.shape, dtype=torch.float32), like.device)
        elif not self._is_placed(e, like.device):
            e = self.errors[key] = self._placed(e, like.device)
        return e

    def _is_placed(self, e: torch.Tensor, grad_device: torch.device) -> bool:
        if not self.errors_on_host:
            return e.device == grad_device
        return e.device.type == "cpu" and (e.is_pinned() or not torch.cuda.is_available())

    def _placed(self, e: torch.Tensor, grad_device: torch.device) -> torch.Tensor:
        """fp32 ``e`` where it is stored: the gradient's device, or host memory, pinned where CUDA
        exists (page-locked, so the per-step copies are DMA and ``non_blocking``)."""
        if not self.errors_on_host:
            return e.to(grad_device, torch.float32)
        host = torch.empty(e.shape, dtype=torch.float32, pin_memory=torch.cuda.is_available())
        return host.copy_(e)

    def _error_on_device(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """E of ``key`` on ``like``'s device for M = G + E: the buffer itself, or (host) a staging copy."""
        e = self._error(key, like)
        return e.to(like.device, non_blocking=True) if e.device != like.device else e

    def _store_error(self, key: str, new: torch.Tensor) -> None:
        """E' (computed on the gradient's device) into the buffer of ``key``: in place on the device, or
        copied back to host memory without waiting (``_settle`` waits before anyone reads it there)."""
        e = self.errors[key]
        if e is new:
            return
        e.copy_(new, non_blocking=e.is_pinned() if torch.cuda.is_available() else False)
        if new.is_cuda:
            event = torch.cuda.Event()
            event.record()
            self._copies_back.append(event)

    def _settle(self) -> None:
        """Wait for pending device -> host copies of the error buffers (before reading them on the host)."""
        for event in self._copies_back:
            event.synchronize()
        self._copies_back.clear()

    def state_dict(self) -> dict[str, Any]:
        """Error buffers and Qs as host copies (no second copy on the accelerator)."""
        self._settle()  # host error buffers may still be receiving this step's E'
        return {"mode": "powersgd", "rank": self.cfg.rank, "num_nodes": self.num_nodes,
                "errors": {k: v.detach().to("cpu", copy=True) for k, v in self.errors.items()},
                "qs": {k: v.detach().to("cpu", copy=True) for k, v in self.qs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Saved error buffers and Qs (read with ``map_location="cpu"``) into this averager: ``copy_`` into
        the buffers that exist, whatever their device and dtype; a buffer not allocated yet takes the
        saved tensor itself, which ``_error`` places (device or host memory) at its first use, so no
        second copy stays behind. The node count may differ from the saving run's
        (:meth:`dalle_ds.parallel.hierarchy.Hierarchy.checkpoint_state` saves the buffers' mean over
        nodes, which is all the averaged update depends on)."""
        if state.get("mode") != "powersgd":
            raise ValueError(f"cross-node averager state has mode={state.get('mode')!r}; this run uses "
                             "PowerSGD (powersgd.enabled=true): resume with the same powersgd.enabled")
        if state["rank"] != self.cfg.rank:
            raise ValueError(f"powersgd state has rank={state['rank']}, this run has powersgd.rank={self.cfg.rank}")
        from dalle_ds.parallel.dist import default_device

        self._settle()
        for mine, saved_all, what in ((self.errors, state["errors"], "error buffer"), (self.qs, state["qs"], "Q")):
            for key, saved in saved_all.items():
                buf = mine.get(key)
                if buf is None:  # Qs (C, r) are small and used where the gradients are, as _q makes them
                    mine[key] = saved.float() if what != "Q" else saved.to(default_device(), torch.float32)
                elif tuple(buf.shape) != tuple(saved.shape):
                    raise ValueError(f"powersgd {what} {key!r}: saved {tuple(saved.shape)}, this run's is "
                                     f"{tuple(buf.shape)}: saved with another model, node size or rank")
                else:
                    buf.copy_(saved)

    def end_step(self) -> None:
        self._stats.end_step()

    def stats(self) -> dict[str, Any]:
        return {"mode": "powersgd", "rank": self.cfg.rank, "comm_dtype": self.cfg.comm_dtype,
                "error_buffer_device": self.cfg.error_buffer_device,
                **self._stats.as_dict(self.num_nodes)}

    # ------------------------------------------------------------------ averaging
    def plan(self, shard: Shard) -> MatrixSplit | None:
        """The block of ``shard`` that is compressed, or None when the whole shard is exact."""
        split = split_rows(shard.offset, shard.flat.numel(), shard.row_width)
        if shard.exact or not worth_compressing(split, self.cfg.rank, self.comm_bytes,
                                                self.cfg.min_compression_numel):
            return None
        return split

    def average_(self, shards: list[Shard]) -> bool:
        """Average ``shards`` across nodes in place (one bucket, or a whole step); see
        :meth:`average_buckets_`."""
        return self.average_buckets_([shards])

    def average_buckets_(self, buckets: list[list[Shard]]) -> bool:
        """Average one optimizer step's gradient shards (all its buckets) across nodes in place.

        First one fp32 flag all-reduce over the whole step: if any node's M = G + E (or an exact
        piece) is non-finite, nothing is committed (error buffers and Q stay exactly as they were),
        every shard is filled with NaN and False is returned: the step must be skipped. Otherwise
        each bucket is averaged (exact pieces in fp32, blocks by PowerSGD) and True is returned.
        Callers that may skip the step for other reasons (fp16 overflow, a skip vote) call this only
        after that decision (:class:`dalle_ds.parallel.hierarchy.Hierarchy` does), so a skipped step
        never touches the error buffers."""
        k = self.num_nodes
        plans = [self._split_bucket(shards) for shards in buckets]
        bad = 0.0
        for shards, (_, blocks, _) in zip(buckets, plans):
            for key, m in blocks:  # M = G + E in place in the grad buffer (dropped if the step skips)
                m.add_(self._error_on_device(key, m))  # host buffers: one block staged, freed at once
            bad += float(not all(bool(torch.isfinite(s.flat).all()) for s in shards))
        flag = torch.tensor([bad], device=comm_device(self.group))  # NCCL: CUDA
        _all_reduce(flag, self.group, k)
        self._stats.add(compressed=FP32_BYTES)
        if flag.item() > 0:  # some replica is non-finite: everyone skips, E and Q untouched
            for shards in buckets:
                for s in shards:
                    s.flat.fill_(float("nan"))
            self._stats.skipped += 1
            self._stats.current = {key: 0 for key in self._stats.current}  # nothing was averaged
            return False
        for shards, (exact, blocks, dense) in zip(buckets, plans):
            self._average_bucket(shards, exact, blocks, dense)
        return True

    def _split_bucket(self, shards: list[Shard]) -> tuple[list[torch.Tensor], list[tuple[str, torch.Tensor]],
                                                          list[torch.Tensor]]:
        """(fp32 exact pieces, [(key, (rows, C) view to compress)], [(rows, C) views sent exactly in 16 bit])
        of one bucket: matrix blocks where rank r would not beat an fp16 exact all-reduce take the
        scaled 16-bit exact path; the fp32 set, head/tail pieces and small shards stay fp32."""
        exact: list[torch.Tensor] = []
        blocks: list[tuple[str, torch.Tensor]] = []
        dense: list[torch.Tensor] = []
        for s in shards:
            split = split_rows(s.offset, s.flat.numel(), s.row_width)
            if s.exact or split.rows < 1 or split.numel < self.cfg.min_compression_numel:
                exact.append(s.flat)
                continue
            exact += [s.flat[:split.head], s.flat[split.head + split.numel:]]
            view = s.flat[split.head:split.head + split.numel].view(split.rows, split.width)
            if self.plan(s) is None:
                dense.append(view)
            else:
                blocks.append((s.key, view))
        return [t for t in exact if t.numel()], blocks, dense

    def _average_bucket(self, shards: list[Shard], exact: list[torch.Tensor],
                        blocks: list[tuple[str, torch.Tensor]], dense: list[torch.Tensor]) -> None:
        k, eps = self.num_nodes, self.cfg.orthogonalization_eps
        total = sum(s.flat.numel() for s in shards)
        sent = 0
        if exact:
            ex = torch.cat([t.float() for t in exact]).div_(k)  # (n_exact,) fp32
            _all_reduce(ex, self.group, k)
            _scatter_back(ex, exact)
            sent += ex.numel() * FP32_BYTES
        for m, mean in zip(dense, self._allreduce_factors([m.float() for m in dense])):  # exact, 16 bit
            m.copy_(mean)
            sent += m.numel() * self.comm_bytes
        # P = mean_nodes(M Q), all-reduced in 16 bit, then orthogonalised in fp32.
        qs = [self._q(key, m.shape[1], effective_rank(self.cfg.rank, *m.shape), m.device) for key, m in blocks]
        ps = self._allreduce_factors([m.float() @ q for (_, m), q in zip(blocks, qs)])  # [(rows, r)]
        ps = [orthogonalize(p, eps) for p in ps]
        # Q' = mean_nodes(M^T P), all-reduced in 16 bit.
        new_qs = self._allreduce_factors([m.float().t() @ p for (_, m), p in zip(blocks, ps)])  # [(C, r)]
        for (key, m), p, q in zip(blocks, ps, new_qs):
            stored = self.errors[key]  # host buffers: E' is formed on the device, then copied back
            e = torch.empty(m.shape, dtype=torch.float32, device=m.device) if self.errors_on_host else stored
            e.copy_(m).addmm_(p, q.t(), alpha=-1.0)  # E = M - P Q'^T
            m.copy_(p @ q.t())  # (rows, C) decompressed in fp32
            if not bool(torch.isfinite(e).all()):
                e.zero_()  # contaminated: the only case where the error buffer is reset
                self._stats.error_resets += 1
            self._store_error(key, e)
            if self.cfg.warm_start:
                self.qs[key] = q
            sent += (p.numel() + q.numel()) * self.comm_bytes
        self._stats.add(compressed=sent, uncompressed=total * FP32_BYTES,
                        compressed_numel=sum(m.numel() for _, m in blocks),
                        exact_numel=sum(t.numel() for t in exact) + sum(m.numel() for m in dense))

    def _allreduce_factors(self, factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average fp32 factors over nodes through one all-reduce in the 16-bit comm dtype.

        Each factor is scaled by a power of two before the cast (:func:`comm_scale_log2`, from its
        max-abs agreed across nodes by one MAX all-reduce of one scalar per factor) and the division
        by the node count happens after the cast back, so small gradients keep their bits."""
        if not factors:
            return []
        k = self.num_nodes
        if self.comm_dtype == torch.float32:
            scales = [0.0] * len(factors)
        else:
            maxabs = torch.stack([f.detach().abs().amax().float() for f in factors])  # (n,)
            _all_reduce(maxabs, self.group, k, op=dist.ReduceOp.MAX)
            scales = comm_scale_log2(maxabs, self.comm_dtype, k).tolist()
            self._stats.add(compressed=maxabs.numel() * FP32_BYTES)
        flat = torch.cat([encode_factor(f.reshape(-1), s, self.comm_dtype, k) for f, s in zip(factors, scales)])
        _all_reduce(flat, self.group, k)
        out, pos = [], 0
        for f, s in zip(factors, scales):
            out.append(decode_factor(flat[pos:pos + f.numel()], s, k).view(f.shape))
            pos += f.numel()
        return out


def build_averager(cfg: PowerSGDConfig, group: dist.ProcessGroup | None, num_nodes: int,
                   seed: int = 0) -> ExactAverager | PowerSGD:
    """PowerSGD when ``cfg.enabled`` and there is more than one node; with one node nothing crosses
    nodes, so compressing would only lose information: exact (a no-op) with one warning line."""
    if cfg.enabled and num_nodes == 1:
        from dalle_ds.parallel.dist import print0

        print0("powersgd: WARNING powersgd.enabled with 1 node: no gradient crosses nodes, compression off")
        return ExactAverager(group, num_nodes)
    return PowerSGD(cfg, group, num_nodes, seed) if cfg.enabled else ExactAverager(group, num_nodes)
