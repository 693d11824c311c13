"""The text-to-image pipeline: prior + dVAE + tokenizer (+ CLIP reranker), captions in, images out."""

from __future__ import annotations

import argparse

import torch

from dalle_ds.sampling.generate import SamplingSettings, generate, load_prior
from dalle_ds.sampling.grids import load_image


class Pipeline:
    """Prior + dVAE + tokenizer (+ CLIP): captions in, reranked images out."""

    @staticmethod
    def add_args(ap: argparse.ArgumentParser, tokenizer_default: str | None = None) -> None:
        """--checkpoint, --dvae, --tokenizer (required unless the command names a default)."""
        ap.add_argument("--checkpoint", required=True, help="prior export folder (model.safetensors + config.json)")
        ap.add_argument("--dvae", required=True, help="dVAE export folder, local or s3://")
        ap.add_argument("--tokenizer", required=tokenizer_default is None, default=None,
                        help="tokenizer.json" + (f" (default: {tokenizer_default})" if tokenizer_default else ""))

    def __init__(self, checkpoint: str, dvae: str, tokenizer: str, clip: str | None = None,
                 device: str = "cpu", batch_size: int = 64):
        from dalle_ds.models.dvae_io import load_dvae
        from dalle_ds.data.tokenizer import TextTokenizer

        self.device = torch.device(device)
        self.prior = load_prior(checkpoint, self.device)
        self.vae = load_dvae(dvae).to(self.device)
        c = self.prior.cfg
        if self.vae.cfg.codebook_size != c.image_vocab_size:
            raise ValueError(f"{dvae}: codebook_size {self.vae.cfg.codebook_size} != the prior's image_vocab_size "
                             f"{c.image_vocab_size} ({checkpoint}/config.json)")
        self.tokenizer = TextTokenizer.from_file(tokenizer, c.text_len, c.text_vocab_size)
        self.image_size = c.image_grid * self.vae.cfg.downsample
        self.scorer = None
        if clip:
            from dalle_ds.sampling.rerank import ClipScorer

            self.scorer = ClipScorer.load(clip, self.device)
        self.batch_size = batch_size

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
