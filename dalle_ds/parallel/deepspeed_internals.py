"""Every touch of DeepSpeed's private or internal API, for one pinned DeepSpeed version.

DeepSpeed 0.19.8 has no gradient-communication hook, no way to veto an update, and reads the
clipping norm only at construction, so the project reaches into it in a few places. They all
live here, each behind a small named function that engine.py, hierarchy.py, block_scaling.py and
checkpoint.py call. Public API (``deepspeed.initialize``, ``deepspeed.zero.Init``,
``zero.GatheredParameters``, ``deepspeed.utils.safe_get_full_grad``, ``engine.backward/step``,
``deepspeed.comm``) stays where it is used.

The first call checks the installed ``deepspeed.__version__`` against :data:`DEEPSPEED_VERSION`
(the pin in requirements.txt and constraints.txt); another version is an error naming both,
unless ``DALLE_DS_ALLOW_DEEPSPEED_MISMATCH=1`` (then a warning). To upgrade DeepSpeed: check each
row below in the new sources, run ``tests/test_deepspeed_internals.py`` (it checks every row's
name and signature), then move DEEPSPEED_VERSION, requirements.txt and constraints.txt together.

========================================  ================================  ==========================================
Internal (how we touch it)                Defined in (DeepSpeed 0.19.8)     Why (function here)
========================================  ================================  ==========================================
``build_shm_op()`` (replaced by a no-op)  deepspeed/comm/torch.py, called   on CPU ``init_distributed`` JIT-compiles a
                                          in ``TorchBackend.__init__``      shared-memory op (~30-40 s) only inference
                                                                            uses (``import_deepspeed``)
``is_fp16_supported()`` of the            deepspeed/accelerator/            DeepSpeed refuses fp16 on a CPU reporting
accelerator (replaced on the object;      cpu_accelerator.py                none; tests opt in, block scaling asks
read)                                     ``CPU_Accelerator``               (``allow_fp16_on_cpu``,
                                                                            ``accelerator_fp16_supported``)
``Stage3._overflow_check_and_loss_``      deepspeed/runtime/zero/stage3.py  the engine's skip vote: a requested skip is
``scale_update(update_scale)``,           ``DeepSpeedZeroOptimizer_Stage3`` an fp16 overflow (no update, counted in
``_loss_scale_update_and_overflow_``                                        ``skipped_steps``); ``overflow`` says if
``cleanup()``, ``.overflow`` (wrapped                                       the step applied (``install_skip_switch``,
per instance; set; read)                                                    ``step_overflowed``)
``optimizer.step``, ``.overflow`` under   deepspeed/runtime/engine.py       the same skip vote for optimisers without
ZeRO 0-2 (wrapped per instance; set)      ``DeepSpeedEngine._take_model_``  the overflow check (``install_skip_switch``)
                                          ``step`` reads ``.overflow``
``optimizer.clip_grad``,                  stage3.py, stage_1_and_2.py       the schedule clips in warm-up only;
``engine._config.gradient_clipping``      ``__init__``; runtime/config.py   DeepSpeed copies the norm once, at
(set)                                     ``DeepSpeedConfig``               construction (``set_gradient_clipping``)
``Stage3.partition_grads(params_to_``     stage3.py, called per bucket      hierarchical ZeRO's cross-node average of
``release, grad_partitions)`` (wrapped    after the reduce-scatter; class   gradient shards, at the one place after the
on the class)                             imported by ``DeepSpeedEngine.``  intra-node reduce-scatter (no comm hook)
                                          ``_configure_zero_optimizer``     (``patch_stage3_partition_grads``,
                                                                            ``set_partition_grads_hook``)
``Stage3._get_param_partition_rank(``     stage3.py; runtime/               a shard's offset in its flat parameter; act
``param)``, ``.is_gradient_accumulation`` base_optimizer.py                 at the accumulation boundary only; refuse
``_boundary()``, ``.offload_optimizer``                                     CPU offload (``shard_offset``,
(read)                                                                      ``is_stage3_optimizer``,
                                                                            ``offloads_optimizer``)
``Stage3.step(closure)`` (wrapped per     stage3.py                         PowerSGD counts its steps after each update
instance)                                                                   (``call_after_step``)
``Stage3._overflow_check_and_loss_``      stage3.py ``step`` calls it with  the cross-node average runs once the skip
``scale_update`` (wrapped per instance    ``update_scale=False`` before     decision is known, so a skipped step never
again, outside the skip switch)           ``_get_norm_groups``              touches PowerSGD's error buffers or Q
                                                                            (``run_at_update_decision``)
``get_fp32_state_dict_from_zero_``        deepspeed/utils/zero_to_fp32.py   export consolidates a ZeRO checkpoint
``checkpoint(checkpoint_dir, tag, ...)``                                    offline; its CLI script would need
                                                                            huggingface_hub
                                                                            (``fp32_state_dict_from_zero_checkpoint``)
``DeepSpeedEngine.save_zero_checkpoint``  deepspeed/runtime/engine.py       hierarchical ZeRO checkpoints hold one
``.save_non_zero_checkpoint``,            ``_configure_checkpointing``,     copy of the model state: for one save
``.seq_dp_world_size``,                   ``save_checkpoint``,              or load DeepSpeed sees the node as its
``Stage3.dp_process_group``,              ``_get_ckpt_name``,               whole data-parallel world (files keyed
``.partition_count`` (set for one save    ``_get_zero_ckpt_name``,          by the node-local rank, partition_count
or load, then restored)                   ``_common_checkpoint_state``,     and dp_world_size = node size), and only
                                          ``_load_zero_checkpoint``;        the first node writes
                                          stage3.py ``_rigid_state_dict``,  (``node_local_checkpoint``)
                                          ``load_state_dict``
``LOCAL_RANK`` read as the CUDA device     runtime/engine.py ``DeepSpeed``   one GPU bound per task (LOCAL_RANK 3, one
index (read by DeepSpeed; we rewrite the  ``Engine._configure_with_``       visible GPU): ``dist.init_distributed``
environment variable)                     ``arguments`` + ``_set_``         sets LOCAL_RANK = LOCAL_RANK % count
                                          ``distributed_vars``; zero/       before DeepSpeed reads it
                                          partition_parameters.py           (``LOCAL_RANK_AS_DEVICE_SOURCES``)
                                          ``Init.__init__``
``PartitionedParameterCoordinator.``      deepspeed/runtime/zero/           16-bit regime: bf16 partitions gathered
``fetch_sub_module(submodule, forward)``  partitioned_param_coordinator.py  inside an fp16 autocast branch hit
(wrapped on the class)                    (its ``wait`` does ``torch.cat``  "Unexpected floating ScalarType in
                                          of the partitions)                autocast::prioritize"; gathers run with
                                                                            autocast off
                                                                            (``gather_params_outside_autocast``)
``Stage3._create_fp32_partitions()``      stage3.py (compares a tensor's    one copy of the model state: the master
(wrapped on the class; ``self.device``    device with the string            aliases the parameter partition when the
turned into a ``torch.device`` during     ``self.device``)                  dtypes agree (``alias_master_partitions``)
the call)
``Stage3.fp16_partitioned_groups_flat``,  stage3.py ``_create_fp16_``       the planner's model-state bytes checked
``.fp32_partitioned_groups_flat``,        ``partitions_with_defragmentation``  against the live engine (#14):
``.grad_partitions_flat_buffer``,         ``_create_fp32_partitions``,       ``zero3_state_tensors``
``.optimizer.state``, ``ds_persist``      ``__init__``; partition_
(read)                                    parameters.py
ZeRO-3 parameter attributes               deepspeed/runtime/zero/           sizes stored per rank, full shapes, shard
``ds_tensor``, ``ds_numel``,              partition_parameters.py           offsets (``is_partitioned``, ``full_shape``,
``ds_shape``, ``ds_id``,                  ``Init._convert_to_deepspeed_``   ``local_and_full_numel``, ``param_id``)
``partition_numel()`` (read)              ``param``
========================================  ================================  ==========================================
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch

DEEPSPEED_VERSION = "0.19.8"  # == the pin in requirements.txt and constraints.txt
ALLOW_MISMATCH_ENV = "DALLE_DS_ALLOW_DEEPSPEED_MISMATCH"


class DeepSpeedVersionError(RuntimeError):
    pass


def check_version(installed: str, pinned: str = DEEPSPEED_VERSION,
                  env: Mapping[str, str] | None = None) -> None:
    """Raise (or, with ``DALLE_DS_ALLOW_DEEPSPEED_MISMATCH=1``, warn) unless ``installed`` is ``pinned``."""
    if installed.split("+")[0] == pinned:  # a local build suffix (0.19.8+abc) is the same release
        return
    msg = (f"DeepSpeed {installed} is installed, but dalle_ds/parallel/deepspeed_internals.py patches "
           f"internals of DeepSpeed {pinned} (the version pinned in requirements.txt). Install it with "
           f"`pip install deepspeed=={pinned}`, or port the table in that module's docstring to "
           f"{installed}, run tests/test_deepspeed_internals.py and update DEEPSPEED_VERSION. "
           f"To run anyway at your own risk, set {ALLOW_MISMATCH_ENV}=1.")
    if (os.environ if env is None else env).get(ALLOW_MISMATCH_ENV, "0") == "1":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return
    raise DeepSpeedVersionError(msg)


_version_checked = False


def ensure_version() -> None:
    """Check the installed DeepSpeed once per process (every function below calls this first)."""
    global _version_checked
    if not _version_checked:
        import deepspeed

        check_version(deepspeed.__version__)
        _version_checked = True


# ---------------------------------------------------------------- import, accelerator


def import_deepspeed():
    """Import DeepSpeed; on CPU skip building the inference-only shared-memory comm op."""
    import deepspeed

    ensure_version()
    if os.environ.get("DALLE_DS_SHM_OP", "0") != "1" and not torch.cuda.is_available():
        # `deepspeed.comm.torch` as an attribute is the torch package (star import); use sys.modules.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def allow_fp16_on_cpu() -> None:
    """DeepSpeed refuses fp16 on CPUs that report no fp16 support; tests opt in explicitly."""
    ensure_version()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True


def accelerator_fp16_supported() -> bool:
    """What DeepSpeed's accelerator says about fp16 (False when DeepSpeed has no accelerator here)."""
    try:
        from deepspeed.accelerator import get_accelerator
    except Exception:  # noqa: BLE001 - no usable DeepSpeed: only CUDA counts
        return False
    ensure_version()
    try:
        return bool(get_accelerator().is_fp16_supported())
    except Exception:  # noqa: BLE001 - no DeepSpeed accelerator: only CUDA counts
        return False


