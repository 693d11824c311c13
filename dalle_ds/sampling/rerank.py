"""Rerank sampled candidates with a contrastive image-text model (paper §2.6: keep the best k of N).

    scorer = ClipScorer.load("runs/demo/clip")           # any CLIP folder, offline
    keep, scores = rerank(scorer, images, caption, k=8)  # indices of the best k (best first), all N scores
    clip_score(scorer, images, captions)                 # 100 * mean(max(cos, 0)), the usual CLIPScore

Two kinds of folder, both loaded with ``transformers.CLIPModel.from_pretrained(local_files_only=True)``:

- a Hugging Face CLIP checkpoint (``config.json``, weights, ``preprocessor_config.json``, tokenizer
  files): text and images go through its ``CLIPProcessor`` (also ``local_files_only``);
- the project's own small CLIP (``dalle_ds/train_clip.py``): the folder also holds
  ``dalle_ds_clip.json`` and ``tokenizer.json``. Text goes through the project's BPE
  :class:`~dalle_ds.data.tokenizer.TextTokenizer` (the prior's tokenizer, copied into the folder), truncated
  to ``context_length - 1`` tokens so every row ends in at least one ``[PAD]`` (id 0). The CLIP text
  config sets ``eos_token_id = 0``, so the text model pools the first ``[PAD]`` (the position right
  after the caption, which under the causal mask has seen all of it). Images are resized
  (bilinear, antialiased) to ``image_size`` and normalised with the stored mean / std in torch.

Images everywhere are float (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PROJECT_META = "dalle_ds_clip.json"
PROJECT_TOKENIZER = "tokenizer.json"


def _pooled(out) -> Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ProjectClipProcessor:
    """Offline preprocessing for the project's CLIP (see the module docstring)."""

    def __init__(self, tokenizer_file: str, context_length: int, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float]):
        from dalle_ds.data.tokenizer import TextTokenizer

        if context_length < 2:
            raise ValueError(f"context_length={context_length}: must be >= 2 (caption + one [PAD])")
        self.tokenizer_file, self.context_length, self.image_size = str(tokenizer_file), context_length, image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.tokenizer = TextTokenizer.from_file(str(tokenizer_file), context_length - 1)
        self.vocab_size = self.tokenizer.vocab_size

    def text(self, captions: list[str]) -> dict[str, Tensor]:
        ids = self.tokenizer.encode(list(captions))  # (B, L-1), [PAD]-filled
        ids = torch.cat([ids, torch.zeros(ids.shape[0], 1, dtype=torch.long)], 1)  # (B, L): >= one [PAD] = EOS
        return {"input_ids": ids}

    def images(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # (B, 3, S, S)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if Path(self.tokenizer_file).resolve() != (folder / PROJECT_TOKENIZER).resolve():
            shutil.copyfile(self.tokenizer_file, folder / PROJECT_TOKENIZER)
        meta = {"format": "dalle_ds-clip/1", "context_length": self.context_length, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "tokenizer": PROJECT_TOKENIZER,
                "eos": "first [PAD] (id 0) after the caption"}
        (folder / PROJECT_META).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ProjectClipProcessor":
        folder = Path(folder)
        meta = json.loads((folder / PROJECT_META).read_text())
        for key in ("context_length", "image_size", "mean", "std"):
            if key not in meta:
                raise ValueError(f"{folder / PROJECT_META}: missing key {key!r}")
        return cls(str(folder / meta.get("tokenizer", PROJECT_TOKENIZER)), meta["context_length"],
                   meta["image_size"], meta["mean"], meta["std"])


class HFClipProcessor:
    """A Hugging Face CLIPProcessor from a local folder, behind the same two methods."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)

    def text(self, captions: list[str]) -> dict[str, Tensor]:
        enc = self.processor.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}

    def images(self, images: Tensor) -> Tensor:
        arrays = [np.ascontiguousarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
                  for x in images]
        return self.processor.image_processor(images=arrays, return_tensors="pt")["pixel_values"]


class ClipScorer:
    """Normalised image and text embeddings from a CLIPModel and its processor."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", name: str = "clip",
                 batch_size: int = 64):
        self.model = model.to(device).eval()
        self.processor, self.device, self.name, self.batch_size = processor, torch.device(device), name, batch_size

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ClipScorer":
        from transformers import CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'}: missing (a CLIP folder is written by "
                                    "save_pretrained, e.g. by dalle_ds/train_clip.py)")
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        processor = ProjectClipProcessor.load(folder) if (folder / PROJECT_META).is_file() else HFClipProcessor(folder)
        return cls(model, processor, device, name=f"clip:{folder}")

    @torch.no_grad()
    def image_embeds(self, images: Tensor, normalize: bool = True) -> Tensor:
        outs = []
        for i in range(0, images.shape[0], self.batch_size):
            pix = self.processor.images(images[i:i + self.batch_size].to(self.device)).to(self.device)
            outs.append(_pooled(self.model.get_image_features(pixel_values=pix)).float())
        e = torch.cat(outs)  # (B, E)
        return F.normalize(e, dim=-1) if normalize else e

    @torch.no_grad()
    def text_embeds(self, captions: list[str]) -> Tensor:
        outs = []
        for i in range(0, len(captions), self.batch_size):
            enc = {k: v.to(self.device) for k, v in self.processor.text(captions[i:i + self.batch_size]).items()}
            outs.append(_pooled(self.model.get_text_features(**enc)).float())
        return F.normalize(torch.cat(outs), dim=-1)  # (B, E)

    def cosine(self, images: Tensor, captions: list[str]) -> Tensor:
        """(B,) cosine similarity of image i with caption i."""
        if images.shape[0] != len(captions):
            raise ValueError(f"cosine: {images.shape[0]} images but {len(captions)} captions")
        return (self.image_embeds(images) * self.text_embeds(captions)).sum(-1)


def rank(image_emb: Tensor, text_emb: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Embeddings (N, E) of the candidates and (E,) of their caption -> (best ``keep`` indices, best first;
    all N cosine scores). Ties keep the earlier candidate first."""
    n = image_emb.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"keep={keep}: must be in [1, {n}] (the number of candidates)")
    scores = image_emb @ text_emb  # (N,)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:keep], scores


def rerank(scorer: ClipScorer, images: Tensor, caption: str, keep: int) -> tuple[Tensor, Tensor]:
    """Candidates (N, 3, H, W) for one caption -> (indices of the best ``keep``, best first; all N scores)."""
    return rank(scorer.image_embeds(images), scorer.text_embeds([caption])[0], keep)


def clip_score(scorer: ClipScorer, images: Tensor, captions: list[str]) -> float:
    """CLIPScore (Hessel et al. 2021, w = 100): mean over pairs of 100 * max(cos(image, caption), 0)."""
    return float((100.0 * scorer.cosine(images, captions).clamp(min=0)).mean())
