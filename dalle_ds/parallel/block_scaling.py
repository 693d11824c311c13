"""fp16 with per-resblock gradient scaling (paper §2.4, App. D), as a layer around the prior's branches.

The prior computes every residual add as ``h = h + self.branch_fn(branch, h, idx)`` (idx = 2*layer
for attention, 2*layer+1 for the MLP). :func:`attach` installs :class:`BlockScaler`'s branch
function, which runs the branch in fp16 while the residual stream ``h`` and its gradient stay fp32:

    forward:   h (fp32) ─ _Enter ─► branch under autocast(fp16) ─► _Exit ─► y (fp32) ─► h + y
    backward:  dy (fp32) × scale[idx] → fp16 backward through the branch → dx:
               Inf/NaN in dx zeroed ("filter") and flagged → dx ÷ scale[idx] → joins the fp32 path.
               Parameter gradients of the branch leave the fp16 ops as fp32 (autocast's cast back)
               and a tensor hook on each parameter filters, flags and divides them by the same scale
               *before* they are accumulated, so DeepSpeed only ever sees unscaled, finite fp32 grads.

Wiring (dalle_ds/train.py; ``eng`` is a :class:`dalle_ds.parallel.engine.Engine`)::

    mode, ds_config = precision.resolve_ds_config(engine.load_ds_config(path), cfg.precision)
    eng = build_engine(factory, ds_config, spec, ...)
    if mode == "fp16_block":
        scaler = precision.attach(eng.model, cfg.precision, data_parallel_size=world_size)
        precision.install(eng, scaler)   # before_step: skip vote = scaler.check_overflow()
                                         # after_step:  scaler.update()
    ...  # log scaler.stats() to TensorBoard; save scaler.state_dict() in the project checkpoint state

Without the engine the same three calls are: ``skip = scaler.check_overflow()`` after the last
backward of the accumulation (flags all-reduced with MAX across ranks), skip or apply the optimizer
step, then ``scaler.update()`` (the paper's rule per scale; clears the flags).

Choice of DeepSpeed mode (documented because it differs from the paper's memory layout).
DeepSpeed's fp16 mode casts the *whole* module to half: gains, biases and embeddings would then be
fp16 parameters with fp16 gradients, and with DeepSpeed's scale fixed at 1 the small fp32-path
gradients of embeddings/unembeddings underflow when cast to fp16. Unscaling branch gradients inside
ZeRO-3's flat fp32 partitions would also mean reaching into its internals. So under
``fp16`` + ``precision.block_scaling`` DeepSpeed runs in **fp32 mode** (fp32 parameters, gradients
and Adam moments, all ZeRO-3 partitioned) and the fp16 compute happens inside the branches
(autocast casts the gathered fp32 weights to fp16 per use). :func:`resolve_ds_config` turns the
declared ``"fp16": {"enabled": true, "loss_scale": 1.0}`` of ``ds_configs/zero3_fp16_v100.json``
into that DeepSpeed config. Consequences:
- gains, biases, embeddings, unembeddings, logits: fp32 parameters, gradients and optimizer state
  (the paper's requirement), without any special casing;
- model-state memory per parameter, partitioned over the ZeRO group: 4 (param) + 4 (grad) + 8 (Adam)
  = 16 bytes, the same as DeepSpeed fp16 (2 + 2 + 4 master + 8 Adam). The paper kept parameters and
  Adam moments in fp16 (about 8 bytes): for the 12B model on 8 × 16 GB V100s per node that is
  12 GB vs 24 GB per GPU, so at that scale add ZeRO optimizer offload (``offload_optimizer``),
  which leaves 8 bytes/param on the GPU;
- ZeRO-3 all-gathers and reduce-scatters move fp32 (2× the bytes of fp16) inside the node;
  the transient fp16 weight copies of one branch live only during its forward/backward;
- branch activations saved for backward are fp16, the residual stream's fp32 (as in the paper).
Forward overflow (an Inf in a branch output) is not something a gradient scale can fix; it shows up as
a non-finite loss and every branch flags, so the step is skipped and all scales back off.

Initial scale and clamps: what each rank actually scales (#15). The paper starts every scale at
M·2^13 and clamps it to [M·2^7, M·2^24], M = data-parallel GPUs: each of its GPUs backpropagated
its local mean loss divided by M (the gradients were then *summed* across GPUs), so the gradient
entering a branch on one GPU was (1/M)·∂ℓ_local/∂y, and the scaled value the fp16 branch saw was

    S_paper · (1/M) · ∂ℓ_local/∂y = 2^13 · ∂ℓ_local/∂y          (at the initial scale).

Here each rank backpropagates its local mean loss divided by A, the gradient-accumulation steps
(DeepSpeed's ``backward`` scales by 1/A; the ranks are *averaged* afterwards, with the unscaled
gradients), so the gradient entering a branch is (1/A)·∂ℓ_local/∂y, whatever M is. The same scaled
value, 2^13·∂ℓ_local/∂y, needs S·(1/A) = 2^13, i.e.

    S_0 = A·2^13,   S ∈ [A·2^7, A·2^24]   (``precision.init/min/max_scale_log2`` + log2 A).

M does not appear. The pre-#15 rule, M·2^13 with this per-rank mean, started a 1024-rank run at 2^23
with a floor of 2^17, above fp16's 2^16 maximum: almost every branch overflowed and the hysteresis
let each scale back off one √2 per 125 updates, so the run skipped hundreds of steps before the
first update. ``data_parallel_size`` is still accepted (logged, checkpointed) but moves no scale;
:func:`install` reads A from the engine. A checkpoint of the old format (scales offset by log2 M)
is shifted back on load.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Literal

import torch
import torch.distributed as torch_dist

from dalle_ds.config import ConfigError, PrecisionConfig
from dalle_ds.models.prior import _default_branch_fn
from dalle_ds.parallel import deepspeed_internals as ds_internals
from dalle_ds.parallel.dist import comm_device, print0, to_comm

Mode = Literal["fp16_block", "fp16", "bf16", "fp32"]


def branch_name(idx: int) -> str:
    """``0 -> attn00``, ``1 -> mlp00``, ``2 -> attn01`` ..."""
    return f"{'attn' if idx % 2 == 0 else 'mlp'}{idx // 2:02d}"


class BlockScaler:
    """One gradient scale per residual branch, with the paper's update rule.

    Scales are kept as log2 values (fp64): growth by 2**(1/1000) per update is an addition, no drift.
    ``updates`` counts calls to :meth:`update` (applied and skipped steps alike); the 125-update
    hysteresis is measured in those. A branch whose own gradients were finite grows even when another
    branch's overflow skips the step (the paper's rule is per block).
    """

    def __init__(self, n_branches: int, cfg: PrecisionConfig, data_parallel_size: int = 1,
                 group: Any = None, grad_accum_steps: int = 1):
        if n_branches < 1:
            raise ValueError(f"n_branches={n_branches}: must be >= 1")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size={data_parallel_size}: must be >= 1")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={grad_accum_steps}: must be >= 1")
        self.cfg = cfg
        self.n_branches = n_branches
        self.data_parallel_size = data_parallel_size  # informational: the scales do not depend on it
        self.grad_accum_steps = grad_accum_steps
        self.group = group  # process group for agreeing on overflow flags (None: WORLD)
        a = math.log2(grad_accum_steps)  # S = A * 2^k (module docstring)
        self.min_log2, self.max_log2 = a + cfg.min_scale_log2, a + cfg.max_scale_log2
        self.log2_scale = torch.full((n_branches,), a + cfg.init_scale_log2, dtype=torch.float64)
        self.last_decrease = torch.full((n_branches,), -(10**9), dtype=torch.int64)
        self.overflow_counts = torch.zeros(n_branches, dtype=torch.int64)
        self.updates = 0
        self.skipped = 0
        self._clear_flags()
        self._refresh()

    def _clear_flags(self) -> None:
        self._flags: torch.Tensor | None = None  # (n_branches,) float, on the gradients' device
        self._last_flags = torch.zeros(self.n_branches, dtype=torch.bool)
        self._checked = False

    # ------------------------------------------------------------------ scales
    def _refresh(self) -> None:
        self.scales: list[float] = [2.0 ** float(v) for v in self.log2_scale]

    def scale(self, idx: int) -> float:
        return self.scales[idx]

    # ------------------------------------------------------------------ flags
    def flag(self, idx: int, nonfinite: torch.Tensor) -> None:
        """Record (without a host sync) whether branch ``idx`` saw a non-finite gradient."""
        if self._flags is None or self._flags.device != nonfinite.device:
            self._flags = torch.zeros(self.n_branches, dtype=torch.float32, device=nonfinite.device)
        self._flags[idx] = torch.maximum(self._flags[idx], nonfinite.to(torch.float32))

    def filter_and_unscale(self, idx: int, grad: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zero Inf/NaN in ``grad`` (flagging branch ``idx``), then divide by the branch's scale."""
        grad = grad.to(out_dtype or grad.dtype)
        finite = torch.isfinite(grad)
        self.flag(idx, ~finite.all())
        return torch.where(finite, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)) / self.scales[idx]

    def check_overflow(self) -> bool:
        """At the accumulation boundary: agree on the flags across ranks (all-reduce MAX) and say
        whether the optimizer step must be skipped. The flags stay until :meth:`update`."""
        flags = self._flags if self._flags is not None else torch.zeros(self.n_branches, device=comm_device(self.group))
        if torch_dist.is_initialized() and torch_dist.get_world_size(self.group) > 1:
            flags = to_comm(flags.clone(), self.group)
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, group=self.group)
        self._last_flags = flags.detach().to("cpu") > 0
        self._checked = True
        return bool(self._last_flags.any())

    def update(self) -> bool:
        """Apply the rule to every scale from the agreed flags; returns whether the step was skipped.
        Calls :meth:`check_overflow` itself if the trainer did not."""
        if not self._checked:
            self.check_overflow()
        overflow = self._last_flags
        step = self.updates
        may_decrease = (step - self.last_decrease) >= self.cfg.backoff_hysteresis
        decrease = overflow & may_decrease
        grow = ~overflow
        self.log2_scale[decrease] -= self.cfg.backoff_log2
        self.last_decrease[decrease] = step
        self.log2_scale[grow] += self.cfg.growth_per_update_log2
        self.log2_scale.clamp_(self.min_log2, self.max_log2)
        self.overflow_counts += overflow.to(torch.int64)
        skipped = bool(overflow.any())
        self.skipped += int(skipped)
        self.updates += 1
        self._clear_flags()
        self._refresh()
        return skipped

    # ------------------------------------------------------------------ logging / state
    def stats(self, per_branch: bool = True) -> dict[str, float]:
        """Scalars for TensorBoard: scale min/median/max (log2), skipped-step rate, overflow counts
        (``per_branch``: also one overflow count per branch, ``precision/overflows/attn03`` ...)."""
        s = self.log2_scale
        out = {
            "precision/scale_log2_min": float(s.min()),
            "precision/scale_log2_median": float(s.median()),
            "precision/scale_log2_max": float(s.max()),
            "precision/skipped_steps": float(self.skipped),
            "precision/skipped_step_rate": self.skipped / max(self.updates, 1),
            "precision/overflows_total": float(self.overflow_counts.sum()),
        }
        for i in range(self.n_branches if per_branch else 0):
            out[f"precision/overflows/{branch_name(i)}"] = float(self.overflow_counts[i])
        return out

    def set_grad_accum_steps(self, grad_accum_steps: int) -> None:
        """Rescale for ``grad_accum_steps`` = A (every scale and clamp moves by log2(A_new / A_old))."""
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={grad_accum_steps}: must be >= 1")
        shift = math.log2(grad_accum_steps) - math.log2(self.grad_accum_steps)
        self.grad_accum_steps = grad_accum_steps
        self.min_log2 += shift
        self.max_log2 += shift
        self.log2_scale = (self.log2_scale + shift).clamp_(self.min_log2, self.max_log2)
        self._refresh()

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_branches": self.n_branches,
            "data_parallel_size": self.data_parallel_size,
            "grad_accum_steps": self.grad_accum_steps,
            "log2_scale": self.log2_scale.tolist(),
            "last_decrease": self.last_decrease.tolist(),
            "overflow_counts": self.overflow_counts.tolist(),
            "updates": self.updates,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a run resumed with other accumulation steps A shifts every scale by log2(A_new / A_old)
        (the number of ranks does not matter). A pre-#15 state (scales offset by log2 M, no
        ``grad_accum_steps``) is shifted down by log2 M_old."""
        if int(state["n_branches"]) != self.n_branches:
            raise ValueError(f"block scaler state has n_branches={state['n_branches']}, this model has "
                             f"{self.n_branches} (2 x model.n_layers): the checkpoint is from another model")
        if "grad_accum_steps" in state:
            shift = math.log2(self.grad_accum_steps) - math.log2(int(state["grad_accum_steps"]))
        else:
            shift = math.log2(self.grad_accum_steps) - math.log2(int(state["data_parallel_size"]))
        self.log2_scale = (torch.tensor(state["log2_scale"], dtype=torch.float64) + shift).clamp_(
            self.min_log2, self.max_log2)
        self.last_decrease = torch.tensor(state["last_decrease"], dtype=torch.int64)
        self.overflow_counts = torch.tensor(state["overflow_counts"], dtype=torch.int64)
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self._clear_flags()
        self._refresh()

    # ------------------------------------------------------------------ the branch function
    def branch_fn(self, branch: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, idx: int) -> torch.Tensor:
        """Run ``branch(h)`` in fp16 with this branch's gradient scale; returns h's dtype (fp32)."""
        x = _Enter.apply(h, self, idx)
        with torch.autocast(device_type=h.device.type, dtype=torch.float16):
            y = branch(x)
        return _Exit.apply(y, self, idx, h.dtype)


class _Enter(torch.autograd.Function):
    """Forward: identity. Backward: the gradient leaving the branch is filtered, flagged, unscaled."""

    @staticmethod
    def forward(ctx, h, scaler, idx):
        ctx.scaler, ctx.idx, ctx.dtype = scaler, idx, h.dtype
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return ctx.scaler.filter_and_unscale(ctx.idx, grad, ctx.dtype), None, None


class _Exit(torch.autograd.Function):
    """Forward: cast the branch output to the residual dtype. Backward: multiply by the scale (fp32),
    then cast to the branch's dtype; an overflow here becomes Inf that the filter and hooks catch."""

    @staticmethod
    def forward(ctx, y, scaler, idx, dtype):
        ctx.scaler, ctx.idx, ctx.dtype = scaler, idx, y.dtype
        return y.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return (grad.float() * ctx.scaler.scales[ctx.idx]).to(ctx.dtype), None, None, None