# ---------------------------------------------------------------- the engine's optimiser


def install_skip_switch(opt: Any, skip_requested: Callable[[], bool]) -> None:
    """Make DeepSpeed's optimiser treat ``skip_requested()`` exactly like an fp16 overflow."""
    ensure_version()
    if hasattr(opt, "_overflow_check_and_loss_scale_update"):  # ZeRO-3
        original = opt._overflow_check_and_loss_scale_update

        def check(update_scale: bool = True) -> bool:
            overflow = original(update_scale=False)
            if skip_requested():
                opt.overflow = overflow = True
            if not update_scale:
                return overflow
            return opt._loss_scale_update_and_overflow_cleanup()

        opt._overflow_check_and_loss_scale_update = check
    else:  # ZeRO 0-2: the engine reads `overflow`; a skipped step leaves the optimiser untouched
        inner_step = opt.step

        def step(*args, **kwargs):
            skip = skip_requested()
            opt.overflow = skip
            return None if skip else inner_step(*args, **kwargs)

        opt.step = step


def step_overflowed(opt: Any) -> bool:
    """Whether DeepSpeed skipped the last step (overflow or a requested skip)."""
    ensure_version()
    return bool(getattr(opt, "overflow", False))


def set_gradient_clipping(ds_engine: Any, max_norm: float) -> None:
    """Global gradient-norm clip for the next updates (0 disables)."""
    ensure_version()
    if hasattr(ds_engine.optimizer, "clip_grad"):
        ds_engine.optimizer.clip_grad = float(max_norm)
    else:
        ds_engine._config.gradient_clipping = float(max_norm)


