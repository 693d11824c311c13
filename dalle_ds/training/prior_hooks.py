"""What the prior trainer does between updates besides training: validation loss and sample grids.

    hooks = PriorHooks.from_config(cfg, validation_spec, tokenizer, info.is_main, extra_sample_hooks)
    for step in loop:
        values = ...one update...
        values.update(hooks.validate(step, engine, log))   # every rank, every step
        log.log(step, values)
        hooks.samples(step, engine, log)                    # every rank, every step

Validation (``logging.validate_every_steps`` K > 0, and the last step): text and image loss of the
prior on held-out token shards, ``data.validation_shards`` or the shards ``data.validation_fraction``
holds out of ``data.token_shards`` by name hash (:func:`split_token_shards`; the training loader
then reads the rest). Every rank runs exactly ``logging.validation_batches`` forward passes (an
infinite loader restarted at epoch 0: the same samples each time, and the same count on every rank,
which ZeRO-3's collective forwards need), under ``torch.no_grad`` in eval mode, then the sums are
all-reduced. Logged with split ``eval``: the line ``eval step N: loss=... text_loss=... image_loss=...``,
a row of ``<run.dir>/eval.jsonl`` and TensorBoard ``eval/loss``, ``eval/text_loss``, ``eval/image_loss``
(the skeleton's convention: held-out rows are the eval split); the train row of that step in
``metrics.jsonl`` (and its TensorBoard ``train/val_*``) gets ``val_loss``, ``val_text_loss`` and
``val_image_loss`` too. Rank 0 then redraws
``<run.dir>/learning_curve.png`` (:mod:`dalle_ds.training.curves`).

Samples (``logging.image_every_steps``, and the last step; needs ``data.dvae``): a fixed set of
captions (``logging.sample_captions``, else the first ``logging.sample_count`` distinct captions of
the validation shards, else of the training shards) x ``logging.samples_per_caption``, sampled with
the KV cache (``dalle_ds.sampling.generate``) from fixed seeds, so successive grids show the same
noise as training goes on; decoded by the dVAE into a grid (one row per caption), written to
``<run.dir>/samples/step_NNNNNNNN.png`` (+ ``.txt`` with the captions) and TensorBoard
``train/samples``. Under ZeRO-3 every rank joins the parameter gather; rank 0 copies the full weights
into a plain replica and samples while the others wait at the next collective.

Caption dropout (``data.caption_dropout`` p > 0; a departure from the paper, off in its preset):
:class:`CaptionDropout` replaces the caption of a fraction p of the training rows with the empty
caption (all ``[PAD]``), so the same prior also models images without a caption and sampling can
use classifier-free guidance (``dalle_ds.sampling.generate``, ``guidance_scale``). Which rows are
dropped is a function of (seed, rank, batch index): a resumed run drops the same rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as torch_dist

from dalle_ds.parallel.dist import all_reduce_values, print0

SAMPLE_SEED = 10_000


def split_token_shards(cfg) -> tuple[str | list[str], str | list[str] | None]:
    """(training shards, validation shards or None) from ``data.token_shards``,
    ``data.validation_shards`` and ``data.validation_fraction``."""
    if cfg.data.validation_shards:
        return cfg.data.token_shards, cfg.data.validation_shards
    if cfg.data.validation_fraction > 0:
        from dalle_ds.data import storage
        from dalle_ds.data.loaders import holdout_split

        train, val = holdout_split(storage.expand_urls(cfg.data.token_shards), cfg.data.validation_fraction)
        if not val:
            return cfg.data.token_shards, None
        return train, val
    return cfg.data.token_shards, None


def _reduce_sum(values: list[float]) -> list[float]:
    return all_reduce_values(values)  # float64 on the backend's device (cuda:LOCAL_RANK%count under NCCL)


class Validator:
    """Held-out loss of the prior: ``batches`` micro-batches per rank, the same ones every call."""

    def __init__(self, loader, batches: int, text_len: int, image_len: int):
        self.loader, self.batches = loader, batches
        self.text_targets, self.image_targets = max(text_len - 1, 0), image_len

    @classmethod
    def from_config(cls, cfg, spec, tokenizer) -> "Validator":
        from dalle_ds.data.loaders import TokenShardLoader

        m = cfg.model
        loader = TokenShardLoader(spec, cfg.optim.micro_batch_size, tokenizer=tokenizer, grid=m.image_grid,
                                  codebook_size=m.image_vocab_size, bpe_dropout=0.0, num_workers=0,
                                  seed=cfg.run.seed, shuffle=False, infinite=True, use_views=1,
                                  views=_manifest_views(spec))
        return cls(loader, cfg.logging.validation_batches, m.text_len, m.image_len)

    @torch.no_grad()
    def __call__(self, engine) -> dict[str, float]:
        """Collective: every rank must call it at the same step."""
        t0 = time.perf_counter()
        module = engine.ds.module if hasattr(engine, "ds") else engine.model
        was_training = module.training
        module.eval()
        self.loader.set_epoch(0)
        batches = iter(self.loader)
        sums = [0.0, 0.0, 0.0, 0.0]  # text loss x targets, text targets, image loss x targets, image targets
        try:
            for _ in range(self.batches):
                batch = next(batches)
                _, parts = engine(batch["text"], batch["codes"])
                b = batch["codes"].shape[0]
                sums[0] += float(parts["text_loss"]) * b * self.text_targets
                sums[1] += b * self.text_targets
                sums[2] += float(parts["image_loss"]) * b * self.image_targets
                sums[3] += b * self.image_targets
        finally:
            module.train(was_training)
        text_sum, text_n, image_sum, image_n = _reduce_sum(sums)
        text_loss = text_sum / text_n if text_n else 0.0
        image_loss = image_sum / image_n
        w = getattr(getattr(module, "model", module), "cfg", None)
        tw, iw = (w.text_loss_weight, w.image_loss_weight) if w is not None else (1.0 / 8, 7.0 / 8)
        return {"loss": tw * text_loss + iw * image_loss, "text_loss": text_loss, "image_loss": image_loss,
                "samples": int(round(image_n / self.image_targets)), "seconds": round(time.perf_counter() - t0, 3)}


def _manifest_views(spec) -> int:
    """``views`` of the token shards' manifest (``tokenize_images --views``); 1 when absent."""
    views = {int(m.get("views", 1)) for m in _read_manifests(spec)} or {1}
    if len(views) > 1:
        raise ValueError(f"{spec}: token shards with different view counts {sorted(views)}")
    return views.pop()


