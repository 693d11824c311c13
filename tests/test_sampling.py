"""KV-cache sampling: cached logits equal the uncached forward for every layer type, per-candidate
seeds, filtering, image completion keeps the prompt rows, and the sample CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from dalle_ds.models.kv_cache import CachedDecoder
from dalle_ds.models.prior import Prior
from dalle_ds.sampling.generate import SamplingSettings, default_prompt_rows, filter_logits, generate
from tests.eval_fixtures import make_exports, tiny_model_config


def _inputs(cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, cfg.text_vocab_size, (b, cfg.text_len), generator=g)
    text[:, cfg.text_len // 2:] = 0  # padded tail: per-position padding embeddings
    codes = torch.randint(0, cfg.image_vocab_size, (b, cfg.image_len), generator=g)
    return text, codes


def _cached_logits(prior, text, codes, n_prompt=0):
    dec = CachedDecoder(prior, text.shape[0])
    out = [dec.prefill(text, codes[:, :n_prompt] if n_prompt else None)]
    for a in range(n_prompt + 1, prior.cfg.image_len):
        out.append(dec.step(codes[:, a - 1]))
    return torch.stack(out, 1)  # (B, N - n_prompt, Vi)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_cached_logits_equal_the_uncached_forward(attention):
    torch.manual_seed(0)
    prior = Prior(tiny_model_config(image_grid=6, attention=attention)).eval()
    assert set(prior.kinds) == {"row", "column", "conv"}
    text, codes = _inputs(prior.cfg)
    _, ref = prior(text, codes)  # (B, N, Vi)
    got = _cached_logits(prior, text, codes)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # with a prompt prefilled at once
    got = _cached_logits(prior, text, codes, n_prompt=9)
    torch.testing.assert_close(got, ref[:, 9:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["dense", "sparse", "flex"])
def test_causal_layer_pattern_cached_logits_and_backends_agree(attention):
    """model.layer_pattern=causal: every backend takes the plain causal path (flex: its block mask)
    and agrees with an explicit masked SDPA; the cache equals the uncached forward."""
    torch.manual_seed(2)
    cfg = tiny_model_config(image_grid=5, attention=attention, layer_pattern="causal")
    prior = Prior(cfg).eval()
    assert prior.kinds == ["causal"] * cfg.n_layers
    text, codes = _inputs(cfg, seed=2)
    if attention == "flex":  # forward-only eager on CPU: compare the backend's output alone
        q, k, v = torch.randn(3, 2, 2, cfg.seq_len, 8).unbind(0)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=prior.backends["causal"].mask)
        torch.testing.assert_close(prior.backends["causal"](q, k, v), ref, atol=1e-5, rtol=1e-5)
        return
    _, ref = prior(text, codes)
    torch.testing.assert_close(_cached_logits(prior, text, codes), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_cached_logits(prior, text, codes, n_prompt=7), ref[:, 7:], atol=1e-5, rtol=1e-5)
    # the cache's step attends to every earlier position (no sparsity)
    dec = CachedDecoder(prior, 1)
    assert dec.allowed("causal", cfg.seq_len - 1).numel() == cfg.seq_len


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_each_layer_type_alone_matches(kind):
    """Every layer switched to one mask type: the cache gathers exactly that mask row's keys."""
    torch.manual_seed(1)
    prior = Prior(tiny_model_config(image_grid=6, n_layers=4, conv_kernel=5)).eval()
    for blk in prior.blocks:
        blk.attn.backend, blk.attn.kind = prior.backends[kind], kind
    text, codes = _inputs(prior.cfg, seed=1)
    _, ref = prior(text, codes)
    torch.testing.assert_close(_cached_logits(prior, text, codes), ref, atol=1e-5, rtol=1e-5)
    # the step really is sparse: a row step sees the text plus G+1 slots, not every earlier position
    dec = CachedDecoder(prior, 1)
    t, g = prior.cfg.text_len, prior.cfg.image_grid
    p = t + 3 * g + 2
    n_allowed = len(dec.allowed(kind, p))
    assert n_allowed == int(prior.backends[kind].mask[p].sum()) < p + 1
    if kind == "row":
        assert n_allowed == t + g + 1