def call_after_step(opt: Any, fn: Callable[[], None]) -> None:
    """Run ``fn()`` after every ``opt.step`` (wraps this optimiser instance only)."""
    ensure_version()
    step = opt.step

    def step_then_call(*args, **kwargs):
        out = step(*args, **kwargs)
        fn()
        return out

    opt.step = step_then_call


def run_at_update_decision(opt: Any, fn: Callable[[bool], bool]) -> None:
    """In every ZeRO-3 ``opt.step``, once DeepSpeed knows whether the step is skipped (fp16 overflow,
    or a skip requested through :func:`install_skip_switch`) and before it takes the gradient norm,
    call ``fn(skipped)``; ``fn`` returning True makes the step a skip (an overflow, counted as one).
    Wraps this instance's ``_overflow_check_and_loss_scale_update`` around whatever is there, so it
    must be installed after :func:`install_skip_switch` (``Engine`` runs ``after_initialize`` hooks
    after installing the switch)."""
    ensure_version()
    inner = opt._overflow_check_and_loss_scale_update

    def check(update_scale: bool = True) -> bool:
        overflow = bool(inner(update_scale=False))
        if fn(overflow) and not overflow:
            opt.overflow = overflow = True
        if not update_scale:
            return overflow
        return opt._loss_scale_update_and_overflow_cleanup()

    opt._overflow_check_and_loss_scale_update = check


