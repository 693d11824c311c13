"""Inputs checked before a trainer starts DeepSpeed: fail in seconds, not after the engine is built.

    preflight.prior_inputs(cfg)              # token shards + manifest, tokenizer, dVAE export
    preflight.dvae_inputs(cfg, eval_shards)  # image shards (+ held-out shards)

Each check raises :class:`~dalle_ds.config.ConfigError` naming the config key and the path, which the
command line turns into one ``error:`` line and exit code 2 (dalle_ds/cli_args.py). The checks read
only what is cheap: the shard list (files exist; an s3:// prefix is listed), the manifests, the
tokenizer file, the dVAE export's config and hash. Returns a summary for ``--dry-run``.
"""

from __future__ import annotations

from typing import Any

from dalle_ds.config import Config, ConfigError
from dalle_ds.data import storage


def shards(key: str, spec: str, what: str) -> list[str]:
    """The shard URLs of ``spec``; every local file must exist."""
    if not spec:
        raise ConfigError(f"{key}: not set; a run names its data ({what}), e.g. {key}=PATH")
    try:
        urls = storage.expand_urls(spec)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}={spec!r}: {e}") from None
    missing = [u for u in urls if not storage.is_s3(u) and not storage.exists(u)]
    if missing and len(urls) == 1:
        raise ConfigError(f"{key}={spec!r}: no such file or folder")
    if missing:
        raise ConfigError(f"{key}={spec!r}: {len(missing)} of {len(urls)} shards do not exist, "
                          f"first {missing[0]!r}")
    return urls


def file(key: str, path: str, what: str) -> None:
    if not path:
        raise ConfigError(f"{key}: not set; a run names its {what}, e.g. {key}=PATH")
    if not storage.exists(path):
        raise ConfigError(f"{key}={path!r}: no such file ({what})")


def prior_inputs(cfg: Config) -> dict[str, Any]:
    """Token shards (+ their manifest against the grid, codebook and dVAE), tokenizer, dVAE export."""
    from dalle_ds.data.loaders import check_token_manifest
    from dalle_ds.data.tokenizer import TextTokenizer

    m, d = cfg.model, cfg.data
    urls = shards("data.token_shards", d.token_shards, "token shards from data_prep/tokenize_images.py")
    file("data.tokenizer", d.tokenizer, "tokenizer.json from data_prep/train_text_tokenizer.py")
    dvae_hash = None
    if d.dvae:
        from dalle_ds.models.dvae_io import dvae_hash as hash_of

        try:
            dvae_hash = hash_of(d.dvae)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.dvae={d.dvae!r}: not a dVAE export ({e})") from None
    try:
        manifests = check_token_manifest(urls, m.image_grid, m.image_vocab_size, expected_dvae_hash=dvae_hash)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.token_shards={d.token_shards!r}: {e}") from None
    try:
        tok = TextTokenizer.from_file(d.tokenizer, m.text_len, m.text_vocab_size)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r}: {e}") from None
    samples = sum(int(mf.get("samples") or sum(int(s.get("samples", 0)) for s in mf.get("shards") or []
                                               if isinstance(s, dict))) for mf in manifests)
    return {"token_shards": len(urls), "samples": samples or None, "tokenizer": tok.name, "dvae": d.dvae or None}


def dvae_inputs(cfg: Config, eval_shards: str | None = None) -> dict[str, Any]:
    urls = shards("data.image_shards", cfg.data.image_shards, "image shards from data_prep/shard_corpus.py")
    out: dict[str, Any] = {"image_shards": len(urls)}
    if eval_shards:
        out["eval_shards"] = len(shards("--eval-shards", eval_shards, "held-out image shards"))
    return out
