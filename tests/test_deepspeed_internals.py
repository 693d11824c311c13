"""dalle_ds/parallel/deepspeed_internals.py: every DeepSpeed internal we patch or read still exists in the
installed DeepSpeed with the parameters we call it with, the version check names both versions, the
skip switch and clipping knob work on stand-in optimisers, and no other module reaches into DeepSpeed."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from dalle_ds.parallel import deepspeed_internals as ds_internals

ROOT = Path(__file__).resolve().parent.parent


def unwrap(fn):
    """The function under DeepSpeed's ``instrument_w_nvtx`` (its ``wrapped_fn(*args, **kwargs)`` keeps
    the original only in its closure, as ``func``)."""
    fn = inspect.unwrap(fn)
    while getattr(fn, "__name__", "") == "wrapped_fn" and "func" in fn.__code__.co_freevars:
        fn = fn.__closure__[fn.__code__.co_freevars.index("func")].cell_contents
    return fn


def resolve(dotted: str):
    """``package.module:Class.attr`` -> the object (functions unwrapped)."""
    module, _, attr = dotted.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return unwrap(obj) if callable(obj) and not inspect.isclass(obj) else obj


def partition_grads_original():
    stage3 = ds_internals.stage3_class()
    return unwrap(ds_internals._ORIGINAL.get("partition_grads", stage3.partition_grads))


# ---------------------------------------------------------------- version pin


@pytest.mark.parametrize("name", ["requirements.txt", "constraints.txt"])
def test_pinned_version_matches_the_requirements(name):
    pins = re.findall(r"^deepspeed==(\S+)", (ROOT / name).read_text(), re.MULTILINE)
    assert pins == [ds_internals.DEEPSPEED_VERSION], (name, pins)


def test_installed_deepspeed_is_the_pinned_one():
    import deepspeed

    ds_internals.check_version(deepspeed.__version__, env={})
    ds_internals.ensure_version()
    ds_internals.check_version("0.19.8+local.build", pinned="0.19.8", env={})  # same release


def test_mismatched_version_is_an_error_naming_both_versions_and_the_way_out():
    with pytest.raises(ds_internals.DeepSpeedVersionError) as err:
        ds_internals.check_version("0.20.1", pinned="0.19.8", env={})
    msg = str(err.value)
    assert "DeepSpeed 0.20.1 is installed" in msg and "DeepSpeed 0.19.8" in msg, msg
    assert "pip install deepspeed==0.19.8" in msg and "DALLE_DS_ALLOW_DEEPSPEED_MISMATCH=1" in msg, msg
    with pytest.raises(ds_internals.DeepSpeedVersionError):
        ds_internals.check_version("0.19.80", pinned="0.19.8", env={})


def test_mismatch_allowed_by_the_environment_warns():
    with pytest.warns(RuntimeWarning, match=r"DeepSpeed 0\.18\.0 is installed"):
        ds_internals.check_version("0.18.0", pinned="0.19.8", env={ds_internals.ALLOW_MISMATCH_ENV: "1"})
    with pytest.raises(ds_internals.DeepSpeedVersionError):
        ds_internals.check_version("0.18.0", pinned="0.19.8", env={ds_internals.ALLOW_MISMATCH_ENV: "0"})


def test_first_use_checks_the_installed_version(monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    monkeypatch.setattr(ds_internals, "_version_checked", False)
    monkeypatch.delenv(ds_internals.ALLOW_MISMATCH_ENV, raising=False)
    with pytest.raises(ds_internals.DeepSpeedVersionError, match=r"DeepSpeed 0\.21\.0 is installed"):
        ds_internals.import_deepspeed()
    with pytest.raises(ds_internals.DeepSpeedVersionError):
        ds_internals.stage3_class()


# ---------------------------------------------------------------- the internals exist, with these parameters

STAGE3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"
SIGNATURES = [
    ("deepspeed.comm.torch:build_shm_op", []),
    ("deepspeed.accelerator.cpu_accelerator:CPU_Accelerator.is_fp16_supported", ["self"]),
    ("deepspeed.accelerator.abstract_accelerator:DeepSpeedAccelerator.is_fp16_supported", ["self"]),
    (STAGE3 + "._overflow_check_and_loss_scale_update", ["self", "update_scale"]),
    (STAGE3 + "._loss_scale_update_and_overflow_cleanup", ["self"]),
    (STAGE3 + "._get_param_partition_rank", ["self", "param"]),
    (STAGE3 + ".is_gradient_accumulation_boundary", ["self"]),
    (STAGE3 + ".step", ["self", "closure"]),
    (STAGE3 + ".unscale_and_clip_grads", ["self", "sub_group_id", "total_norm"]),
    ("deepspeed.runtime.engine:DeepSpeedEngine._take_model_step", ["self", "lr_kwargs"]),
    ("deepspeed.runtime.engine:DeepSpeedEngine._configure_zero_optimizer", ["self", "optimizer"]),
    ("deepspeed.runtime.engine:DeepSpeedEngine.gradient_clipping", ["self"]),
    ("deepspeed.utils.zero_to_fp32:get_fp32_state_dict_from_zero_checkpoint",
     ["checkpoint_dir", "tag", "exclude_frozen_parameters", "lazy_mode"]),
    ("deepspeed.runtime.zero.partition_parameters:Init._convert_to_deepspeed_param", ["self", "param"]),
]


@pytest.mark.parametrize("dotted,params", SIGNATURES, ids=[s[0].split(":")[-1] for s in SIGNATURES])
def test_internal_exists_with_expected_parameters(dotted, params):
    assert list(inspect.signature(resolve(dotted)).parameters) == params


def test_partition_grads_signature_and_the_padding_filter_we_repeat():
    fn = partition_grads_original()
    assert list(inspect.signature(fn).parameters) == ["self", "params_to_release", "grad_partitions"]
    # _partition_grads_then_hook drops the same padding-only shards DeepSpeed gives no buffer
    assert "param.partition_numel() * self._get_param_partition_rank(param) < param.ds_numel" in inspect.getsource(fn)


# (object, what its source must contain): attributes set or read, and the call sites we rely on
# node_local_checkpoint: every place DeepSpeed's save/load takes the dp rank, the dp world size or the
# "do I write" flags, which it swaps for the node's partition group for one save or load
NODE_LOCAL_CHECKPOINT = [
    ("_configure_checkpointing", "self.save_non_zero_checkpoint = True"),
    ("_configure_checkpointing", "self.save_zero_checkpoint = param_rank == dp_rank"),
    ("save_checkpoint", "if self.save_zero_checkpoint:"),
    ("_save_checkpoint", "if self.save_non_zero_checkpoint:"),
    ("_get_ckpt_name", "pp_rank = dist.get_rank(group=self.optimizer.dp_process_group)"),
    ("_get_zero_ckpt_name", "pp_rank = dist.get_rank(group=self.optimizer.dp_process_group)"),
    ("_common_checkpoint_state", "dp_world_size=self.seq_dp_world_size"),
    ("_load_zero_checkpoint", "self.seq_dp_world_size != self.loaded_checkpoint_dp_world_size"),
    ("_get_all_zero_checkpoint_names", "dp_world_size=self.loaded_checkpoint_dp_world_size"),
    ("_get_all_zero_checkpoint_state_dicts", "dist.get_rank(group=self.optimizer.dp_process_group) == i"),
]
SOURCES = [
    ("deepspeed.comm.torch:TorchBackend.__init__", "build_shm_op()"),
    (STAGE3 + ".__init__", "self.clip_grad = clip_grad"),
    (STAGE3 + ".__init__", "self.overflow = False"),
    (STAGE3 + ".__init__", "self.offload_optimizer = False"),
    (STAGE3 + ".unscale_and_clip_grads", "self.clip_grad"),
    (STAGE3 + "._overflow_check_and_loss_scale_update", "self.overflow = False"),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.__init__", "self.clip_grad = clip_grad"),
    ("deepspeed.runtime.engine:DeepSpeedEngine._take_model_step", "overflow = self.optimizer.overflow"),
    ("deepspeed.runtime.engine:DeepSpeedEngine.gradient_clipping", "self._config.gradient_clipping"),
    ("deepspeed.runtime.engine:DeepSpeedEngine._configure_zero_optimizer",
     "from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3"),
    ("deepspeed.runtime.config:DeepSpeedConfig._initialize_params", "self.gradient_clipping = "),
    (STAGE3 + ".step", "self._overflow_check_and_loss_scale_update(update_scale=False)"),
] + [("deepspeed.runtime.engine:DeepSpeedEngine." + fn, needle) for fn, needle in NODE_LOCAL_CHECKPOINT] + [
    (STAGE3 + ".__init__", "self.partition_count = dist.get_world_size(group=self.dp_process_group)"),
    (STAGE3 + "._rigid_state_dict", "state_dict[PARTITION_COUNT] = self.partition_count"),
    (STAGE3 + ".load_state_dict", "state_dict_list[dist.get_rank(group=self.dp_process_group)]"),
]
PARAM_ATTRIBUTES = ["param.ds_shape = ", "param.ds_numel = ", "param.ds_tensor = ", "param.ds_id = ",
                    "param.partition_numel = partition_numel"]


@pytest.mark.parametrize("dotted,needle", SOURCES, ids=[f"{s[0].split('.')[-1]}:{s[1][:30]}" for s in SOURCES])
def test_internal_source_holds(dotted, needle):
    assert needle in inspect.getsource(resolve(dotted)), (dotted, needle)


def test_zero3_parameter_attributes_are_set_by_zero_init():
    source = inspect.getsource(resolve("deepspeed.runtime.zero.partition_parameters"))
    missing = [a for a in PARAM_ATTRIBUTES if a not in source]
    assert not missing, missing


# ---------------------------------------------------------------- behaviour on stand-ins (one process)


class FakeStage3:
    """Stand-in for DeepSpeedZeroOptimizer_Stage3's overflow path."""

    def __init__(self, overflow=False):
        self.overflow, self._raw, self.cleanups = False, overflow, 0
        self.clip_grad = 1.0

    def _overflow_check_and_loss_scale_update(self, update_scale=True):
        self.overflow = self._raw
        return self.overflow if not update_scale else self._loss_scale_update_and_overflow_cleanup()

    def _loss_scale_update_and_overflow_cleanup(self):
        self.cleanups += 1
        return self.overflow