# ---------------------------------------------------------------- ZeRO-3 gradient shards


def stage3_class() -> type:
    ensure_version()
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return DeepSpeedZeroOptimizer_Stage3


def is_stage3_optimizer(opt: Any) -> bool:
    ensure_version()
    return hasattr(opt, "_get_param_partition_rank")


def offloads_optimizer(opt: Any) -> bool:
    ensure_version()
    return bool(getattr(opt, "offload_optimizer", False))


def shard_offset(opt: Any, p: Any) -> int:
    """Offset of this rank's shard of ``p`` in the flattened full parameter."""
    return p.partition_numel() * opt._get_param_partition_rank(p)


def _create_fp32_partitions_aliased(self):
    device = self.device
    if isinstance(device, str):  # 'cpu' / 'cuda:0': torch 2.13's device == str is always False
        self.device = torch.device(device)
    try:
        return _ORIGINAL["_create_fp32_partitions"](self)
    finally:
        self.device = device


def alias_master_partitions() -> None:
    """Let ZeRO-3 use the parameter partition as the master when both have the master dtype, as
    DeepSpeed intends (``_create_fp32_partitions``: "we don't need another copy of the weights").
    DeepSpeed 0.19.8 tests ``partition.device == self.device`` with ``self.device`` a string
    ('cpu', 'cuda:0'), which torch 2.13 never finds equal, so every regime kept a second copy:
    +4 B/param in fp32 mode (fp16 block scaling's fp32 master), +2 B/param in the 16-bit regime
    (3.07 GB per GPU for the 12B model over 8 GPUs). Idempotent; before ``deepspeed.initialize``."""
    stage3 = stage3_class()
    if "_create_fp32_partitions" not in _ORIGINAL:
        _ORIGINAL["_create_fp32_partitions"] = stage3._create_fp32_partitions
        stage3._create_fp32_partitions = _create_fp32_partitions_aliased


GradShardHook = Callable[[list, list[torch.Tensor]], None]
_HOOK_ATTR = "_dalle_ds_partition_grads_hook"
_ORIGINAL: dict[str, Any] = {}


def _partition_grads_then_hook(self, params_to_release, grad_partitions):
    hook: GradShardHook | None = getattr(self, _HOOK_ATTR, None)
    if hook is None:
        return _ORIGINAL["partition_grads"](self, params_to_release, grad_partitions)
    # Same filter as DeepSpeed's: shards that hold only padding get no buffer.
    real = [p for p in params_to_release if shard_offset(self, p) < p.ds_numel]
    buffers = _ORIGINAL["partition_grads"](self, params_to_release, grad_partitions)
    if self.is_gradient_accumulation_boundary():
        assert len(real) == len(buffers), (len(real), len(buffers))
        hook(real, buffers)
    return buffers


def patch_stage3_partition_grads() -> None:
    """Wrap ``DeepSpeedZeroOptimizer_Stage3.partition_grads`` (idempotent; inert for optimisers
    without a hook). Must run before ``deepspeed.initialize``, which imports the class."""
    stage3 = stage3_class()
    if "partition_grads" not in _ORIGINAL:
        _ORIGINAL["partition_grads"] = stage3.partition_grads
        stage3.partition_grads = _partition_grads_then_hook


def partition_grads_patched() -> bool:
    return "partition_grads" in _ORIGINAL


def set_partition_grads_hook(opt: Any, hook: GradShardHook) -> None:
    """At each accumulation boundary call ``hook(params, shard_buffers)`` for every bucket of
    ``opt`` (a patched ZeRO-3 optimiser), after the shards hold the node's accumulated gradient."""
    if not partition_grads_patched():
        raise RuntimeError("patch_stage3_partition_grads() must run before deepspeed.initialize")
    setattr(opt, _HOOK_ATTR, hook)


# ---------------------------------------------------------------- ZeRO-3 parameters


def gather_params_outside_autocast() -> None:
    """ZeRO-3 gathers (and the ``torch.cat`` of their partitions) run with autocast disabled, so bf16
    partitions can be gathered for a branch that computes under fp16 autocast (the 16-bit regime with
    fp16 block scaling, #14). Autocast's promote rule for ``cat`` refuses bf16 inputs under fp16."""
    import contextlib
    import functools

    ensure_version()
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as coord

    inner = coord.fetch_sub_module
    if getattr(inner, "_dalle_ds_no_autocast", False):
        return

    @functools.wraps(inner)
    def fetch_sub_module(self, current_submodule, forward):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return inner(self, current_submodule, forward)

    fetch_sub_module._dalle_ds_no_autocast = True
    coord.fetch_sub_module = fetch_sub_module


