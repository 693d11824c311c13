"""Small real inputs for the sampling / CLIP / evaluation tests: shapes-corpus image shards, a BPE
tokenizer trained on their captions, tiny randomly initialised priors and dVAEs saved as exports."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

from dalle_ds.config import DVAEConfig, ModelConfig


def write_image_shards(folder: Path, count: int, size: int = 32, seed: int = 0, per_shard: int = 64,
                       split: str = "all") -> list[str]:
    """Shapes-corpus samples as webdataset image shards (.png, .txt, .json); returns the captions.
    ``split`` train / heldout: make_shapes_corpus's meaning split (the json then records it)."""
    from data_prep.make_shapes_corpus import make_sample

    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for s in range(0, count, per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(count, s + per_shard)):
                png, caption, truth = make_sample(seed, i, size, split)
                captions.append(caption)
                meta = {"source": "shapes", **({"split": split} if split != "all" else {})}
                for name, data in ((f"{i:09d}.png", png), (f"{i:09d}.txt", caption.encode()),
                                   (f"{i:09d}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return captions


def train_tokenizer(shards: Path, out: Path, vocab_size: int = 320) -> Path:
    from data_prep import train_text_tokenizer

    train_text_tokenizer.main(["--shards", str(shards), "--vocab-size", str(vocab_size), "--output", str(out),
                               "--no-progress"])
    return out


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(n_layers=4, n_heads=2, d_model=32, mlp_ratio=2, text_len=8, text_vocab_size=320, image_grid=4,
                image_vocab_size=16, conv_kernel=3, attention="sparse", activation_checkpointing=False, init_std=0.2)
    return ModelConfig(**{**base, **kw})


def tiny_dvae_config(**kw) -> DVAEConfig:
    base = dict(channels=3, n_hid=8, n_blk_per_group=1, group_count=2, codebook_size=16, n_init=8)
    return DVAEConfig(**{**base, **kw})


def save_prior_export(prior, out: Path) -> Path:
    """The format dalle_ds.parallel.checkpoint.export writes: model.safetensors + config.json (the model section)."""
    import dataclasses

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in prior.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(prior.cfg)))
    return out


def make_exports(root: Path, grid: int = 4, text_len: int = 8, text_vocab: int = 320, seed: int = 0) -> tuple[Path, Path]:
    """A random tiny prior and dVAE (images of side 2 * grid) as export folders."""
    from dalle_ds.models.dvae import DiscreteVAE, save_dvae
    from dalle_ds.models.prior import Prior

    torch.manual_seed(seed)
    prior = Prior(tiny_model_config(image_grid=grid, text_len=text_len, text_vocab_size=text_vocab))
    vae = DiscreteVAE(tiny_dvae_config())
    save_dvae(vae, str(root / "dvae"), extra={"image_size": 2 * grid})
    return save_prior_export(prior, root / "prior"), root / "dvae"