# ---------------------------------------------------------------------- wiring


class _Attachment:
    """Registers the parameter-gradient hooks lazily, the first time a branch index is seen."""

    def __init__(self, scaler: BlockScaler):
        self.scaler = scaler
        self.branch_of_param: dict[int, int] = {}
        self.module_of_idx: dict[int, int] = {}
        self.handles: list[Any] = []

    def __call__(self, branch, h, idx):
        if not 0 <= idx < self.scaler.n_branches:
            raise IndexError(f"branch idx={idx} outside [0, {self.scaler.n_branches}) (2 x n_layers)")
        if idx not in self.module_of_idx:
            self._register(branch, idx)
        elif self.module_of_idx[idx] != id(branch):
            raise RuntimeError(f"branch idx={idx} ({branch_name(idx)}) was called with a different module")
        return self.scaler.branch_fn(branch, h, idx)

    def _register(self, branch, idx):
        self.module_of_idx[idx] = id(branch)
        params = branch.parameters() if isinstance(branch, torch.nn.Module) else ()
        for p in params:
            if not p.requires_grad:
                continue
            other = self.branch_of_param.get(id(p))
            if other is not None:
                raise RuntimeError(f"parameter shared by branches {branch_name(other)} and {branch_name(idx)}:"
                                   " one gradient scale per parameter is required")
            self.branch_of_param[id(p)] = idx
            self.handles.append(p.register_hook(self._hook(idx)))

    def _hook(self, idx):
        scaler = self.scaler

        def unscale(grad):  # runs before accumulation, so DeepSpeed sees the unscaled fp32 gradient
            return scaler.filter_and_unscale(idx, grad)

        return unscale


