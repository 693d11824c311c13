"""The only module that wires DeepSpeed: model under ``zero.Init``, config merge, AdamW, initialize.

    spec = OptimSpec.from_optim(cfg.optim)
    eng = build_engine(lambda: Prior(cfg.model), "ds_configs/zero3_fp32_cpu.json", spec,
                       no_decay=prior.no_decay, run_dir=cfg.run.dir, run_config=cfg)
    loss, parts = eng(text, codes)          # DeepSpeed forward of ``model.loss`` (entry="loss")
    applied = eng.engine_step(loss)         # backward + step; False when the update was skipped

Config ownership: the static JSON (``ds_configs/*.json``) owns ZeRO, precision and
communication settings; the YAML owns batch sizes, the optimiser, the schedule and clipping.
A YAML-owned key in the JSON is a :class:`ConfigError` naming the key and the file.

Extension points (other modules plug in here; the engine knows nothing of them):

* ``zero_partition_group``: the process group ZeRO-3 partitions parameters over (passed to
  ``deepspeed.zero.Init(data_parallel_group=...)``), e.g. the intra-node group for PowerSGD.
* ``before_initialize``: callables ``fn(model, ds_config)`` run after the model is built and
  before ``deepspeed.initialize`` (patch ``DeepSpeedZeroOptimizer_Stage3`` there, through
  dalle_ds/parallel/deepspeed_internals.py: ``deepspeed.runtime.engine`` imports the class inside
  ``_configure_zero_optimizer``).
  ``after_initialize``: callables ``fn(engine)`` run once the :class:`Engine` exists.
* ``Engine.before_step``: callables ``fn(engine) -> bool | None`` run at each gradient-accumulation
  boundary after backward (gradients already reduced into the ZeRO partitions) and before the
  optimiser step; returning True skips the update on every rank (the votes are all-reduced).
  ``Engine.after_step``: callables ``fn(engine, applied: bool)``. ``Engine.engine_step(loss, skip)``
  is backward + step with an explicit skip vote (e.g. the fp16 block scaler's overflow).
* fp16: DeepSpeed's own loss scale is kept static at 1 (``"fp16": {"loss_scale": 1.0}``), leaving
  scaling to the model (dalle_ds/parallel/block_scaling.py); an explicit other loss_scale is a conflict.
  DeepSpeed still skips updates whose gradient norm is not finite.

On CPU the shared-memory comm op DeepSpeed JIT-compiles at ``init_distributed`` (~30-40 s the
first time) serves only ``inference_all_reduce``; training never uses it, so it is not built
unless ``DALLE_DS_SHM_OP=1``. This module uses DeepSpeed's public API only; what it needs of
DeepSpeed's internals (skipping that op, the skip vote, the clipping norm, fp16 on CPU, ZeRO-3
parameter sizes) comes from :mod:`dalle_ds.parallel.deepspeed_internals`, which checks the DeepSpeed version.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from dalle_ds.config import ConfigError, OptimConfig
from dalle_ds.parallel import deepspeed_internals as ds_internals
from dalle_ds.parallel.dist import any_rank, get_rank, print0

# What the YAML owns, and where it lives there (the error message points the user to it).
YAML_OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "derived: optim.micro_batch_size x optim.grad_accum_steps x ranks",
    "train_micro_batch_size_per_gpu": "optim.micro_batch_size",
    "gradient_accumulation_steps": "optim.grad_accum_steps",
    "optimizer": "optim (AdamW built by dalle_ds.parallel.engine)",
    "scheduler": "optim (dalle_ds.training.schedules)",
    "gradient_clipping": "optim.grad_clip (applied during warm-up only)",
}


@dataclass(frozen=True)
class OptimSpec:
    """What the engine needs from a YAML optimiser section (prior or dVAE)."""

    micro_batch_size: int
    grad_accum_steps: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float

    @classmethod
    def from_optim(cls, cfg: OptimConfig) -> "OptimSpec":
        return cls(cfg.micro_batch_size, cfg.grad_accum_steps, cfg.lr, tuple(cfg.betas), cfg.eps,
                   cfg.weight_decay)


# ---------------------------------------------------------------- DeepSpeed set-up


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed_config={str(path)!r}: no such file")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config={str(path)!r}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"deepspeed_config={str(path)!r}: top level must be an object")
    return cfg


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def resolve_ds_config(static: dict[str, Any], spec: OptimSpec, world_size: int,
                      source: str = "<dict>", fixed_fp16_loss_scale: bool = True) -> dict[str, Any]:
    """The static JSON plus the YAML-owned values; conflicts raise naming the key and the file."""
    for key, owner in YAML_OWNED_KEYS.items():
        if key in static:
            raise ConfigError(f"{source}: key {key!r}={static[key]!r} belongs to the YAML ({owner}); "
                              f"remove it from the DeepSpeed JSON")
    resolved = copy.deepcopy(static)
    fp16 = resolved.get("fp16", {})
    if fp16.get("enabled", False) and fixed_fp16_loss_scale:
        scale = fp16.get("loss_scale", 1.0)
        if scale != 1.0:
            raise ConfigError(f"{source}: key 'fp16.loss_scale'={scale!r}: must be 1.0 (static); "
                              f"gradient scaling is per resblock (precision section of the YAML)")
        fp16["loss_scale"] = 1.0
    if fp16.get("enabled", False) and resolved.get("bf16", {}).get("enabled", False):
        raise ConfigError(f"{source}: keys 'fp16.enabled' and 'bf16.enabled' are both true")
    resolved["train_micro_batch_size_per_gpu"] = spec.micro_batch_size
    resolved["gradient_accumulation_steps"] = spec.grad_accum_steps
    resolved["train_batch_size"] = spec.micro_batch_size * spec.grad_accum_steps * world_size
    return resolved


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay: Callable[[str, nn.Parameter], bool] | None = None) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` and ``no_decay`` (by the predicate; default: ndim < 2)."""
    no_decay = no_decay or (lambda name, p: p.ndim < 2)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if no_decay(name, p) else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(model: nn.Module, spec: OptimSpec,
                no_decay: Callable[[str, nn.Parameter], bool] | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, spec.weight_decay, no_decay), lr=spec.lr,
                             betas=spec.betas, eps=spec.eps)