def test_cache_and_no_cache_sample_the_same_codes_and_seeds_are_per_candidate():
    torch.manual_seed(2)
    prior = Prior(tiny_model_config(image_grid=4)).eval()
    text, _ = _inputs(prior.cfg, b=4)
    s = SamplingSettings(temperature=1.0, top_k=8, top_p=0.95)
    a = generate(prior, text, [10, 11, 12, 13], s)
    b = generate(prior, text, [10, 11, 12, 13], s, use_cache=False)
    assert torch.equal(a, b)
    # candidate 2 alone, with its seed, reproduces its row; a different seed gives a different sample
    assert torch.equal(generate(prior, text[2:3], [12], s), a[2:3])
    assert not torch.equal(generate(prior, text[2:3], [99], s), a[2:3])
    assert a.shape == (4, 16) and int(a.max()) < prior.cfg.image_vocab_size


def test_filtering_top_k_top_p_and_greedy():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    k2 = filter_logits(logits, SamplingSettings(top_k=2))
    assert torch.isinf(k2[0, :2]).all() and torch.isfinite(k2[0, 2:]).all()
    assert torch.isinf(k2[1, 2:]).all() and torch.isfinite(k2[1, :2]).all()
    # probabilities of [3,2,1,0]: .644 .237 .087 .032 -> top_p .8 keeps the first two
    p8 = filter_logits(logits, SamplingSettings(top_p=0.8))
    assert torch.isfinite(p8[1, :2]).all() and torch.isinf(p8[1, 2:]).all()
    assert torch.isfinite(filter_logits(logits, SamplingSettings(top_p=0.01))[1, 0])  # the best always stays
    prior = Prior(tiny_model_config(image_grid=4)).eval()
    text, _ = _inputs(prior.cfg, b=2)
    g1 = generate(prior, text, [0, 1], SamplingSettings(temperature=0))
    g2 = generate(prior, text, [5, 6], SamplingSettings(temperature=0))
    assert torch.equal(g1, g2)  # greedy ignores the seeds
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0).validate()


def test_completion_keeps_the_prompt_rows():
    torch.manual_seed(3)
    prior = Prior(tiny_model_config(image_grid=8)).eval()
    text, codes = _inputs(prior.cfg, b=3)
    rows = default_prompt_rows(8)
    assert rows == 3 and default_prompt_rows(32) == 15
    n = rows * 8
    out = generate(prior, text, [1, 2, 3], prompt_codes=codes[:, :n])
    assert torch.equal(out[:, :n], codes[:, :n])
    assert not torch.equal(out[:, n:], codes[:, n:])
    ref = generate(prior, text, [1, 2, 3], prompt_codes=codes[:, :n], use_cache=False)
    assert torch.equal(out, ref)