def n_branches_of(model: torch.nn.Module) -> int:
    n = getattr(model, "n_branches", None)
    if n is None:
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(cfg, "n_layers"):
            raise AttributeError(f"{type(model).__name__} has neither .n_branches nor .cfg.n_layers")
        n = 2 * cfg.n_layers
    return int(n)


def attach(model: torch.nn.Module, cfg: PrecisionConfig, data_parallel_size: int = 1,
           group: Any = None) -> BlockScaler:
    """Install fp16 block scaling on a model that exposes ``set_branch_fn`` (the prior).

    Call it on the module itself (before or after ``deepspeed.initialize``; hooks sit on the
    parameter objects, which ZeRO-3 keeps). Returns the scaler to step, log and checkpoint.
    """
    if not cfg.block_scaling:
        raise ConfigError("precision.block_scaling=False: attach() is only for fp16 with block scaling")
    scaler = BlockScaler(n_branches_of(model), cfg, data_parallel_size, group)
    attachment = _Attachment(scaler)
    model.set_branch_fn(attachment)
    scaler._attachment = attachment  # keeps the hooks' owner alive; used by detach()
    print0(f"precision: fp16 branches with {scaler.n_branches} block scales, start 2^{float(scaler.log2_scale[0]):.2f}"
           f" in [2^{scaler.min_log2:.2f}, 2^{scaler.max_log2:.2f}] (A={scaler.grad_accum_steps}; independent"
           f" of the {data_parallel_size} ranks)")
    return scaler