class FakeClientOptimizer:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("skip,raw,expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_skip_switch_on_zero3_is_an_overflow(skip, raw, expected):
    opt = FakeStage3(overflow=raw)
    ds_internals.install_skip_switch(opt, lambda: skip)
    assert opt._overflow_check_and_loss_scale_update() is expected
    assert opt.cleanups == 1 and ds_internals.step_overflowed(opt) is expected
    assert opt._overflow_check_and_loss_scale_update(update_scale=False) is expected and opt.cleanups == 1


def test_skip_switch_without_zero3_skips_the_client_step():
    opt, skip = FakeClientOptimizer(), [True]
    ds_internals.install_skip_switch(opt, lambda: skip[0])
    opt.step()
    assert opt.steps == 0 and ds_internals.step_overflowed(opt)
    skip[0] = False
    opt.step()
    assert opt.steps == 1 and not ds_internals.step_overflowed(opt)


def test_zero3_step_decides_the_skip_before_the_norm():
    """run_at_update_decision relies on the overflow check preceding the norm (and the update) in step."""
    source = inspect.getsource(resolve(STAGE3 + ".step"))
    assert source.index("_overflow_check_and_loss_scale_update(update_scale=False)") < source.index(
        "_get_norm_groups()") < source.index("_optimizer_step(")


@pytest.mark.parametrize("skip,raw,veto", [(False, False, False), (True, False, False), (False, True, False),
                                           (False, False, True)])
def test_update_decision_sees_the_skip_switch_and_may_veto(skip, raw, veto):
    opt, seen = FakeStage3(overflow=raw), []
    ds_internals.install_skip_switch(opt, lambda: skip)
    ds_internals.run_at_update_decision(opt, lambda skipped: seen.append(skipped) or veto)
    expected = skip or raw or veto
    assert opt._overflow_check_and_loss_scale_update() is expected
    assert seen == [skip or raw] and opt.cleanups == 1 and ds_internals.step_overflowed(opt) is expected


def test_gradient_clipping_goes_to_the_optimizer_or_the_engine_config():
    class Engine:
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self._config = type("Config", (), {"gradient_clipping": 0.0})()

    zero = Engine(FakeStage3())
    ds_internals.set_gradient_clipping(zero, 2)
    assert zero.optimizer.clip_grad == 2.0 and zero._config.gradient_clipping == 0.0
    plain = Engine(FakeClientOptimizer())
    ds_internals.set_gradient_clipping(plain, 0.5)
    assert plain._config.gradient_clipping == 0.5


def test_call_after_step_runs_after_each_step():
    opt, calls = FakeClientOptimizer(), []
    ds_internals.call_after_step(opt, lambda: calls.append(opt.steps))
    opt.step()
    opt.step()
    assert calls == [1, 2]


# ---------------------------------------------------------------- ownership: nobody else reaches in

OTHERS = ["engine.py", "hierarchy.py", "block_scaling.py", "checkpoint.py", "powersgd.py"]
FORBIDDEN = [r"deepspeed\.runtime", r"zero_to_fp32\b", r"deepspeed\.accelerator", r"deepspeed\.comm\.torch",
             r"\._config\b", r"\.clip_grad\b", r"_get_param_partition_rank", r"_overflow_check",
             r"\bpartition_numel\b", r"\.ds_(tensor|numel|shape|id)\b", r"is_fp16_supported\s*=",
             r"save_(non_)?zero_checkpoint\b", r"seq_dp_world_size", r"\.dp_process_group\b", r"\.partition_count\b"]


@pytest.mark.parametrize("name", OTHERS)
def test_other_parallel_modules_leave_deepspeed_internals_to_the_one_module(name):
    text = (ROOT / "dalle_ds" / "parallel" / name).read_text()
    code = re.sub(r'""".*?"""', "", text, flags=re.DOTALL)  # docstrings may name the internals
    hits = [pat for pat in FORBIDDEN if re.search(pat, code)]
    assert not hits, f"{name} touches DeepSpeed internals {hits}: go through deepspeed_internals.py"


@pytest.mark.parametrize("dotted,needle", ds_internals.LOCAL_RANK_AS_DEVICE_SOURCES)
def test_deepspeed_takes_local_rank_as_the_cuda_index(dotted, needle):
    """dist.init_distributed rewrites LOCAL_RANK to LOCAL_RANK % device_count because of these lines (#14)."""
    assert needle in inspect.getsource(resolve(dotted)), (dotted, needle)


def test_fetch_sub_module_signature_for_the_autocast_free_gather():
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as coord

    ds_internals.gather_params_outside_autocast()
    fn = coord.fetch_sub_module
    assert getattr(fn, "_dalle_ds_no_autocast", False)
    original = unwrap(inspect.unwrap(fn))  # through our wrapper, then DeepSpeed's instrument_w_nvtx
    assert list(inspect.signature(original).parameters) == ["self", "current_submodule", "forward"]
    assert ".wait()" in inspect.getsource(original)


def test_create_fp32_partitions_row_for_the_aliased_master():
    """alias_master_partitions relies on _create_fp32_partitions(self) comparing a partition's device with
    ``self.device`` (a string in 0.19.8: never equal to a torch.device under torch 2.13)."""
    import torch

    stage3 = ds_internals.stage3_class()
    original = ds_internals._ORIGINAL.get("_create_fp32_partitions", stage3._create_fp32_partitions)
    assert list(inspect.signature(original).parameters) == ["self"]
    assert ".device == self.device" in inspect.getsource(original)
    assert torch.device("cpu") != "cpu"  # why the wrapper turns self.device into a torch.device
    ds_internals.alias_master_partitions()
    ds_internals.alias_master_partitions()  # idempotent
    assert stage3._create_fp32_partitions is ds_internals._create_fp32_partitions_aliased
