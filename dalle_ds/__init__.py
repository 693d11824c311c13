"""dalle-ds: DALL·E (Ramesh et al. 2021) on DeepSpeed.

The public API, importable from the package root::

    from dalle_ds import Pipeline, load_config, Prior, DiscreteVAE

- the pipeline: :class:`Pipeline` (prior + dVAE + tokenizer + optional CLIP reranker),
  :func:`generate` and :class:`SamplingSettings` for lower-level sampling, :func:`load_prior`;
- configuration: :func:`load_config`, :class:`Config` and its sections, :class:`ConfigError`;
- models: :class:`Prior`, :class:`DiscreteVAE`, :func:`load_dvae`, :class:`TextTokenizer`.

Names resolve on first use, so ``import dalle_ds`` stays cheap (no torch import) for tools that
only want ``__version__``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Pipeline": "dalle_ds.sampling.pipeline",
    "SamplingSettings": "dalle_ds.sampling.generate",
    "generate": "dalle_ds.sampling.generate",
    "load_prior": "dalle_ds.sampling.generate",
    "Config": "dalle_ds.config",
    "ConfigError": "dalle_ds.config",
    "DataConfig": "dalle_ds.config",
    "DVAEConfig": "dalle_ds.config",
    "ModelConfig": "dalle_ds.config",
    "OptimConfig": "dalle_ds.config",
    "load_config": "dalle_ds.config",
    "Prior": "dalle_ds.models.prior",
    "DiscreteVAE": "dalle_ds.models.dvae",
    "load_dvae": "dalle_ds.models.dvae_io",
    "TextTokenizer": "dalle_ds.data.tokenizer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dalle_ds' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
