"""Caption text -> fixed-length token ids for the prior (paper: BPE 16,384, 256 tokens, dropout 0.1).

    tok = TextTokenizer.from_file(cfg.data.tokenizer, cfg.model.text_len, cfg.model.text_vocab_size)
    text = tok.encode(captions, dropout=cfg.data.bpe_dropout)   # (B, text_len) int64, [PAD]-filled
    tok.decode(text)                                            # lowercased captions back

The tokenizer file is a `tokenizers` BPE made by data_prep/train_text_tokenizer.py: byte-level
(no caption is ever out of vocabulary), NFKC + lowercase, special tokens ``[PAD]``=0,
``[UNK]``=1, ``[SOI]``=2 (start of image, used by the prior). ``encode`` is deterministic when
``dropout`` is 0; with dropout > 0 each call samples a different segmentation (BPE dropout).
"""

from __future__ import annotations

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

    def encode(self, captions: list[str], dropout: float = 0.0) -> torch.Tensor:
        """Captions -> (B, text_len) int64: lowercased, truncated to text_len, padded with pad_id."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, got one str")
        texts = [" ".join(c.lower().split()) for c in captions]
        out = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)  # (B, T)
        for row, enc in enumerate(self._tokenizer(dropout).encode_batch(texts, add_special_tokens=False)):
            ids = enc.ids[: self.text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | list[list[int]]) -> list[str]:
        """(B, T) ids -> captions; [PAD], [UNK] and [SOI] are left out."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
        if rows and isinstance(rows[0], int):
            rows = [rows]
        texts = self._by_dropout[0.0].decode_batch(rows, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, text_len={self.text_len})"