def param_groups_16bit(model: nn.Module, weight_decay: float,
                       no_decay: Callable[[str, nn.Parameter], bool] | None = None,
                       keep_fp32: Callable[[str, nn.Parameter], bool] | None = None) -> list[dict[str, Any]]:
    """AdamW16 groups: 16-bit matrices (decay, stochastic rounding), and the fp32 set (``keep_fp32``:
    gains, biases, embeddings, unembeddings) with fp32 masters and moments, with and without decay."""
    no_decay = no_decay or (lambda name, p: p.ndim < 2)
    keep_fp32 = keep_fp32 or no_decay
    groups: dict[str, list] = {"decay": [], "fp32_decay": [], "fp32_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay(name, p):
            groups["fp32_no_decay"].append(p)
        else:
            groups["fp32_decay" if keep_fp32(name, p) else "decay"].append(p)
    spec = {"decay": (weight_decay, False), "fp32_decay": (weight_decay, True), "fp32_no_decay": (0.0, True)}
    return [{"name": k, "params": v, "weight_decay": spec[k][0], "fp32_master": spec[k][1]}
            for k, v in groups.items() if v]


def build_optimizer(model: nn.Module, spec: OptimSpec, ds_config: dict[str, Any],
                    no_decay: Callable[[str, nn.Parameter], bool] | None = None,
                    keep_fp32: Callable[[str, nn.Parameter], bool] | None = None,
                    seed: int = 0) -> torch.optim.Optimizer:
    """The regime's client optimiser: :class:`~dalle_ds.training.adamw16.AdamW16` when the JSON keeps
    master weights and optimizer states in bf16 (16-bit regime), else torch's AdamW (fp32 master)."""
    from dalle_ds.training.adamw16 import AdamW16, uses_16bit_state

    if not uses_16bit_state(ds_config):
        return build_adamw(model, spec, no_decay)
    return AdamW16(param_groups_16bit(model, spec.weight_decay, no_decay, keep_fp32), lr=spec.lr,
                   betas=spec.betas, eps=spec.eps, seed=seed)


class EntryPoint(nn.Module):
    """Makes ``model.<method>`` the forward DeepSpeed runs (parameters are named ``model.*``)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


# ---------------------------------------------------------------- the engine


class Engine:
    """A DeepSpeed engine plus the project's hooks; ``model`` is the bare model (no wrapper)."""

    def __init__(self, ds_engine: Any, model: nn.Module, ds_config: dict[str, Any], spec: OptimSpec):
        self.ds = ds_engine
        self.model = model
        self.ds_config = ds_config
        self.spec = spec
        self.before_step: list[Callable[["Engine"], bool | None]] = []
        self.after_step: list[Callable[["Engine", bool], None]] = []
        self._skip_requested = False
        self.skipped_updates = 0
        ds_internals.install_skip_switch(ds_engine.optimizer, lambda: self._skip_requested)

    @property
    def optimizer(self) -> Any:
        """DeepSpeed's (ZeRO) optimiser, e.g. ``DeepSpeedZeroOptimizer_Stage3``."""
        return self.ds.optimizer

    @property
    def device(self) -> torch.device:
        """Where this rank's model lives: cuda:LOCAL_RANK under NCCL, the CPU under gloo."""
        return self.ds.device

    # -- forward / backward / step
    def __call__(self, *args, **kwargs):
        """The model's forward with tensor arguments moved to ``device`` first: the loaders yield host
        tensors and DeepSpeed moves no inputs (on the CPU this is a no-op)."""
        def to_device(v):
            return v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v

        return self.ds(*map(to_device, args), **{k: to_device(v) for k, v in kwargs.items()})

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def is_boundary(self) -> bool:
        """True when the next ``step`` applies an update (last micro-batch of the accumulation)."""
        return self.ds.is_gradient_accumulation_boundary()

    def step(self, skip: bool = False) -> bool:
        """Advance one micro-step; at the boundary update unless any rank or hook votes to skip.

        Returns True when an update was applied (False between boundaries and when skipped).
        """
        if not self.is_boundary():
            self.ds.step()
            return False
        for fn in self.before_step:
            skip = bool(fn(self)) or skip
        self._skip_requested = _any_rank(skip)
        try:
            self.ds.step()
        finally:
            self._skip_requested = False
        applied = not ds_internals.step_overflowed(self.ds.optimizer)
        if not applied:
            self.skipped_updates += 1
        for fn in self.after_step:
            fn(self, applied)
        return applied

    def engine_step(self, loss: torch.Tensor, skip: bool = False) -> bool:
        """Backward then step (see :meth:`step`)."""
        self.backward(loss)
        return self.step(skip)

    # -- schedule knobs (the YAML owns them; the schedule decides the values)
    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def set_grad_clip(self, max_norm: float) -> None:
        """Global gradient-norm clip for the next updates (0 disables)."""
        ds_internals.set_gradient_clipping(self.ds, max_norm)

    @property
    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- sizes
    @property
    def world_size(self) -> int:
        return torch_dist.get_world_size() if torch_dist.is_initialized() else 1

    @property
    def micro_steps(self) -> int:
        return self.ds.micro_steps

    @property
    def global_steps(self) -> int:
        return self.ds.global_steps

    def param_numel(self) -> tuple[int, int]:
        """(parameters stored on this rank, parameters of the whole model)."""
        return local_and_total_numel(self.model)


def local_and_total_numel(model: nn.Module) -> tuple[int, int]:
    local = total = 0
    for p in model.parameters():
        here, full = ds_internals.local_and_full_numel(p)
        local += here
        total += full
    return local, total


def model_state_bytes(engine: Engine, averager: Any = None) -> dict[str, int]:
    """Bytes of model state this rank holds in the live ZeRO-3 engine, by the planner's items
    (:func:`dalle_ds.plan.model_state_bytes`): ``params``, ``master`` (0 when DeepSpeed aliases the
    master to the parameter partition), ``grads``, ``optimizer`` (moments, AdamW16's fp32 masters),
    ``persistent``, and with a PowerSGD ``averager`` its ``errors`` (beside the gradients) or
    ``errors_host`` (``powersgd.error_buffer_device=host``: host memory, not the GPU's) and ``q``.
    Each storage counts once."""
    kinds = ds_internals.zero3_state_tensors(engine.optimizer, list(engine.model.parameters()))
    if averager is not None:
        errors = list(getattr(averager, "errors", {}).values())
        kinds["errors_host" if getattr(averager, "errors_on_host", False) else "errors"] = errors
        kinds["q"] = list(getattr(averager, "qs", {}).values())
    seen: set[tuple[int, int]] = set()
    out: dict[str, int] = {}
    for kind in ("params", "persistent", "master", "grads", "optimizer", "errors", "errors_host", "q"):
        total = 0
        for t in kinds.get(kind, []):
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if t.numel() == 0 or key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        out[kind] = total
    return out


def _any_rank(flag: bool) -> bool:
    return any_rank(flag)  # on the backend's device (NCCL: CUDA)


def build_engine(model_factory: Callable[[], nn.Module], ds_config: str | Path | dict[str, Any],
                 spec: OptimSpec, *, no_decay: Callable[[str, nn.Parameter], bool] | None = None,
                 entry: str | None = "loss", zero_partition_group: Any = None,
                 before_initialize: Sequence[Callable[[nn.Module, dict], None]] = (),
                 after_initialize: Sequence[Callable[[Engine], None]] = (),
                 fixed_fp16_loss_scale: bool = True, allow_fp16_on_cpu: bool = False,
                 run_dir: str | Path | None = None, run_config: Any = None,
                 keep_fp32: Callable[[str, nn.Parameter], bool] | None = None, seed: int = 0) -> Engine:
    """Build the model (under ``zero.Init`` for stage 3), AdamW, and ``deepspeed.initialize``.

    ``entry`` names the model method DeepSpeed's forward calls (``None``: ``forward``).
    ``keep_fp32`` (the paper's fp32 set) matters in the 16-bit regime (a JSON with
    ``bf16.bf16_optimizer_states``): those parameters get fp32 masters and moments in AdamW16.
    ``allow_fp16_on_cpu`` (``cfg.precision.allow_fp16_on_cpu``) lets fp16 run on a CPU that
    DeepSpeed says cannot (tests; fp16 matmul there is very slow).
    ``run_config`` (an object with ``save(path)``, e.g. :class:`dalle_ds.config.Config`) and the
    resolved JSON are written by rank 0 to ``run_dir/config.yaml`` and ``run_dir/ds_config.json``.
    """
    deepspeed = ds_internals.import_deepspeed()
    if not torch_dist.is_initialized():
        raise RuntimeError("build_engine: call dalle_ds.parallel.dist.init_distributed() first")
    deepspeed.init_distributed(dist_backend=torch_dist.get_backend())
    source = str(ds_config) if not isinstance(ds_config, dict) else "<dict>"
    static = ds_config if isinstance(ds_config, dict) else load_ds_config(ds_config)
    resolved = resolve_ds_config(static, spec, torch_dist.get_world_size(), source, fixed_fp16_loss_scale)
    if resolved.get("fp16", {}).get("enabled", False) and allow_fp16_on_cpu:
        ds_internals.allow_fp16_on_cpu()

    if zero_stage(resolved) == 3:
        ds_internals.gather_params_outside_autocast()  # bf16 partitions gathered inside fp16 branches
        ds_internals.alias_master_partitions()  # no second copy of the partitions when dtypes agree (#14)
        with deepspeed.zero.Init(config_dict_or_path=resolved, data_parallel_group=zero_partition_group):
            model = model_factory()
    else:
        if zero_partition_group is not None:
            raise ConfigError(f"{source}: zero_partition_group needs zero_optimization.stage=3")
        model = model_factory()
    optimizer = build_optimizer(model, spec, resolved, no_decay, keep_fp32, seed)
    if hasattr(optimizer, "sr_stream"):  # replicas of a shard (same rank in the ZeRO group) round alike
        optimizer.sr_stream = torch_dist.get_rank(zero_partition_group) if zero_partition_group else get_rank()
    for fn in before_initialize:
        fn(model, resolved)
    module = EntryPoint(model, entry) if entry else model
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=resolved,
                                              dist_init_required=False)
    engine = Engine(ds_engine, model, resolved, spec)
    for fn in after_initialize:
        fn(engine)

    if run_dir is not None and get_rank() == 0:
        write_run_configs(run_dir, resolved, run_config)
    local, total = engine.param_numel()
    print0(f"engine: ZeRO stage {zero_stage(resolved)}, {total:,} parameters ({local:,} on rank 0), "
           f"train_batch_size {resolved['train_batch_size']} = micro {spec.micro_batch_size} x accum "
           f"{spec.grad_accum_steps} x ranks {torch_dist.get_world_size()}")
    return engine


def write_run_configs(run_dir: str | Path, ds_config: dict[str, Any], run_config: Any = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "ds_config.json.tmp"
    tmp.write_text(json.dumps(ds_config, indent=2) + "\n")
    tmp.replace(run_dir / "ds_config.json")
    if run_config is not None:
        run_config.save(run_dir / "config.yaml")


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unpartitioned) parameters and buffers as fp32 CPU tensors, on every rank."""
    params = list(model.parameters())
    if any(ds_internals.is_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def named_full_grads(engine: Engine) -> dict[str, torch.Tensor]:
    """Each parameter's full fp32 gradient after backward at the boundary (ZeRO-3: gathered)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.model.named_parameters():
        g = safe_get_full_grad(p)
        out[name] = None if g is None else g.detach().float().cpu().clone()
    return out

