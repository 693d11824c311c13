"""Reading dVAE exports from anywhere (folder or s3:// prefix), and the hash that ties token shards to them.

    vae = load_dvae("s3://bucket/runs/dvae/export")   # eval mode, EMA weights as exported
    vae.export_meta["image_size"], vae.export_meta["dvae_hash"]
    h = dvae_hash("runs/dvae/export")                  # sha256 of model.safetensors

An export is the folder :func:`dalle_ds.models.dvae.save_dvae` writes: ``model.safetensors`` (the EMA
weights for ``train_dvae`` exports) and ``config.json`` (``dvae`` config, ``weights_sha256``,
``image_size``...). :func:`load_dvae` is the one loader (local folders and s3:// prefixes alike).
The token manifest's ``dvae_hash`` is :func:`dvae_hash` of the export used to make the tokens,
i.e. the sha256 hex digest of the weights file's bytes, the same value as ``config.json``'s
``weights_sha256``; prior training and sampling compare it with their own dVAE
(``dalle_ds.data.loaders.check_token_manifest(..., expected_dvae_hash=dvae_hash(path))``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from dalle_ds.data import storage
from dalle_ds.models.dvae import EXPORT_CONFIG, EXPORT_WEIGHTS, DiscreteVAE


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


def load_dvae(path: str, map_location: str = "cpu") -> DiscreteVAE:
    """The dVAE of a local or s3:// export folder, in eval mode.

    ``vae.export_meta`` holds the export's ``config.json`` plus ``dvae_hash`` (checked against
    ``weights_sha256``). Raises ``FileNotFoundError`` naming the missing folder or file, and
    ``ValueError`` naming the export when its weights do not load into the model its config
    describes, or do not match ``weights_sha256``.
    """
    path = str(path).rstrip("/")
    if storage.is_s3(path):
        with tempfile.TemporaryDirectory(prefix="dalle-ds-dvae-") as tmp:
            for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
                url = storage.join(path, name)
                if not storage.exists(url):
                    raise FileNotFoundError(f"{url}: missing (a dVAE export holds {EXPORT_WEIGHTS} and "
                                            f"{EXPORT_CONFIG})")
                _download(url, os.path.join(tmp, name))
            return _load_local(tmp, map_location, shown=path)
    return _load_local(path, map_location, shown=path)


def _download(url: str, dest: str) -> None:
    with storage.open_read(url) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)


def _load_local(folder: str, map_location: str, shown: str) -> DiscreteVAE:
    from safetensors.torch import load_file

    from dalle_ds.config import DVAEConfig, _build

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{shown}: not a dVAE export folder (does not exist)")
    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{os.path.join(shown, name)}: missing (a dVAE export folder holds "
                                    f"{EXPORT_WEIGHTS} and {EXPORT_CONFIG})")
    try:
        with open(os.path.join(folder, EXPORT_CONFIG)) as f:
            meta = json.load(f)
        if "dvae" not in meta:
            raise ValueError(f"{EXPORT_CONFIG} has no 'dvae' key (keys: {sorted(meta)})")
        vae = DiscreteVAE(_build(DVAEConfig, meta["dvae"], "dvae"))
        vae.load_state_dict(load_file(os.path.join(folder, EXPORT_WEIGHTS), device=map_location))
    except Exception as e:  # noqa: BLE001 - re-raised naming the export
        raise ValueError(f"{shown}: cannot load the dVAE export ({type(e).__name__}: {e})") from e
    want, got = meta.get("weights_sha256"), dvae_hash(folder)
    if want is not None and got != want:
        raise ValueError(f"{shown}: {EXPORT_WEIGHTS} has sha256 {got[:16]}..., its {EXPORT_CONFIG} says "
                         f"{want[:16]}...: the folder mixes two exports")
    vae.export_meta = {**meta, "dvae_hash": got}
    return vae.eval()


__all__ = ["dvae_hash", "load_dvae"]