# Where DeepSpeed takes LOCAL_RANK as a CUDA device index (checked by tests/test_deepspeed_internals.py):
# (dotted function, a line of its source that must still be there)
LOCAL_RANK_AS_DEVICE_SOURCES = (
    ("deepspeed.runtime.engine:DeepSpeedEngine._configure_with_arguments",
     "self.local_rank = int(os.environ['LOCAL_RANK'])"),
    ("deepspeed.runtime.engine:DeepSpeedEngine._set_distributed_vars", "get_accelerator().set_device(device_rank)"),
    ("deepspeed.runtime.zero.partition_parameters:Init.__init__",
     'torch.device(get_accelerator().device_name(os.environ["LOCAL_RANK"]))'),
)


def is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def local_and_full_numel(p: torch.nn.Parameter) -> tuple[int, int]:
    """(elements stored on this rank, elements of the full parameter)."""
    if is_partitioned(p):
        return p.ds_tensor.numel(), p.ds_numel
    return p.numel(), p.numel()


def param_id(p: torch.nn.Parameter) -> int | None:
    return getattr(p, "ds_id", None)


# ---------------------------------------------------------------- checkpoints


def fp32_state_dict_from_zero_checkpoint(root: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 full parameters of checkpoint ``root/tag`` (offline, one process; no huggingface_hub)."""
    ensure_version()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


@contextlib.contextmanager
def node_local_checkpoint(ds_engine: Any, partition_group: Any, writes: bool) -> Iterator[None]:
    """Within this block ``ds_engine.save_checkpoint`` / ``load_checkpoint`` treat ``partition_group`` (the
    ranks ZeRO-3 partitions parameters over: one node under hierarchical ZeRO) as the whole data-parallel
    world: DeepSpeed names its files by the rank in that group and records ``partition_count`` and
    ``dp_world_size`` = its size, so the files of one node are a complete flat ZeRO-3 checkpoint of that
    many ranks (``zero_to_fp32`` reads it; another number of nodes of the same size loads it, each rank
    the file of its node-local rank). ``writes=False`` (the ranks of every other node) suppresses every
    file DeepSpeed would write; those ranks still take part in the save's collectives. Without this,
    DeepSpeed keys files by the global rank, so every node wrote a full copy of the optimizer state
    and ``partition_count`` claimed world-size partitions of a node-size split."""
    import torch.distributed as torch_dist

    ensure_version()
    opt = ds_engine.optimizer
    if not hasattr(opt, "dp_process_group") or not hasattr(opt, "partition_count"):
        raise TypeError(f"node_local_checkpoint needs a ZeRO-3 optimizer, got {type(opt).__name__}")
    saved = (opt.dp_process_group, opt.partition_count, ds_engine.seq_dp_world_size,
             ds_engine.save_zero_checkpoint, ds_engine.save_non_zero_checkpoint)
    size = torch_dist.get_world_size(partition_group)
    opt.dp_process_group, opt.partition_count, ds_engine.seq_dp_world_size = partition_group, size, size
    if not writes:
        ds_engine.save_zero_checkpoint = ds_engine.save_non_zero_checkpoint = False
    try:
        yield
    finally:
        (opt.dp_process_group, opt.partition_count, ds_engine.seq_dp_world_size,
         ds_engine.save_zero_checkpoint, ds_engine.save_non_zero_checkpoint) = saved


def zero3_state_tensors(opt: Any, params: Any = ()) -> dict[str, list[torch.Tensor]]:
    """The tensors holding a ZeRO-3 optimizer's model state on this rank, by kind (#14, planner check):
    ``params`` (the 16/32-bit flat partitions), ``master`` (master partitions; the same storage as the
    parameters when DeepSpeed aliases them), ``grads`` (the flat gradient-partition buffer),
    ``optimizer`` (the client optimizer's state tensors with more than one element), ``persistent``
    (full copies of parameters below ``stage3_param_persistence_threshold``, from ``params``)."""
    opt_state = [t for st in opt.optimizer.state.values() for t in st.values()
                 if isinstance(t, torch.Tensor) and t.numel() > 1]
    return {"params": [t for t in opt.fp16_partitioned_groups_flat if t is not None],
            "master": [t for t in opt.fp32_partitioned_groups_flat if t is not None],
            "grads": [opt.grad_partitions_flat_buffer] if opt.grad_partitions_flat_buffer is not None else [],
            "optimizer": opt_state,
            "persistent": [p.data for p in params if getattr(p, "ds_persist", False)]}
