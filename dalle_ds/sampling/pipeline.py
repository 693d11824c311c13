"""The text-to-image pipeline: prior + dVAE + tokenizer (+ CLIP reranker), captions in, images out."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dalle_ds.sampling.generate import SamplingSettings, generate, load_prior
from dalle_ds.sampling.grids import load_image

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_clip(clip: str | Path, device: str | torch.device = "cpu"):
    """A ClipScorer from a folder, or from a Hugging Face model id already in the local cache (never downloads)."""
    from dalle_ds.config import ConfigError
    from dalle_ds.sampling.rerank import ClipScorer

    if Path(clip).exists():
        return ClipScorer.load(clip, device)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=str(clip), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or not an id (HFValidationError)
        raise ConfigError(f"--clip={str(clip)!r}: not a folder, and not a model in the local Hugging Face cache "
                          f"(no downloads here: fetch it once with `huggingface-cli download {clip}` where there "
                          f"is network, or pass a CLIP folder) [{type(e).__name__}]") from None
    return ClipScorer.load(folder, device)


class Pipeline:
    """Prior + dVAE + tokenizer (+ CLIP): captions in, reranked images out."""

    @staticmethod
    def add_args(ap: argparse.ArgumentParser, tokenizer_default: str | None = None, bundle: bool | None = None) -> None:
        """--bundle, or --checkpoint + --dvae + --tokenizer (the tokenizer unless the command names a
        default); what the bundle holds can still be replaced by the separate flags. ``bundle=False``
        (the default when a command names a tokenizer default): the three flags only, required."""
        if bundle is False or (bundle is None and tokenizer_default is not None):
            ap.add_argument("--checkpoint", required=True, help="prior export folder (model.safetensors + config.json)")
            ap.add_argument("--dvae", required=True, help="dVAE export folder, local or s3://")
            ap.add_argument("--tokenizer", required=tokenizer_default is None, default=None,
                            help="tokenizer.json" + (f" (default: {tokenizer_default})" if tokenizer_default else ""))
            return
        ap.add_argument("--bundle", default=None, help="model bundle folder (python -m dalle_ds.export): prior, "
                                                       "dvae/, tokenizer.json")
        ap.add_argument("--checkpoint", default=None, help="prior export folder (model.safetensors + config.json)")
        ap.add_argument("--dvae", default=None, help="dVAE export folder, local or s3://")
        ap.add_argument("--tokenizer", default=None,
                        help="tokenizer.json" + (f" (default: {tokenizer_default})" if tokenizer_default else ""))
        ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="the prior's compute dtype (default fp32)")

    @staticmethod
    def paths_from_args(args: argparse.Namespace, tokenizer_default: str | None = None) -> tuple[str, str, str]:
        """(checkpoint, dvae, tokenizer) from --bundle and/or the separate flags; ConfigError naming what is missing."""
        from dalle_ds.config import ConfigError

        bundle = Path(args.bundle) if getattr(args, "bundle", None) else None
        if bundle is not None and not (bundle / "config.json").is_file():
            raise ConfigError(f"--bundle={str(bundle)!r}: not a model bundle (no config.json; write one with "
                              "`python -m dalle_ds.export RUN_DIR OUTPUT`)")
        found = {"checkpoint": args.checkpoint or (str(bundle) if bundle else None),
                 "dvae": args.dvae or (str(bundle / "dvae") if bundle and (bundle / "dvae").is_dir() else None),
                 "tokenizer": args.tokenizer or (str(bundle / "tokenizer.json")
                                                 if bundle and (bundle / "tokenizer.json").is_file() else None)
                 or tokenizer_default}
        missing = [f"--{k}" for k, v in found.items() if not v]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required (or --bundle FOLDER holding them)")
        return found["checkpoint"], found["dvae"], found["tokenizer"]

    @classmethod
    def from_args(cls, args: argparse.Namespace, tokenizer_default: str | None = None, **kwargs) -> "Pipeline":
        checkpoint, dvae, tokenizer = cls.paths_from_args(args, tokenizer_default)
        return cls(checkpoint, dvae, tokenizer, getattr(args, "clip", None), args.device,
                   dtype=getattr(args, "dtype", None), **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
                        clip: str | None = None, batch_size: int = 64) -> "Pipeline":
        """The pipeline of a model bundle (``python -m dalle_ds.export``): ``pipe("a red circle", n=16, keep=4)``.
        ``dtype``: the prior's compute dtype (fp32, fp16, bf16 or a torch dtype; default fp32, whatever the
        stored dtype); ``clip``: a CLIP folder or a Hugging Face model id in the local cache, for reranking."""
        folder = Path(folder)
        args = argparse.Namespace(bundle=str(folder), checkpoint=None, dvae=None, tokenizer=None)
        checkpoint, dvae, tokenizer = cls.paths_from_args(args)
        return cls(checkpoint, dvae, tokenizer, clip, device, batch_size, dtype=dtype)

    def __init__(self, checkpoint: str, dvae: str, tokenizer: str, clip: str | None = None,
                 device: str = "cpu", batch_size: int = 64, dtype: str | torch.dtype | None = None):
        from dalle_ds.models.dvae_io import load_dvae
        from dalle_ds.data.tokenizer import TextTokenizer

        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
        self.prior = load_prior(checkpoint, self.device, dtype=self.dtype)
        self.vae = load_dvae(dvae).to(self.device)
        c = self.prior.cfg
        if self.vae.cfg.codebook_size != c.image_vocab_size:
            raise ValueError(f"{dvae}: codebook_size {self.vae.cfg.codebook_size} != the prior's image_vocab_size "
                             f"{c.image_vocab_size} ({checkpoint}/config.json)")
        self.tokenizer = TextTokenizer.from_file(tokenizer, c.text_len, c.text_vocab_size)
        self.image_size = c.image_grid * self.vae.cfg.downsample
        self.scorer = None
        if clip:
            self.scorer = load_clip(clip, self.device)
        self.batch_size = batch_size

    def __call__(self, caption: str, n: int = 16, keep: int = 4, seed: int = 0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> list:
        """``keep`` PIL images for ``caption``, best first (CLIP-reranked when the pipeline has a CLIP),
        out of ``n`` candidates seeded ``seed .. seed + n - 1``."""
        from dalle_ds.sampling.grids import to_pil

        settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p).validate()
        return [to_pil(img) for img in self.sample(caption, n, keep, seed, settings)["images"]]

    def prompt_codes(self, image_path: str, rows: int) -> torch.Tensor:
        """(1, rows * G) codes of the top rows of an image."""
        g = self.prior.cfg.image_grid
        if not 1 <= rows < g:
            raise ValueError(f"--prompt-rows={rows}: must be in [1, {g - 1}] for a {g}x{g} grid")
        codes = self.vae.encode(load_image(image_path, self.image_size).to(self.device))  # (1, G, G)
        return codes.reshape(1, -1)[:, : rows * g]

    def sample(self, caption: str, n: int, keep: int, seed: int, settings: SamplingSettings,
               prompt_codes: torch.Tensor | None = None, progress: bool = False) -> dict:
        """N candidates for one caption -> kept images (keep, 3, H, W), their seeds, scores, all codes."""
        from dalle_ds.sampling.rerank import rerank

        if not 1 <= keep <= n:
            raise ValueError(f"--keep={keep}: must be in [1, -n={n}]")
        seeds = [seed + j for j in range(n)]
        text = self.tokenizer.encode([caption])  # (1, T)
        codes, images = [], []
        for i in range(0, n, self.batch_size):
            s = seeds[i:i + self.batch_size]
            pc = None if prompt_codes is None else prompt_codes.expand(len(s), -1)
            c = generate(self.prior, text.expand(len(s), -1), s, settings, prompt_codes=pc, progress=progress)
            codes.append(c)
            images.append(self.vae.decode(c).float().cpu())
        codes_t, images_t = torch.cat(codes), torch.cat(images)  # (N, G*G), (N, 3, H, W)
        if self.scorer is not None:
            order, scores = rerank(self.scorer, images_t, caption, keep)
            order, scores = order.cpu(), scores.cpu()  # the scorer's device -> where the images are
        else:
            order, scores = torch.arange(keep), None
        return {"caption": caption, "images": images_t[order], "all_images": images_t, "codes": codes_t.cpu(),
                "order": order.tolist(), "seeds": [seeds[j] for j in order.tolist()],
                "scores": None if scores is None else [float(scores[j]) for j in order.tolist()],
                "all_scores": None if scores is None else scores.tolist()}
