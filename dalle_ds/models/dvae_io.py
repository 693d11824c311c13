"""dVAE exports from anywhere (folder or s3:// prefix) and the hash that ties token shards to them.

    vae, meta = load_exported("s3://bucket/runs/dvae/export")   # eval mode, EMA weights as exported
    h = dvae_hash("runs/dvae/export")                            # sha256 of model.safetensors

An export is the folder :func:`dalle_ds.models.dvae.save_dvae` writes: ``model.safetensors`` (the EMA
weights for ``train_dvae`` exports) and ``config.json`` (``dvae`` config, ``weights_sha256``,
``image_size``...). The token manifest's ``dvae_hash`` is :func:`dvae_hash` of the export used to
make the tokens, i.e. the sha256 hex digest of the weights file's bytes, the same value as
``config.json``'s ``weights_sha256``; prior training and sampling compare it with their own dVAE
(``dalle_ds.data.loaders.check_token_manifest(..., expected_dvae_hash=dvae_hash(path))``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from dalle_ds.data import storage
from dalle_ds.models.dvae import EXPORT_CONFIG, EXPORT_WEIGHTS, DiscreteVAE, load_dvae


def _weights_url(path: str) -> str:
    """The weights file of an export folder / prefix, or ``path`` itself if it names the file."""
    return path if str(path).endswith(".safetensors") else storage.join(str(path).rstrip("/"), EXPORT_WEIGHTS)


def dvae_hash(path: str) -> str:
    """sha256 hex digest of an export's ``model.safetensors`` (``path``: the folder, the file, or s3://)."""
    url = _weights_url(path)
    if not storage.exists(url):
        raise FileNotFoundError(f"{url}: no dVAE weights (an export folder holds {EXPORT_WEIGHTS} and {EXPORT_CONFIG})")
    digest = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_exported(path: str, map_location: str = "cpu") -> tuple[DiscreteVAE, dict[str, Any]]:
    """(model in eval mode, config.json contents + ``dvae_hash``) from a local or s3:// export folder.

    Raises ``ValueError`` naming the path when the folder is missing, incomplete, or its weights
    do not load into the model its config describes, or do not match ``weights_sha256``.
    """
    path = str(path).rstrip("/")
    if storage.is_s3(path):
        with tempfile.TemporaryDirectory(prefix="dalle-ds-dvae-") as tmp:
            for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
                url = storage.join(path, name)
                if not storage.exists(url):
                    raise ValueError(f"{url}: missing (a dVAE export holds {EXPORT_WEIGHTS} and {EXPORT_CONFIG})")
                _download(url, os.path.join(tmp, name))
            return _load_local(tmp, map_location, shown=path)
    return _load_local(path, map_location, shown=path)


def _download(url: str, dest: str) -> None:
    with storage.open_read(url) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)


def _load_local(folder: str, map_location: str, shown: str) -> tuple[DiscreteVAE, dict[str, Any]]:
    if not os.path.isdir(folder):
        raise ValueError(f"{shown}: not a dVAE export folder (does not exist)")
    try:
        vae = load_dvae(folder, map_location=map_location)
        with open(os.path.join(folder, EXPORT_CONFIG)) as f:
            meta = json.load(f)
    except Exception as e:  # noqa: BLE001 - re-raised naming the export
        raise ValueError(f"{shown}: cannot load the dVAE export ({type(e).__name__}: {e})") from e
    want, got = meta.get("weights_sha256"), dvae_hash(folder)
    if want is not None and got != want:
        raise ValueError(f"{shown}: {EXPORT_WEIGHTS} has sha256 {got[:16]}..., its {EXPORT_CONFIG} says "
                         f"{want[:16]}...: the folder mixes two exports")
    return vae.eval(), {**meta, "dvae_hash": got}


__all__ = ["dvae_hash", "load_exported"]
