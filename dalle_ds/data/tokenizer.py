"""Caption text -> fixed-length token ids for the prior (paper: BPE 16,384, 256 tokens, dropout 0.1).

    tok = TextTokenizer.from_file(cfg.data.tokenizer, cfg.model.text_len, cfg.model.text_vocab_size)
    text = tok.encode(captions, dropout=cfg.data.bpe_dropout)   # (B, text_len) int64, [PAD]-filled
    tok.decode(text)                                            # lowercased captions back

The tokenizer file is a `tokenizers` BPE made by data_prep/train_text_tokenizer.py: byte-level
(no caption is ever out of vocabulary), NFKC + lowercase, special tokens ``[PAD]``=0,
``[UNK]``=1, ``[SOI]``=2 (start of image, used by the prior). ``encode`` is deterministic when
``dropout`` is 0; with dropout > 0 it samples a segmentation (BPE dropout, Provilkov et al.: at
every merge step each applicable merge is skipped with probability ``dropout``, the best remaining
one is applied) from ``random.Random(seed)`` per caption when ``seeds`` are given — the training
loader passes a hash of (seed, epoch, sample key), so a resumed run's text tokens are bit-identical
to an uninterrupted run's — and from fresh randomness otherwise. The tokenizers library's own
dropout RNG cannot be seeded, so the dropout path applies the file's merges here, in Python; at
dropout 0 it gives the library's segmentation exactly (tested).
"""

from __future__ import annotations

import json
import random

import torch
from tokenizers import Tokenizer

from dalle_ds.data import storage

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[SOI]")  # ids 0, 1, 2


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, text_len: int, name: str = "<tokenizer>"):
        if text_len < 1:
            raise ValueError(f"text_len={text_len}: must be >= 1")
        for want_id, token in enumerate(SPECIAL_TOKENS):
            got = tokenizer.token_to_id(token)
            if got != want_id:
                raise ValueError(f"{name}: special token {token} has id {got}, expected {want_id}; "
                                 "make the tokenizer with data_prep/train_text_tokenizer.py")
        self.name = name
        self.text_len = text_len
        self._json = tokenizer.to_str()
        self._by_dropout: dict[float, Tokenizer] = {0.0: tokenizer}
        self._bpe: tuple[dict, dict] | None = None  # (merge ranks, vocab), built on first dropout use
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id, self.unk_id, self.soi_id = 0, 1, 2

    @classmethod
    def from_file(cls, path: str, text_len: int, vocab_size: int | None = None) -> "TextTokenizer":
        """Load a tokenizer.json (path or s3:// URL); with ``vocab_size`` (the model config's
        text_vocab_size) a different vocabulary size is an error naming the file."""
        try:
            tokenizer = Tokenizer.from_str(storage.read_bytes(path).decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: tokenizer file not found (make it with "
                                    "data_prep/train_text_tokenizer.py)") from None
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path}: not a tokenizers JSON file ({type(e).__name__}: {e})") from None
        if vocab_size is not None and tokenizer.get_vocab_size() != vocab_size:
            raise ValueError(f"{path}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model expects "
                             f"text_vocab_size={vocab_size}; retrain it with --vocab-size {vocab_size} or set "
                             f"model.text_vocab_size={tokenizer.get_vocab_size()}")
        return cls(tokenizer, text_len, name=path)

    def _tokenizer(self, dropout: float) -> Tokenizer:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: must be in [0, 1)")
        if dropout not in self._by_dropout:
            tok = Tokenizer.from_str(self._json)
            tok.model.dropout = dropout
            self._by_dropout[dropout] = tok
        return self._by_dropout[dropout]

    def encode(self, captions: list[str], dropout: float = 0.0, seeds: list[int] | None = None) -> torch.Tensor:
        """Captions -> (B, text_len) int64: lowercased, truncated to text_len, padded with pad_id.
        ``seeds`` (one int per caption) make BPE dropout a function of the seed."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, got one str")
        if seeds is not None and len(seeds) != len(captions):
            raise ValueError(f"{len(seeds)} seeds for {len(captions)} captions")
        texts = [" ".join(c.lower().split()) for c in captions]
        out = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)  # (B, T)
        if dropout == 0.0:
            rows = [enc.ids for enc in self._tokenizer(0.0).encode_batch(texts, add_special_tokens=False)]
        else:
            self._tokenizer(dropout)  # checks the range
            rows = [self.encode_dropout(t, dropout, random.Random(seeds[i] if seeds is not None else None))
                    for i, t in enumerate(texts)]
        for row, ids in enumerate(rows):
            ids = ids[: self.text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def encode_dropout(self, text: str, dropout: float, rng: random.Random) -> list[int]:
        """One caption's ids with BPE dropout drawn from ``rng`` (dropout 0: the library's ids)."""
        ranks, vocab = self._merges()
        tok = self._by_dropout[0.0]
        normal = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
        ids: list[int] = []
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(normal):
            syms = list(word)
            while len(syms) > 1:
                best, at = None, -1
                for i in range(len(syms) - 1):
                    r = ranks.get((syms[i], syms[i + 1]))
                    if r is not None and (best is None or r < best) and not (dropout and rng.random() < dropout):
                        best, at = r, i
                if best is None:
                    break
                syms[at: at + 2] = [syms[at] + syms[at + 1]]
            ids += [vocab.get(s, self.unk_id) for s in syms]
        return ids

    def _merges(self) -> tuple[dict, dict]:
        if self._bpe is None:
            model = json.loads(self._json)["model"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            self._bpe = ({pair: rank for rank, pair in enumerate(merges)}, model["vocab"])
        return self._bpe

    def decode(self, ids: torch.Tensor | list[list[int]]) -> list[str]:
        """(B, T) ids -> captions; [PAD], [UNK] and [SOI] are left out."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
        if rows and isinstance(rows[0], int):
            rows = [rows]
        texts = self._by_dropout[0.0].decode_batch(rows, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, text_len={self.text_len})"