def _read_manifests(spec) -> list[dict]:
    from dalle_ds.data import storage
    from dalle_ds.data.shards import MANIFEST

    folders = {u.rsplit("/", 1)[0] if "/" in u else "." for u in storage.expand_urls(spec)}
    return [storage.read_json(storage.join(f, MANIFEST)) for f in sorted(folders)
            if storage.exists(storage.join(f, MANIFEST))]


def token_views(spec) -> int:
    """Views per image in the token shards at ``spec`` (1 for shards without a ``views`` manifest field)."""
    return _manifest_views(spec)


def first_captions(spec, count: int) -> list[str]:
    """The first ``count`` distinct captions of shards ``spec`` in stored order."""
    from dalle_ds.data import storage
    from dalle_ds.data.loaders import iter_shard

    out: list[str] = []
    for url in storage.expand_urls(spec):
        for s in iter_shard(url):
            c = s["txt"].decode("utf-8").strip() if "txt" in s else None
            if c and c not in out:
                out.append(c)
                if len(out) == count:
                    return out
    return out


class CaptionDropout:
    """Batch transform: each row's caption becomes the empty caption (all ``[PAD]``) with probability p.

    Stateful (``state_dict``: the number of batches seen), so a resumed run draws what the uninterrupted
    one would have; rank-dependent, so the ranks drop different rows."""

    def __init__(self, p: float, seed: int, rank: int, pad_id: int = 0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"data.caption_dropout={p}: must be in [0, 1)")
        self.p, self.seed, self.rank, self.pad_id = p, seed, rank, pad_id
        self.batches = 0

    def __call__(self, batch: dict) -> dict:
        self.batches += 1
        if self.p == 0.0:
            return batch
        text = batch["text"]  # (B, T)
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.batches) % 2**63)
        drop = torch.rand(text.shape[0], generator=g) < self.p  # (B,)
        return {**batch, "text": text.masked_fill(drop[:, None].to(text.device), self.pad_id)}

    def wrap(self, batches):
        """The batch iterator with captions dropped."""
        for batch in batches:
            yield self(batch)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "p": self.p}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


