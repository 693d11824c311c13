"""Train the caption BPE (paper: 16,384 tokens) over the `.txt` of image or token shards.

    python data_prep/train_text_tokenizer.py --shards runs/demo/shards --vocab-size 512 \
        --output runs/demo/tokenizer.json
    python data_prep/train_text_tokenizer.py --shards 's3://bucket/shards/shard-{000000..000099}.tar' \
        --vocab-size 16384 --output tokenizer.json

Byte-level BPE (every caption encodes without [UNK]), NFKC + lowercase normalisation, special
tokens [PAD]=0, [UNK]=1, [SOI]=2. The written file always has exactly ``--vocab-size`` tokens,
so it matches ``model.text_vocab_size``: when the corpus is too small to learn that many merges
(the tiny demo corpus has a few dozen words), the remaining ids are filled with reserved tokens
``[RESERVED_i]`` that BPE never produces (no merge leads to them), and a warning says how many.
``--strict`` makes that an error instead.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dalle_ds.cli_args import Parser, run
from dalle_ds.data import storage  # noqa: E402
from dalle_ds.data.tokenizer import SPECIAL_TOKENS, TextTokenizer  # noqa: E402


def iter_captions(urls: list[str], progress: bool = True) -> Iterator[str]:
    """Every `.txt` member of the shards, lowercased, in shard order."""
    for url in tqdm(urls, unit="shard", desc="captions", disable=not progress):
        with storage.open_read(url) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".txt"):
                    data = tar.extractfile(m).read()
                    try:
                        yield " ".join(data.decode("utf-8").lower().split())
                    except UnicodeDecodeError:
                        raise ValueError(f"{url}: member {m.name} is not UTF-8") from None


def build(vocab_size: int, min_frequency: int = 2) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def pad_vocab(tok: Tokenizer, vocab_size: int) -> tuple[Tokenizer, int]:
    """Fill ids [current size, vocab_size) with reserved tokens no merge produces."""
    have = tok.get_vocab_size()
    if have >= vocab_size:
        return tok, 0
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i, token_id in enumerate(range(have, vocab_size)):
        vocab[f"[RESERVED_{i}]"] = token_id
    return Tokenizer.from_str(json.dumps(spec)), vocab_size - have


def train(urls: list[str], vocab_size: int, min_frequency: int = 2, strict: bool = False,
          progress: bool = True) -> Tokenizer:
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {minimum}")
    tok, trainer = build(vocab_size, min_frequency)
    n = 0

    def counted():
        nonlocal n
        for caption in iter_captions(urls, progress):
            n += 1
            yield caption

    tok.train_from_iterator(counted(), trainer)
    if n == 0:
        raise ValueError(f"{urls[0]}...: no .txt captions in {len(urls)} shard(s)")
    learned = tok.get_vocab_size()
    if learned < vocab_size:
        msg = (f"the {n} captions gave only {learned} of {vocab_size} tokens "
               f"({learned - minimum} merges)")
        if strict:
            raise ValueError(msg + "; lower --vocab-size or add captions")
        tok, added = pad_vocab(tok, vocab_size)
        print(f"warning: {msg}; filled the rest with {added} reserved tokens", file=sys.stderr)
    return tok


def main(argv: list[str] | None = None) -> Tokenizer:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard spec: folder, brace range, glob, s3:// prefix, list")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")
    p.add_argument("--output", required=True, help="tokenizer.json path or s3:// URL")
    p.add_argument("--strict", action="store_true", help="error instead of padding a too-small vocabulary")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    urls = storage.expand_urls(args.shards)
    tok = train(urls, args.vocab_size, args.min_frequency, args.strict, progress=not args.no_progress)
    TextTokenizer(tok, text_len=1, name=args.output)  # checks the special-token ids
    storage.write_bytes_atomic(args.output, tok.to_str(pretty=True).encode("utf-8"))
    print(f"{args.output}: BPE with {tok.get_vocab_size()} tokens from {len(urls)} shard(s)")
    return tok


if __name__ == "__main__":
    raise SystemExit(run(main))
