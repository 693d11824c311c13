"""OpenAI's released dVAE (PyPI DALL-E 0.1, module dall_e) -> dalle_ds: outputs match to 1e-5."""

from __future__ import annotations

import pytest
import torch

dall_e = pytest.importorskip("dall_e", reason="pip install --no-deps DALL-E==0.1")

from dalle_ds.convert_openai_dvae import convert, main  # noqa: E402
from dalle_ds.models.dvae_io import load_dvae  # noqa: E402


def _random_openai(n_hid: int, n_init: int, vocab: int, seed: int):
    torch.manual_seed(seed)
    enc = dall_e.Encoder(n_hid=n_hid, vocab_size=vocab)
    dec = dall_e.Decoder(n_hid=n_hid, n_init=n_init, vocab_size=vocab)
    for m in (enc, dec):  # their init leaves biases at zero: randomise them too so they are compared
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(".b"):
                    p.normal_(std=0.1)
    return enc.eval(), dec.eval()


def _max_diffs(enc, dec, vae, side: int, batch: int = 2) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, side, side, generator=gen)
    grid = side // 8
    z = torch.softmax(4 * torch.randn(batch, vae.cfg.codebook_size, grid, grid, generator=gen), dim=1)
    with torch.no_grad():
        logits_theirs = enc(dall_e.map_pixels(x))
        logits_ours = vae.logits(x)
        stats_theirs = dec(z).float()
        mu, ln_b = vae.decode_stats(z)
    assert logits_ours.dtype == torch.float32 and logits_ours.shape == logits_theirs.shape
    return (float((logits_ours - logits_theirs).abs().max()),
            float((torch.cat([mu, ln_b], 1) - stats_theirs).abs().max()))


def test_small_random_weights_match():
    enc, dec = _random_openai(n_hid=64, n_init=16, vocab=512, seed=0)
    vae = convert(enc, dec)
    assert vae.cfg.group_count == 4 and vae.cfg.n_hid == 64 and vae.cfg.n_init == 16
    d_enc, d_dec = _max_diffs(enc, dec, vae, side=32)
    assert d_enc <= 1e-5 and d_dec <= 1e-5
    # decode(codes) is their recipe: unmap(sigmoid(dec(one_hot)[:, :3]))
    codes = vae.encode(torch.rand(1, 3, 32, 32))
    one_hot = torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        theirs = dall_e.unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
    assert float((vae.decode(codes) - theirs).abs().max()) <= 1e-5


def test_paper_size_random_weights_match():
    enc, dec = _random_openai(n_hid=256, n_init=128, vocab=8192, seed=1)  # the released sizes
    vae = convert(enc, dec)
    assert vae.cfg.codebook_size == 8192 and vae.cfg.downsample == 8
    d_enc, d_dec = _max_diffs(enc, dec, vae, side=32, batch=1)
    assert d_enc <= 1e-5 and d_dec <= 1e-5


def test_command_line_on_pickles(tmp_path):
    enc, dec = _random_openai(n_hid=64, n_init=16, vocab=512, seed=2)
    torch.save(enc, tmp_path / "encoder.pkl")  # the released files are whole pickled modules
    torch.save(dec, tmp_path / "decoder.pkl")
    main(["--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl"),
          "--output", str(tmp_path / "out")])
    vae = load_dvae(str(tmp_path / "out"))
    d_enc, d_dec = _max_diffs(enc, dec, vae, side=16)
    assert d_enc <= 1e-5 and d_dec <= 1e-5


def test_mismatched_pair_and_urls_are_refused(tmp_path):
    enc, _ = _random_openai(n_hid=64, n_init=16, vocab=512, seed=3)
    _, dec = _random_openai(n_hid=128, n_init=16, vocab=512, seed=3)
    with pytest.raises(ValueError, match="disagree on n_hid: 64 vs 128"):
        convert(enc, dec)
    with pytest.raises(SystemExit, match="only local paths"):
        main(["--encoder", "https://cdn.openai.com/dall-e/encoder.pkl", "--decoder", "d.pkl", "--output", "o"])