def install(engine: Any, scaler: BlockScaler) -> None:
    """Hook the scaler into a :class:`dalle_ds.parallel.engine.Engine`: at every accumulation boundary the
    agreed overflow flags vote to skip the update, and the scales are updated after the step."""
    scaler.set_grad_accum_steps(engine.spec.grad_accum_steps)  # S = A * 2^13 (module docstring)
    engine.before_step.append(lambda eng: scaler.check_overflow())
    engine.after_step.append(lambda eng, applied: scaler.update())


def detach(model: torch.nn.Module, scaler: BlockScaler) -> None:
    """Remove the hooks and restore the plain fp32 branch call."""
    for handle in scaler._attachment.handles:
        handle.remove()
    model.set_branch_fn(_default_branch_fn)


# ---------------------------------------------------------------------- DeepSpeed config


def fp16_supported() -> bool:
    if torch.cuda.is_available():
        return True
    return ds_internals.accelerator_fp16_supported()


def resolve_ds_config(ds_config: dict[str, Any], cfg: PrecisionConfig) -> tuple[Mode, dict[str, Any]]:
    """The precision the DeepSpeed JSON declares, and the config DeepSpeed should actually get.

    - ``fp16`` + ``precision.block_scaling``: mode ``fp16_block``; DeepSpeed's fp16 section must keep
      ``loss_scale`` at 1.0 and is switched off in the returned copy (fp32 master parameters; the
      branches run fp16 through :func:`attach`).
    - ``fp16`` without block scaling: mode ``fp16`` (DeepSpeed fp16: whole model half, its own scale).
    - ``bf16``: mode ``bf16``; neither: ``fp32``.
    Half precision on a device without fp16 support needs ``precision.allow_fp16_on_cpu=true``.
    """
    fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError("ds_config fp16.enabled=true and bf16.enabled=true: choose one precision")
    if not fp16:
        return ("bf16" if bf16 else "fp32"), ds_config
    if not fp16_supported():
        if not cfg.allow_fp16_on_cpu:
            raise ConfigError("precision.allow_fp16_on_cpu=False: the DeepSpeed config enables fp16 but this "
                              "device reports no fp16 support; set it true only for tests on CPU")
        print0("precision: WARNING fp16 on a device without fp16 support (precision.allow_fp16_on_cpu=true)")
    if not cfg.block_scaling:  # the engine patches DeepSpeed's fp16 check (build_engine(allow_fp16_on_cpu=...))
        return "fp16", ds_config
    loss_scale = ds_config["fp16"].get("loss_scale", 0)
    if float(loss_scale) != 1.0:
        raise ConfigError(f"ds_config fp16.loss_scale={loss_scale!r}: with precision.block_scaling=true "
                          "DeepSpeed's own scale must be fixed at 1.0 (the block scales do the scaling)")
    resolved = copy.deepcopy(ds_config)
    resolved["fp16"] = {"enabled": False}
    return "fp16_block", resolved