def test_sample_cli_writes_grid_json_and_completion(tmp_path):
    from PIL import Image

    from dalle_ds import sample
    from dalle_ds.sampling import grids, pipeline
    from dalle_ds.models.dvae_io import load_dvae
    from tests.eval_fixtures import train_tokenizer, write_image_shards

    write_image_shards(tmp_path / "shards", 64, size=16)
    tok = train_tokenizer(tmp_path / "shards", tmp_path / "tok.json", 320)
    prior_dir, dvae_dir = make_exports(tmp_path, grid=8)
    out = tmp_path / "out"
    rec = sample.main(["--checkpoint", str(prior_dir), "--dvae", str(dvae_dir), "--tokenizer", str(tok),
                       "--prompt", "a red circle", "--prompt", "a blue square", "-n", "4", "--keep", "2",
                       "--top-k", "8", "--out", str(out), "--device", "cpu"])
    saved = json.loads((out / "samples.json").read_text())
    assert saved["prompts"][1]["caption"] == "a blue square" and saved["prompts"][1]["seeds"] == [4, 5]
    assert Image.open(out / "grid_000.png").size[0] > 16
    assert (out / "kept" / "001_01.png").is_file()
    assert (out / "kept" / "001_01.txt").read_text().strip() == "a blue square"
    assert saved["prompts"][1]["files"] == ["kept/001_00.png", "kept/001_01.png"]
    assert rec["prompts"][0]["scores"] is None  # no --clip: first k, unscored

    # completion: the prompt image's top rows survive into every sample's codes
    img = torch.rand(3, 16, 16)
    grids.to_pil(img).save(tmp_path / "prompt.png")
    out2 = tmp_path / "out2"
    sample.main(["--checkpoint", str(prior_dir), "--dvae", str(dvae_dir), "--tokenizer", str(tok),
                 "--prompt", "a red circle", "-n", "2", "--keep", "2", "--image-prompt", str(tmp_path / "prompt.png"),
                 "--prompt-rows", "3", "--out", str(out2), "--device", "cpu"])
    vae = load_dvae(str(dvae_dir))
    # expected codes from the image's own pixels (already 16x16: no crop or resize), not through load_image
    pixels = (img * 255).round() / 255
    want = vae.encode(pixels.unsqueeze(0)).reshape(1, -1)[:, :24]  # the top 3 rows of the 8x8 grid
    pipe = pipeline.Pipeline(str(prior_dir), str(dvae_dir), str(tok))
    prompt = pipe.prompt_codes(str(tmp_path / "prompt.png"), 3)
    assert torch.equal(prompt, want)
    r = pipe.sample("a red circle", 2, 2, 0, SamplingSettings(), prompt)
    assert torch.equal(r["codes"][:, :24], want.expand(2, -1))
    free = pipe.sample("a red circle", 2, 2, 0, SamplingSettings())  # same seeds, no prompt
    assert not torch.equal(free["codes"][:, :24], r["codes"][:, :24])
    assert json.loads((out2 / "samples.json").read_text())["prompt_rows"] == 3


def test_demo_eval_prints_caption_match_with_and_without_reranking(tmp_path, capsys):
    from dalle_ds import evaluate_captions as demo_eval
    from tests.eval_fixtures import train_tokenizer, write_image_shards

    write_image_shards(tmp_path / "shards", 32, size=16, split="train")
    # what `make demo` writes: held-out meanings only, another seed
    heldout_caps = write_image_shards(tmp_path / "heldout_shards", 16, size=16, seed=1, split="heldout")
    tok = train_tokenizer(tmp_path / "shards", tmp_path / "tokenizer.json", 320)
    prior_dir, dvae_dir = make_exports(tmp_path, grid=8)  # 16px images
    res = demo_eval.main(["--run", str(tmp_path), "--checkpoint", str(prior_dir), "--dvae", str(dvae_dir),
                          "--clip-steps", "2", "--tokenizer", str(tok), "--dev-captions", "1", "--captions", "2",
                          "-n", "3", "--keep", "2", "--references", "6", "--batch-size", "4", "--bootstrap", "50",
                          "--temperature", "0.9", "--guidance-scale", "2"])
    out = capsys.readouterr().out
    assert "caption-match without reranking" in out and "top-1" in out
    assert "sampling temperature 0.9, top-k 0, top-p 1.0, guidance scale 2.0" in out
    assert res["sampling"] == {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "guidance_scale": 2.0}
    assert f"2 test captions and 6 references from {tmp_path / 'heldout_shards'}" in out
    assert "held-out overlap with training: 0/2 caption strings, 0/2 meanings (32 distinct training captions)" in out
    assert "judge CLIP (separately trained, seed 1; not the reranker)" in out
    assert {"without_rerank", "rerank_top1", "rerank_top2", "first_candidate", "any_of_n"} == set(res["caption_match"])
    assert all(0.0 <= v <= 1.0 for v in res["caption_match"].values())
    lo, hi = res["rates"]["rerank_top1"]["ci95"]
    assert 0.0 <= lo <= res["caption_match"]["rerank_top1"] <= hi <= 1.0
    assert res["ceilings"]["real"]["rate"] > 0.5  # real held-out scenes do match their captions
    saved = json.loads((tmp_path / "eval" / "demo_eval.json").read_text())
    distinct = list(dict.fromkeys(heldout_caps))
    assert [p["caption"] for p in saved["prompts"]] == distinct[1:3]  # after the dev caption
    assert len(saved["prompts"][0]["candidate_match"]) == 3
    assert (tmp_path / "clip" / "config.json").is_file() and (tmp_path / "clip_judge" / "config.json").is_file()
    assert (tmp_path / "eval" / "grid.png").is_file()
    assert len(list((tmp_path / "eval" / "kept").glob("*.png"))) == 4


