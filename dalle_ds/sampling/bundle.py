"""A model bundle: one folder with everything sampling needs, written by ``python -m dalle_ds.export``.

    OUTPUT/
      model.safetensors                      the prior (fp32, fp16 or bf16), or when larger than the shard size
      model-00001-of-00003.safetensors ...   shards plus model.safetensors.index.json (Hugging Face's layout:
      model.safetensors.index.json           {"metadata": {"total_size": ...}, "weight_map": {name: file}})
      config.json                            the prior's model section (what load_prior builds)
      run_config.yaml                        the run's resolved config (every section)
      dvae/                                  copy of the dVAE export (model.safetensors + config.json)
      tokenizer.json                         the text tokenizer
      bundle.json                            what is where: dtype, step, sources, file names
      README.md                              model card: data, steps, final losses, evaluation figures

``Pipeline.from_pretrained(OUTPUT)`` (dalle_ds/sampling/pipeline.py) loads it; ``load_weights`` reads
both the single-file and the sharded layout (an export folder of older runs is a bundle without
dvae/ and tokenizer.json).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dalle_ds.training.logger import read_jsonl

WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """``5GB`` -> 5e9 (decimal, as Hugging Face's max_shard_size), ``512MiB`` -> 2**29, ``1000`` -> 1000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", str(text), re.IGNORECASE)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r}: a size like 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _distinct(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast, contiguous, and no two tensors sharing storage (tied weights): safetensors refuses those."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().to(dtype).contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def save_weights(state: dict[str, torch.Tensor], folder: str | Path, dtype: str = "fp32",
                 max_shard_size: str | int = "5GB", metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state`` in ``dtype``: one ``model.safetensors``, or shards of at most ``max_shard_size``
    bytes (a tensor larger than that gets a shard of its own) plus the index. Returns the file names."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: one of {sorted(DTYPES)}")
    limit = parse_bytes(max_shard_size)
    tensors = _distinct(state, DTYPES[dtype])
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > limit:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += n
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model-*-of-*.safetensors"), folder / INDEX, folder / WEIGHTS]:
        old.unlink(missing_ok=True)
    meta = {"format": "pt", "dtype": dtype, **(metadata or {})}
    if len(groups) == 1:
        save_file(groups[0], str(folder / WEIGHTS), metadata=meta)
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups):
        save_file(group, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in group})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total, "dtype": dtype},
                                            "weight_map": weight_map}, indent=2) + "\n")
    return [*names, INDEX]


def load_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict as stored, config.json) of a bundle or export folder, single file or sharded."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder / CONFIG}: missing (write a bundle with "
                                f"`python -m dalle_ds.export RUN_DIR OUTPUT`)")
    cfg = json.loads((folder / CONFIG).read_text())
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(index["weight_map"].values())):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: shard listed in {INDEX} is missing")
            state.update(load_file(str(folder / name)))
        missing = sorted(set(index["weight_map"]) - set(state))
        if missing:
            raise ValueError(f"{folder / INDEX}: tensors listed but not in the shards: {missing[:5]}")
        return state, cfg
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS}: missing (and no {INDEX})")
    return load_file(str(folder / WEIGHTS)), cfg


# ---------------------------------------------------------------- the bundle of a run


def final_losses(rows: list[dict[str, Any]], last: int = 10) -> dict[str, float]:
    """Means of loss / text_loss / image_loss over the last ``last`` rows that have them."""
    out = {}
    for key in ("loss", "text_loss", "image_loss"):
        vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])][-last:]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def evaluation_figures(run_dir: Path) -> dict[str, Any]:
    """The last ``eval.jsonl`` row and the numeric top-level figures of ``RUN_DIR/eval/*.json``."""
    figs: dict[str, Any] = {}
    rows = read_jsonl(run_dir / "eval.jsonl")
    if rows:
        figs["eval.jsonl"] = rows[-1]
    for path in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(data, dict):
            nums = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if nums:
                figs[f"eval/{path.name}"] = nums
    return figs


def model_card(info: dict[str, Any]) -> str:
    m, d = info["model"], info["data"]
    lines = [f"# DALL·E prior: {info['name']}", "",
             "A text-to-image transformer prior trained with dalle-ds (Ramesh et al. 2021, on DeepSpeed), "
             "bundled with its dVAE and text tokenizer.", "",
             "## Model", "",
             f"- prior: {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads, "
             f"{info['parameters']:,} parameters, stored as {info['dtype']}",
             f"- sequence: {m['text_len']} text tokens (vocabulary {m['text_vocab_size']}) + "
             f"{m['image_grid']}x{m['image_grid']} image codes (codebook {m['image_vocab_size']})",
             f"- attention: {m['attention']}; files: {', '.join(info['files'])}", "",
             "## Training", "",
             f"- data: token shards `{d.get('token_shards') or '?'}`"
             + (f" ({info['samples']:,} samples)" if info.get("samples") else ""),
             f"- tokenizer: `{d.get('tokenizer') or '?'}`; dVAE: `{info.get('dvae_source') or '?'}`",
             f"- updates: {info['step'] if info['step'] is not None else '?'} (checkpoint {info['tag']})"]
    if info["losses"]:
        lines.append("- final losses (mean of the last 10 logged updates): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in info["losses"].items()))
    lines += ["", "## Evaluation", ""]
    if info["evaluation"]:
        for name, figs in info["evaluation"].items():
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in figs.items() if k != "step"))
    else:
        lines.append("- none recorded (run `python -m dalle_ds.evaluate_captions` or `python -m dalle_ds.evaluate`)")
    lines += ["", "## Use", "", "```python", "from dalle_ds import Pipeline", "",
              "pipe = Pipeline.from_pretrained(\"PATH/TO/THIS/FOLDER\", device=\"cuda\", dtype=\"bf16\")",
              "images = pipe(\"a red circle\", n=16, keep=4)  # PIL images, best first (CLIP reranking with clip=)",
              "```", "", "```", "python -m dalle_ds.sample --bundle PATH/TO/THIS/FOLDER --prompt \"a red circle\" "
              "-n 16 --keep 4 --output samples", "```", ""]
    return "\n".join(lines)


