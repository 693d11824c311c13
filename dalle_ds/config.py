"""Typed, validated configuration: YAML preset -> dataclass sections -> dotted overrides.

Precedence: command line > preset file > dataclass defaults. Every component receives only
its own section (``Prior(cfg.model)``, ``DiscreteVAE(cfg.dvae)``,
``dalle_ds.parallel.engine.OptimSpec.from_optim(cfg.optim)``). Unknown keys, wrong types and
inconsistent values raise :class:`ConfigError` naming the key and the value; :func:`at_least`
does the same for the plain flags of the offline jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names both."""


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def at_least(lo: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type``: the flag's value as ``kind``, refused below ``lo`` (the error names the value)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {kind.__name__}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {lo}")
        return value

    parse.__name__ = kind.__name__
    return parse


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    dir: str = "runs/default"
    seed: int = 1234

    def validate(self, p: str = "run") -> None:
        _require(bool(self.dir), f"{p}.dir", self.dir, "must be a non-empty path")
        _require(self.seed >= 0, f"{p}.seed", self.seed, "must be >= 0")


@dataclass
class DataConfig:
    """Shards, tokenizer and loader settings (batch sizes live in optim / dvae_train)."""

    # No defaults: a run names its data (train_dvae needs image_shards; train needs token_shards + tokenizer).
    image_shards: str = ""  # image shards: folder, brace range, glob, list or s3:// prefix
    token_shards: str = ""  # token shards from data_prep/tokenize_images.py (manifest.json beside them)
    tokenizer: str = ""  # tokenizer.json from data_prep/train_text_tokenizer.py, local or s3://
    dvae: str = ""  # exported dVAE the token shards were made with; when set, training checks its hash
    image_size: int = 256  # side of the square image the dVAE sees
    bpe_dropout: float = 0.1  # paper: 0.1 during prior training
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000
    validation_fraction: float = 0.0  # token shards held out (by name hash) for the prior's validation loss
    validation_shards: str = ""  # or: separate token shards for it (then validation_fraction must be 0)
    token_views: int = 0  # augmented views per image to use from the token shards: 0 = all the manifest has
    max_bad_fraction: float = 0.001  # corrupt samples are skipped and counted; more than this fraction: an error
    caption_dropout: float = 0.0  # prior: this fraction of captions replaced by the empty one, for
                                  # classifier-free guidance at sampling (not in the paper; 0 = off)

    def validate(self, p: str = "data") -> None:
        _require(self.image_size >= 8, f"{p}.image_size", self.image_size, "must be >= 8")
        _require(0.0 <= self.bpe_dropout < 1.0, f"{p}.bpe_dropout", self.bpe_dropout, "must be in [0, 1)")
        _require(0.0 <= self.max_bad_fraction < 1.0, f"{p}.max_bad_fraction", self.max_bad_fraction,
                 "must be in [0, 1)")
        _require(self.num_workers >= 0, f"{p}.num_workers", self.num_workers, "must be >= 0")
        _require(self.shuffle_buffer >= 0, f"{p}.shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        _require(0.0 <= self.validation_fraction < 1.0, f"{p}.validation_fraction",
                 self.validation_fraction, "must be in [0, 1)")
        _require(not (self.validation_shards and self.validation_fraction), f"{p}.validation_shards",
                 self.validation_shards, "set either data.validation_shards or data.validation_fraction, not both")
        _require(self.token_views >= 0, f"{p}.token_views", self.token_views, "must be >= 0 (0: all views)")
        _require(0.0 <= self.caption_dropout < 1.0, f"{p}.caption_dropout", self.caption_dropout, "must be in [0, 1)")


@dataclass
class DVAEConfig:
    """dVAE architecture (paper App. A): n_hid 256, 4 groups x 2 blocks, 8192 codes, /8."""

    channels: int = 3
    n_hid: int = 256
    n_blk_per_group: int = 2
    group_count: int = 4  # downsampling factor is 2 ** (group_count - 1)
    codebook_size: int = 8192
    n_init: int = 128  # decoder input width after the 1x1 conv from the codes

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def validate(self, p: str = "dvae") -> None:
        _require(self.channels in (1, 3), f"{p}.channels", self.channels, "must be 1 or 3")
        for name in ("n_hid", "n_blk_per_group", "n_init"):
            _require(getattr(self, name) >= 1, f"{p}.{name}", getattr(self, name), "must be >= 1")
        _require(self.n_hid % 4 == 0, f"{p}.n_hid", self.n_hid, "must be divisible by 4 (bottleneck)")
        _require(self.group_count >= 1, f"{p}.group_count", self.group_count, "must be >= 1")
        _require(2 <= self.codebook_size <= 65536, f"{p}.codebook_size", self.codebook_size,
                 "must be in [2, 65536] (codes are stored as uint16)")


@dataclass
class DVAETrainConfig:
    """dVAE training schedules (paper App. A.2); lengths scale with the preset."""

    micro_batch_size: int = 8
    max_steps: int = 3_000_000
    lr_start: float = 1e-4
    lr_end: float = 1.25e-6
    lr_steps: int = 1_200_000
    kl_weight_max: float = 6.6  # beta, cosine 0 -> 6.6
    kl_weight_steps: int = 5_000
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_steps: int = 150_000
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    # Not in the paper; the tiny preset needs them on its flat-colour corpus (dalle_ds/models/dvae_loss.py says why).
    recon_loss: Literal["logit_laplace", "mse"] = "logit_laplace"
    mse_weight: float = 100.0  # recon_loss=mse: a Gaussian NLL with sigma^2 = 1 / (2 * mse_weight)
    marginal_kl_weight: float = 0.0  # extra weight on KL(batch-mean code distribution || uniform)

    def loss_spec(self):
        from dalle_ds.models.dvae_loss import DVAELossSpec

        return DVAELossSpec(self.recon_loss, self.mse_weight, self.marginal_kl_weight)

    def validate(self, p: str = "dvae_train") -> None:
        for name in ("micro_batch_size", "max_steps", "lr_steps", "kl_weight_steps", "tau_steps"):
            _require(getattr(self, name) >= 1, f"{p}.{name}", getattr(self, name), "must be >= 1")
        _require(self.lr_start > 0 and self.lr_end > 0, f"{p}.lr_start", self.lr_start, "learning rates must be > 0")
        _require(0 < self.tau_end <= self.tau_start, f"{p}.tau_end", self.tau_end, "must be in (0, tau_start]")
        _require(self.kl_weight_max >= 0, f"{p}.kl_weight_max", self.kl_weight_max, "must be >= 0")
        _require(0 <= self.ema_decay < 1, f"{p}.ema_decay", self.ema_decay, "must be in [0, 1)")
        _require(self.mse_weight > 0, f"{p}.mse_weight", self.mse_weight, "must be > 0")
        _require(self.marginal_kl_weight >= 0, f"{p}.marginal_kl_weight", self.marginal_kl_weight, "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas", self.betas,
                 "must be two values in [0, 1)")


AttentionBackend = Literal["dense", "sparse", "flex"]


@dataclass
class ModelConfig:
    """The transformer prior (paper §2.2, App. B). Paper: 64 layers, 62 heads x 64 = 3968."""

    n_layers: int = 64
    n_heads: int = 62
    d_model: int = 3968
    mlp_ratio: int = 4
    text_len: int = 256
    text_vocab_size: int = 16384
    image_grid: int = 32  # image tokens per side: data.image_size // dvae.downsample
    image_vocab_size: int = 8192  # = dvae.codebook_size
    conv_kernel: int = 11  # convolutional attention neighbourhood (last layer)
    attention: AttentionBackend = "sparse"
    # image->image attention per layer: "paper" (row / column / conv, Figure 11) or "causal" (every
    # earlier image token in every layer: a plain decoder, for models too shallow for the sparse hops)
    layer_pattern: Literal["paper", "causal"] = "paper"
    activation_checkpointing: bool = True
    text_loss_weight: float = 1.0 / 8
    image_loss_weight: float = 7.0 / 8
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def image_len(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    def validate(self, p: str = "model") -> None:
        for name in ("n_layers", "n_heads", "d_model", "mlp_ratio", "text_len", "text_vocab_size",
                     "image_grid", "image_vocab_size"):
            _require(getattr(self, name) >= 1, f"{p}.{name}", getattr(self, name), "must be >= 1")
        _require(self.d_model % self.n_heads == 0, f"{p}.n_heads", self.n_heads,
                 f"must divide model.d_model={self.d_model}")
        _require(self.layer_pattern in ("paper", "causal"), f"{p}.layer_pattern", self.layer_pattern,
                 "must be 'paper' or 'causal'")
        _require(self.conv_kernel >= 1 and self.conv_kernel % 2 == 1, f"{p}.conv_kernel", self.conv_kernel,
                 "must be a positive odd number")
        _require(self.text_loss_weight >= 0 and self.image_loss_weight >= 0, f"{p}.text_loss_weight",
                 self.text_loss_weight, "loss weights must be >= 0")
        _require(self.text_loss_weight + self.image_loss_weight > 0, f"{p}.image_loss_weight",
                 self.image_loss_weight, "loss weights must not both be 0")


@dataclass
class OptimConfig:
    """Prior optimisation (paper App. B.2): AdamW, warm-up then halve on plateau."""

    micro_batch_size: int = 1  # per rank, per forward
    grad_accum_steps: int = 1
    global_batch_size: int = 0  # 0 = unset; else grad_accum_steps = this / (ranks x micro_batch_size)
    max_steps: int = 430_000
    lr: float = 4.5e-4
    betas: tuple[float, float] = (0.9, 0.96)
    eps: float = 1e-8
    weight_decay: float = 4.5e-2  # not applied to gains, biases, embeddings
    warmup_steps: int = 5_000
    grad_clip: float = 4.0  # applied during warm-up only (paper)
    plateau_patience: int = 5_000  # updates without improvement before halving
    plateau_threshold: float = 1e-3  # relative improvement that counts
    max_halvings: int = 5
    plateau_ema: float = 0.98  # smoothing of the training loss the plateau test looks at
    schedule: Literal["plateau", "cosine"] = "plateau"  # after warm-up: halve on plateau (paper) or cosine decay
    min_lr_ratio: float = 0.1  # cosine: the lr at max_steps, as a fraction of lr

    def validate(self, p: str = "optim") -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "plateau_patience"):
            _require(getattr(self, name) >= 1, f"{p}.{name}", getattr(self, name), "must be >= 1")
        _require(self.global_batch_size >= 0, f"{p}.global_batch_size", self.global_batch_size,
                 "must be >= 0 (0: set by grad_accum_steps)")
        _require(self.lr > 0, f"{p}.lr", self.lr, "must be > 0")
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.grad_clip >= 0, f"{p}.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        _require(self.max_halvings >= 0, f"{p}.max_halvings", self.max_halvings, "must be >= 0")
        _require(0 <= self.plateau_ema < 1, f"{p}.plateau_ema", self.plateau_ema, "must be in [0, 1)")
        _require(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas", self.betas,
                 "must be two values in [0, 1)")

    def for_world(self, world_size: int) -> "OptimConfig":
        """This section with ``grad_accum_steps`` derived from ``global_batch_size`` (when set) for
        ``world_size`` data-parallel ranks: fewer ranks accumulate more, so the global batch holds."""
        if not self.global_batch_size:
            return self
        per_pass = self.micro_batch_size * world_size
        _require(self.global_batch_size % per_pass == 0, "optim.global_batch_size", self.global_batch_size,
                 f"must be a multiple of optim.micro_batch_size x ranks = {self.micro_batch_size} x {world_size}"
                 f" = {per_pass}")
        accum = self.global_batch_size // per_pass
        _require(self.grad_accum_steps in (1, accum), "optim.grad_accum_steps", self.grad_accum_steps,
                 f"conflicts with optim.global_batch_size={self.global_batch_size} (which gives {accum} on "
                 f"{world_size} ranks): set one of them")
        return dataclasses.replace(self, grad_accum_steps=accum)


@dataclass
class PrecisionConfig:
    """Per-resblock gradient scaling for fp16 (paper App. D). Precision itself is chosen by
    the DeepSpeed JSON (fp16 / bf16 / fp32); these settings only apply under fp16."""

    block_scaling: bool = True  # false under fp16: DeepSpeed's own fp16 (whole model half, one scale)
    # initial scale = A * 2**init_scale_log2, clamped to A * [2**min_scale_log2, 2**max_scale_log2],
    # A = gradient-accumulation steps, whatever the number of ranks (#15; block_scaling's docstring)
    init_scale_log2: float = 13.0
    min_scale_log2: float = 7.0
    max_scale_log2: float = 24.0
    growth_per_update_log2: float = 1.0 / 1000  # x 2**(1/1000) after a finite update
    backoff_log2: float = 0.5  # / sqrt(2) after an overflow
    backoff_hysteresis: int = 125  # no two decreases of one scale within this many updates
    allow_fp16_on_cpu: bool = False  # DeepSpeed refuses fp16 on CPU; tests enable it explicitly
    # Branch compute dtype under a bf16 DeepSpeed JSON (#14): "float16" runs the resblock branches in
    # fp16 with block scaling over bf16 storage (V100: fp16 tensor cores), mode "fp16_block16";
    # "auto" = the JSON's dtype. The model-state regime itself is the JSON's: bf16 with
    # bf16_master_weights_and_grads + bf16_optimizer_states = 16-bit (AdamW16), else fp32 master.
    branch_dtype: Literal["auto", "float16"] = "auto"

    def validate(self, p: str = "precision") -> None:
        _require(self.min_scale_log2 <= self.init_scale_log2 <= self.max_scale_log2, f"{p}.init_scale_log2",
                 self.init_scale_log2, "must lie in [min_scale_log2, max_scale_log2]")
        _require(self.growth_per_update_log2 >= 0, f"{p}.growth_per_update_log2", self.growth_per_update_log2,
                 "must be >= 0")
        _require(self.backoff_log2 > 0, f"{p}.backoff_log2", self.backoff_log2, "must be > 0")
        _require(self.backoff_hysteresis >= 0, f"{p}.backoff_hysteresis", self.backoff_hysteresis, "must be >= 0")


@dataclass
class PowerSGDConfig:
    """Cross-node gradient compression (paper App. E). ZeRO-3 shards within a node group."""

    enabled: bool = False  # true: ZeRO-3 within node groups + PowerSGD across them
    hierarchical: bool = False  # with enabled=false: ZeRO-3 within node groups + exact fp32 average across
    node_size: int = 0  # ranks per ZeRO partition group; 0 = ranks per node from the launcher
    rank: int = 896  # paper: 896 for the 12B model
    min_compression_numel: int = 65536  # smaller shards are all-reduced exactly
    warm_start: bool = False  # paper: a fixed random Q works; resampling hurt
    orthogonalization_eps: float = 1e-6
    comm_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    # Where the fp32 error-feedback buffers live (#14). gpu: beside the gradient shards (the accelerator;
    # the CPU on CPU runs). host: host memory (pinned where CUDA exists), staged through the accelerator
    # one bucket at a time at the update: frees 3.53 GB per V100 for the paper preset (README, Memory plan).
    error_buffer_device: Literal["gpu", "host"] = "gpu"

    def validate(self, p: str = "powersgd") -> None:
        _require(self.node_size >= 0, f"{p}.node_size", self.node_size, "must be >= 0")
        _require(self.rank >= 1, f"{p}.rank", self.rank, "must be >= 1")
        _require(self.min_compression_numel >= 1, f"{p}.min_compression_numel", self.min_compression_numel,
                 "must be >= 1")
        _require(self.orthogonalization_eps >= 0, f"{p}.orthogonalization_eps", self.orthogonalization_eps,
                 "must be >= 0")


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints plus the project's own state; `latest` moves only after a full save."""

    every_steps: int = 1000
    keep_last: int = 3
    resume: bool = True  # resume from <run.dir>/checkpoints/latest when present

    def validate(self, p: str = "checkpoint") -> None:
        _require(self.every_steps >= 1, f"{p}.every_steps", self.every_steps, "must be >= 1")
        _require(self.keep_last >= 1, f"{p}.keep_last", self.keep_last, "must be >= 1")


@dataclass
class LoggingConfig:
    """Stdout, TensorBoard and W&B cadence."""

    every_steps: int = 10
    tensorboard: bool = True
    image_every_steps: int = 1000  # sample / reconstruction grids
    validate_every_steps: int = 0  # prior: validation loss on held-out token shards every K updates (0: off)
    validation_batches: int = 4  # ... micro-batches per rank per validation (the same ones every time)
    sample_captions: list[str] = field(default_factory=list)  # prior: captions of the training-time sample grid
    sample_count: int = 8  # ... when empty: the first distinct captions of the validation shards
    samples_per_caption: int = 4
    sample_temperature: float = 1.0
    progress_bar: bool | Literal["auto"] = "auto"  # auto: a bar on a terminal, log lines otherwise (SLURM)
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    wandb_project: str = "dalle-ds"
    wandb_name: str = ""  # run name; "" = the run folder's name

    def validate(self, p: str = "logging") -> None:
        _require(self.every_steps >= 1, f"{p}.every_steps", self.every_steps, "must be >= 1")
        _require(self.image_every_steps >= 1, f"{p}.image_every_steps", self.image_every_steps, "must be >= 1")
        for name in ("validate_every_steps", "validation_batches", "sample_count", "samples_per_caption"):
            _require(getattr(self, name) >= (0 if name == "validate_every_steps" else 1), f"{p}.{name}",
                     getattr(self, name), "must be >= 0" if name == "validate_every_steps" else "must be >= 1")
        _require(self.sample_temperature >= 0, f"{p}.sample_temperature", self.sample_temperature, "must be >= 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    dvae_train: DVAETrainConfig = field(default_factory=DVAETrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    powersgd: PowerSGDConfig = field(default_factory=PowerSGDConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        # Cross-section consistency: one owner per value, derived values must agree.
        _require(self.model.image_vocab_size == self.dvae.codebook_size, "model.image_vocab_size",
                 self.model.image_vocab_size, f"must equal dvae.codebook_size={self.dvae.codebook_size}")
        _require(self.data.image_size % self.dvae.downsample == 0, "data.image_size", self.data.image_size,
                 f"must be divisible by the dVAE downsampling factor {self.dvae.downsample}")
        grid = self.data.image_size // self.dvae.downsample
        _require(self.model.image_grid == grid, "model.image_grid", self.model.image_grid,
                 f"must equal data.image_size // dvae.downsample = {self.data.image_size}//{self.dvae.downsample}"
                 f" = {grid}")
        _require(self.model.conv_kernel <= 2 * self.model.image_grid - 1, "model.conv_kernel",
                 self.model.conv_kernel, f"must be <= 2 * model.image_grid - 1 = {2 * self.model.image_grid - 1}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (a run folder keeps what it ran with)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)
        return path


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- typed construction


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        _require(value in typing.get_args(tp), key, value, f"must be one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}={value!r}: unexpected value")
    if origin is tuple:
        args = typing.get_args(tp)
        _require(isinstance(value, (list, tuple)), key, value, f"must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        _require(len(value) == len(args), key, value, f"must have {len(args)} elements")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        _require(isinstance(value, (list, tuple)), key, value, f"must be a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if tp is bool:
        _require(isinstance(value, bool), key, value, f"must be a bool, got {type(value).__name__}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, value,
                 f"must be an int, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value,
                 f"must be a number, got {type(value).__name__}")
        value = float(value)
        _require(math.isfinite(value), key, value, "must be finite")
        return value
    if tp is str:
        _require(isinstance(value, str), key, value, f"must be a string, got {type(value).__name__}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}={values!r}: must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}={values[unknown[0]]!r}: unknown key (known: {sorted(names)})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _deep_update(base: dict, update: dict) -> dict:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "model.attention=dense"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: an override must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"{dotted}={raw!r}: an override key must look like section.key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{dotted}={raw!r}: not a YAML value ({e})") from None
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def resolve_preset(name_or_path: str | Path) -> Path:
    """``tiny`` -> dalle_ds/configs/tiny.yaml; a path is used as is."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"config={str(name_or_path)!r}: no such file (presets: {presets})")
    return path


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- preset YAML <- dotted overrides, then validated."""
    values: dict[str, Any] = {}
    if preset is not None:
        path = resolve_preset(preset)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config={str(path)!r}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config={str(path)!r}: top level must be a mapping of sections")
        values = loaded
    values = _deep_update(values, parse_overrides(overrides or []))
    return _build(Config, values, "").validate()


def replace(section: Any, **changes: Any) -> Any:
    """A validated copy of one section with some fields changed (for tests and tools)."""
    new = dataclasses.replace(section, **changes)
    new.validate()
    return new