def test_demo_eval_refuses_captions_seen_in_training(tmp_path, capsys):
    from dalle_ds import evaluate_captions as demo_eval
    from tests.eval_fixtures import train_tokenizer, write_image_shards

    write_image_shards(tmp_path / "shards", 32, size=16)  # unsplit corpus, seed 0 ...
    write_image_shards(tmp_path / "heldout_shards", 24, size=16)  # ... the same scenes as "held out"
    tok = train_tokenizer(tmp_path / "shards", tmp_path / "tokenizer.json", 320)
    prior_dir, dvae_dir = make_exports(tmp_path, grid=8)
    with pytest.raises(SystemExit) as e:
        demo_eval.main(["--run", str(tmp_path), "--checkpoint", str(prior_dir), "--dvae", str(dvae_dir),
                        "--tokenizer", str(tok), "--dev-captions", "1", "--captions", "2", "--references", "2"])
    assert e.value.code == demo_eval.EXIT_OVERLAP
    assert "held-out overlap with training: 2/2 caption strings, 2/2 meanings" in capsys.readouterr().out
    assert not (tmp_path / "clip").exists()  # refused before any CLIP training


def test_guidance_combines_the_caption_and_the_empty_caption():
    """Classifier-free guidance: s = 0 samples the empty-caption model, s = 1 the plain one, and any s
    equals the uncached reference u + s * (c - u) computed by hand; the KV cache agrees with it."""
    from dalle_ds.models.prior import PAD_ID

    torch.manual_seed(4)
    prior = Prior(tiny_model_config(image_grid=4)).eval()
    text, _ = _inputs(prior.cfg, b=3)
    empty = torch.full_like(text, PAD_ID)
    seeds = [7, 8, 9]
    plain = SamplingSettings(temperature=1.0)
    assert torch.equal(generate(prior, text, seeds, SamplingSettings(guidance_scale=0.0)),
                       generate(prior, empty, seeds, plain))
    assert torch.equal(generate(prior, text, seeds, SamplingSettings(guidance_scale=1.0)),
                       generate(prior, text, seeds, plain))
    # s = 3, greedy: by hand, one uncached forward per code for each caption
    s = 3.0
    guided = generate(prior, text, seeds, SamplingSettings(temperature=0, guidance_scale=s))
    codes = torch.zeros(3, prior.cfg.image_len, dtype=torch.long)
    for a in range(prior.cfg.image_len):
        c = prior.prefix_logits(text, codes[:, :a])[:, a]
        u = prior.prefix_logits(empty, codes[:, :a])[:, a]
        codes[:, a] = (u + s * (c - u)).argmax(-1)
    assert torch.equal(guided, codes)
    assert not torch.equal(guided, generate(prior, text, seeds, SamplingSettings(temperature=0)))
    # sampled (not greedy) and with a prompt: the cache and the uncached path draw the same codes
    st = SamplingSettings(temperature=1.0, top_k=8, guidance_scale=2.5)
    prompt = codes[:, :5]
    assert torch.equal(generate(prior, text, seeds, st, prompt_codes=prompt),
                       generate(prior, text, seeds, st, prompt_codes=prompt, use_cache=False))
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplingSettings(guidance_scale=-1).validate()