class SampleHook:
    """A grid of samples for fixed captions and seeds: ``hook(step, engine, log)`` on every rank."""

    def __init__(self, model_cfg, captions: list[str], per_caption: int, temperature: float, dvae: str,
                 tokenizer, run_dir: str | Path, main: bool):
        self.model_cfg, self.captions, self.per_caption = model_cfg, captions, per_caption
        self.temperature, self.run_dir, self.main = temperature, Path(run_dir), main
        self.replica = self.vae = None
        if main:
            from dalle_ds.models.dvae_io import load_dvae
            from dalle_ds.models.prior import Prior

            self.vae = load_dvae(dvae).eval()
            self.replica = Prior(model_cfg).eval()  # plain fp32 copy, refreshed before each grid
            self.text = tokenizer.encode(captions).repeat_interleave(per_caption, 0)  # (M * P, T)
        self.seeds = [SAMPLE_SEED + i for i in range(len(captions) * per_caption)]

    @classmethod
    def from_config(cls, cfg, tokenizer, validation_spec, main: bool) -> "SampleHook | None":
        if not cfg.data.dvae:
            print0("train: no data.dvae, so no training-time sample grids")
            return None
        captions = list(cfg.logging.sample_captions) or first_captions(
            validation_spec or cfg.data.token_shards, cfg.logging.sample_count)
        return cls(cfg.model, captions, cfg.logging.samples_per_caption, cfg.logging.sample_temperature,
                   cfg.data.dvae, tokenizer, cfg.run.dir, main)

    def _refresh(self, engine) -> None:
        """Collective under ZeRO-3: the full weights into rank 0's replica."""
        from dalle_ds.parallel import deepspeed_internals as ds_internals

        model = engine.model
        params = list(model.parameters())
        if any(ds_internals.is_partitioned(p) for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.main:
                    self.replica.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
        elif self.main:
            self.replica.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """(3, H, W) in [0, 1]: one row per caption."""
        from dalle_ds.sampling.generate import SamplingSettings, generate
        from dalle_ds.sampling.grids import grid_image

        settings = SamplingSettings(temperature=self.temperature)
        codes = generate(self.replica, self.text, self.seeds, settings)  # (M * P, N), KV cache
        images = self.vae.decode(codes).float().clamp(0, 1)  # (M * P, 3, H, W)
        scale = max(1, 64 // images.shape[-1])  # small images shown at >= 64 px (nearest: codes stay visible)
        if scale > 1:
            images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        pil = grid_image(images, cols=self.per_caption)
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255

    def __call__(self, step: int, engine, log=None) -> Path | None:
        self._refresh(engine)
        if not self.main:
            return None
        from dalle_ds.sampling.grids import to_pil

        t0 = time.perf_counter()
        grid = self.grid()
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(grid).save(path)
        path.with_suffix(".txt").write_text("\n".join(self.captions) + "\n")
        if log is not None:
            log.image("samples", grid, step)
            log.echo(f"train step {step}: sample grid {path} ({len(self.seeds)} samples, "
                     f"{time.perf_counter() - t0:.1f} s)")
        return path


class PriorHooks:
    """Validation and samples at their cadences (and the last step), plus any caller sample hooks."""

    def __init__(self, cfg, validator: Validator | None, sampler: SampleHook | None,
                 extra: list[Callable] | None = None, main: bool = True):
        self.cfg, self.validator, self.sampler, self.extra, self.main = cfg, validator, sampler, extra or [], main

    @classmethod
    def from_config(cls, cfg, validation_spec, tokenizer, main: bool, extra: list[Callable] | None = None
                    ) -> "PriorHooks":
        validator = None
        if validation_spec and cfg.logging.validate_every_steps:
            validator = Validator.from_config(cfg, validation_spec, tokenizer)
            print0(f"train: validation on {validation_spec} every {cfg.logging.validate_every_steps} updates "
                   f"({cfg.logging.validation_batches} x {cfg.optim.micro_batch_size} samples per rank)")
        sampler = SampleHook.from_config(cfg, tokenizer, validation_spec, main)
        return cls(cfg, validator, sampler, extra, main)

    def validate(self, step: int, engine, log) -> dict[str, Any]:
        """Collective (every rank, every step; works only at the cadence and the last step). Logs the
        eval row and returns ``val_loss``, ``val_text_loss``, ``val_image_loss`` for the train row (or {})."""
        k = self.cfg.logging.validate_every_steps
        if self.validator is None or not (step % k == 0 or step == self.cfg.optim.max_steps):
            return {}
        values = self.validator(engine)
        log.log(step, values, split="eval")
        if self.main and log.run_dir is not None:
            from dalle_ds.training.curves import write_learning_curve

            write_learning_curve(log.run_dir)
        return {f"val_{k}": values[k] for k in ("loss", "text_loss", "image_loss")}

    def samples(self, step: int, engine, log) -> None:
        """Collective (every rank, every step): the sample grid and the caller's hooks at their cadence."""
        if step % self.cfg.logging.image_every_steps == 0 or step == self.cfg.optim.max_steps:
            if self.sampler is not None:
                self.sampler(step, engine, log)
            for hook in self.extra:
                hook(step, engine)
