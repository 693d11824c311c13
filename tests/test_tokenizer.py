"""The caption BPE: training from shards, fixed-length encoding, BPE dropout, vocab checks."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
import torch

from dalle_ds.data.tokenizer import TextTokenizer
from data_prep import train_text_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"A {rng.choice(['small', 'large'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} "
            f"{rng.choice(['above', 'below', 'left of', 'right of'])} a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
            for _ in range(n)]


def _write_shards(folder, captions: list[str], per_shard: int = 100, ext: str = "codes") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(captions), per_shard):
        with tarfile.open(folder / f"tokens-{s // per_shard:06d}.tar", "w") as tar:
            for i, cap in enumerate(captions[s: s + per_shard], start=s):
                for name, data in ((f"{i:09d}.{ext}", b"\0\0" * 4), (f"{i:09d}.txt", cap.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    _write_shards(root / "shards", _captions(400))
    path = root / "tokenizer.json"
    train_text_tokenizer.main(["--shards", str(root / "shards"), "--vocab-size", "512", "--output", str(path),
                               "--no-progress"])
    return path


def test_trained_file_has_exact_size_and_special_ids(trained, capsys):
    tok = TextTokenizer.from_file(str(trained), text_len=16, vocab_size=512)
    assert tok.vocab_size == 512 and (tok.pad_id, tok.unk_id, tok.soi_id) == (0, 1, 2)
    spec = json.loads(trained.read_text())
    vocab = spec["model"]["vocab"]
    assert [vocab["[PAD]"], vocab["[UNK]"], vocab["[SOI]"]] == [0, 1, 2]
    reserved = [t for t in vocab if t.startswith("[RESERVED_")]
    assert reserved, "the tiny corpus cannot fill 512 tokens: the rest must be reserved"
    assert max(vocab.values()) == 511 and len(set(vocab.values())) == 512
    # reserved ids are never produced, and frequent words became single tokens
    ids = tok.encode(_captions(200, seed=1))
    assert int(ids.max()) < 512 - len(reserved)
    assert (ids[:, :2] != tok.pad_id).all()


def test_round_trip_and_fixed_length(trained):
    tok = TextTokenizer.from_file(str(trained), text_len=24)
    captions = ["A Small RED circle above a blue star", "  Café   au lait ☕ ", "purple"]
    ids = tok.encode(captions)
    assert ids.shape == (3, 24) and ids.dtype == torch.int64
    assert tok.decode(ids) == ["a small red circle above a blue star", "café au lait ☕", "purple"]
    assert (ids[2, 1:] == tok.pad_id).all() and ids[2, 0] != tok.pad_id  # "purple" is one learned token
    assert not (ids == tok.unk_id).any()  # byte-level: nothing is out of vocabulary
    short = TextTokenizer.from_file(str(trained), text_len=10)
    long = short.encode(["a red circle above a blue star " * 20])
    assert long.shape == (1, 10) and (long != tok.pad_id).all()  # truncated, no padding
    assert short.decode(long)[0] == "a red circle above a blue star a red circle"
    assert torch.equal(tok.encode(captions), ids)  # dropout 0 is deterministic


def test_bpe_dropout_varies_segmentation_not_text(trained):
    tok = TextTokenizer.from_file(str(trained), text_len=48)
    caption = ["a large orange hexagon right of a yellow triangle"]
    plain = tok.encode(caption)
    seen = {tuple(tok.encode(caption, dropout=0.3)[0].tolist()) for _ in range(20)}
    assert len(seen) > 1 and seen - {tuple(plain[0].tolist())}  # several segmentations, not only the plain one
    for ids in seen:
        assert tok.decode([list(ids)]) == [caption[0]]
        assert max(ids) < tok.vocab_size
    assert torch.equal(tok.encode(caption), plain)  # the dropout copy does not leak into dropout=0
    with pytest.raises(ValueError, match="dropout=1.5"):
        tok.encode(caption, dropout=1.5)


def test_vocab_mismatch_and_bad_files_name_the_file(trained, tmp_path):
    with pytest.raises(ValueError, match=rf"{trained}: tokenizer has 512 tokens but the model expects "
                                         r"text_vocab_size=16384"):
        TextTokenizer.from_file(str(trained), text_len=8, vocab_size=16384)
    with pytest.raises(FileNotFoundError, match="nope.json: tokenizer file not found"):
        TextTokenizer.from_file(str(tmp_path / "nope.json"), text_len=8)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json: not a tokenizers JSON file"):
        TextTokenizer.from_file(str(tmp_path / "junk.json"), text_len=8)
    spec = json.loads(trained.read_text())
    vocab = spec["model"]["vocab"]
    vocab["[PAD]"], vocab["[SOI]"] = vocab["[SOI]"], vocab["[PAD]"]
    spec["added_tokens"] = [dict(t, id=vocab[t["content"]]) for t in spec["added_tokens"]]
    (tmp_path / "swapped.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"swapped.json: special token \[PAD\] has id 2, expected 0"):
        TextTokenizer.from_file(str(tmp_path / "swapped.json"), text_len=8)


def test_strict_mode_refuses_a_too_small_corpus(tmp_path):
    _write_shards(tmp_path / "s", _captions(50), ext="jpg")
    with pytest.raises(ValueError, match=r"gave only \d+ of 2000 tokens"):
        train_text_tokenizer.main(["--shards", str(tmp_path / "s"), "--vocab-size", "2000",
                                   "--output", str(tmp_path / "t.json"), "--strict", "--no-progress"])
    assert not (tmp_path / "t.json").exists()


def test_keyed_bpe_dropout_is_a_function_of_the_seed_and_matches_the_library_at_zero(trained):
    tok = TextTokenizer.from_file(str(trained), text_len=48)
    captions = ["a large orange hexagon right of a yellow triangle", "Café au lait ☕ over  the  purple star",
                "x", "ünïcödé 123 !!"]
    rng = __import__("random").Random(0)
    assert [tok.encode_dropout(" ".join(c.lower().split()), 0.0, rng) for c in captions] == \
        [row[row != tok.pad_id].tolist() for row in tok.encode(captions)]  # the library's own segmentation
    a = tok.encode(captions, dropout=0.1, seeds=[1, 2, 3, 4])
    assert torch.equal(a, tok.encode(captions, dropout=0.1, seeds=[1, 2, 3, 4]))  # same seeds, same ids
    variants = {tuple(tok.encode(captions[:1], dropout=0.3, seeds=[s])[0].tolist()) for s in range(20)}
    assert len(variants) > 1
    for ids in variants:
        assert tok.decode([list(ids)]) == [captions[0]]
    with pytest.raises(ValueError, match="2 seeds for 4 captions"):
        tok.encode(captions, dropout=0.1, seeds=[1, 2])