def export_bundle(run_dir: str | Path, output: str | Path, dvae: str | None = None, tokenizer: str | None = None,
                  dtype: str = "fp32", max_shard_size: str | int = "5GB", tag: str | None = None) -> dict[str, Any]:
    """Write the bundle of a prior run (see the module docstring). ``dvae`` and ``tokenizer`` default to
    the run's ``data.dvae`` and ``data.tokenizer``. Returns bundle.json's contents."""
    import yaml

    from dalle_ds.config import ConfigError
    from dalle_ds.data import storage
    from dalle_ds.parallel.checkpoint import consolidated_state_dict, read_latest

    run_dir, output = Path(run_dir), Path(output)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR={str(run_dir)!r}: no config.yaml (a training run folder holds config.yaml and "
                          f"checkpoints/)")
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = run_cfg.get("data", {})
    dvae = dvae or data.get("dvae") or None
    tokenizer = tokenizer or data.get("tokenizer") or None
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: one of {sorted(DTYPES)}")
    try:
        limit = parse_bytes(max_shard_size)
    except ValueError as e:
        raise ConfigError(f"--max-shard-size={max_shard_size!r}: {e}") from None
    if dvae and not storage.exists(storage.join(str(dvae).rstrip("/"), "model.safetensors")):
        raise ConfigError(f"--dvae={dvae!r}: not a dVAE export (no model.safetensors)")
    if tokenizer and not storage.exists(tokenizer):
        raise ConfigError(f"--tokenizer={tokenizer!r}: no such file")
    root = run_dir / "checkpoints"
    tag = tag or (read_latest(root) if root.is_dir() else None)
    if tag is None:
        raise ConfigError(f"RUN_DIR={str(run_dir)!r}: no checkpoint (checkpoints/latest is missing)")
    state = consolidated_state_dict(root, tag)
    files = save_weights(state, output, dtype, limit, metadata={"source": str(root / tag)})
    (output / CONFIG).write_text(json.dumps(run_cfg["model"], indent=2) + "\n")
    (output / "run_config.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    dvae_hash = None
    if dvae:
        from dalle_ds.models.dvae_io import dvae_hash as hash_of

        if (output / "dvae").exists():
            shutil.rmtree(output / "dvae")
        (output / "dvae").mkdir()
        for name in ("model.safetensors", "config.json"):
            src = storage.join(str(dvae).rstrip("/"), name)
            (output / "dvae" / name).write_bytes(storage.read_bytes(src))
        dvae_hash = hash_of(str(output / "dvae"))
    if tokenizer:
        (output / "tokenizer.json").write_bytes(storage.read_bytes(tokenizer))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [int(r["step"]) for r in rows if "step" in r]
    step_match = re.search(r"(\d+)$", tag)
    samples = None
    try:  # the token manifest beside the shards (a folder spec) counts the samples
        folder = str(data.get("token_shards", "")).rstrip("/")
        if folder and storage.exists(storage.join(folder, "manifest.json")):
            samples = storage.read_json(storage.join(folder, "manifest.json")).get("samples")
    except Exception:  # noqa: BLE001 - the card is informative; an unreadable manifest is not an error
        samples = None
    info = {"name": run_dir.resolve().name, "dtype": dtype, "files": files, "tag": tag,
            "step": int(step_match.group(1)) if step_match else (steps[-1] if steps else None),
            "parameters": sum(v.numel() for v in state.values()), "model": run_cfg["model"], "data": data,
            "samples": samples, "dvae": "dvae" if dvae else None, "dvae_source": dvae, "dvae_hash": dvae_hash,
            "tokenizer": "tokenizer.json" if tokenizer else None, "tokenizer_source": tokenizer,
            "losses": final_losses(rows), "evaluation": evaluation_figures(run_dir), "source": str(run_dir)}
    (output / "README.md").write_text(model_card(info))
    (output / "bundle.json").write_text(json.dumps({k: v for k, v in info.items() if k not in ("model",)},
                                                   indent=2, default=str) + "\n")
    return info
