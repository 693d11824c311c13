"""The transformer prior: shapes, loss weighting, padding embeddings, causality, sizes."""

import pytest
import torch

from dalle_ds.config import ModelConfig, load_config, replace
from dalle_ds.models.prior import PAD_ID, Prior, keep_fp32, no_decay

SMALL = ModelConfig(n_layers=3, n_heads=2, d_model=16, mlp_ratio=2, text_len=6, text_vocab_size=30, image_grid=4,
                    image_vocab_size=20, conv_kernel=3, attention="sparse", activation_checkpointing=False)


def _model(cfg=SMALL, seed=0, **changes):
    torch.manual_seed(seed)
    return Prior(replace(cfg, **changes) if changes else cfg).double()


def _batch(cfg=SMALL, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab_size, (b, cfg.text_len), generator=g)
    text[0, 4:] = PAD_ID  # a padded caption
    codes = torch.randint(0, cfg.image_vocab_size, (b, cfg.image_len), generator=g)
    return text, codes


def test_shapes_dtypes_and_layer_pattern():
    model = Prior(SMALL)
    text, codes = _batch()
    text_logits, image_logits = model(text, codes)
    assert text_logits.shape == (2, 6, 30) and text_logits.dtype == torch.float32
    assert image_logits.shape == (2, 16, 20) and image_logits.dtype == torch.float32
    assert [blk.attn.kind for blk in model.blocks] == ["row", "column", "conv"]
    # one backend object per layer type, shared by the layers of that type
    deep = Prior(replace(SMALL, n_layers=6))
    rows = [blk.attn.backend for blk in deep.blocks if blk.attn.kind == "row"]
    assert len(rows) == 4 and all(r is rows[0] for r in rows)


def test_loss_is_weighted_per_modality_mean_cross_entropy():
    model = _model(text_loss_weight=0.25, image_loss_weight=2.0)
    text, codes = _batch()
    text_logits, image_logits = model(text, codes)
    # by hand: text position t predicts text t+1 (T-1 targets per row), image slot j predicts code j
    lt = -torch.log_softmax(text_logits, -1)
    li = -torch.log_softmax(image_logits, -1)
    text_ce = sum(lt[b, t, text[b, t + 1]] for b in range(2) for t in range(5)) / (2 * 5)
    image_ce = sum(li[b, j, codes[b, j]] for b in range(2) for j in range(16)) / (2 * 16)
    loss, parts = model.loss(text, codes)
    torch.testing.assert_close(parts["text_loss"], text_ce)
    torch.testing.assert_close(parts["image_loss"], image_ce)
    torch.testing.assert_close(loss, 0.25 * text_ce + 2.0 * image_ce)


def test_paper_loss_weights_are_the_default():
    cfg = ModelConfig()
    assert (cfg.text_loss_weight, cfg.image_loss_weight) == (1 / 8, 7 / 8)


def test_per_position_padding_embedding():
    model = _model()
    text, codes = _batch()
    emb = model.embed
    h = emb(text, codes)
    # padded positions 4, 5 of row 0 are exactly their own padding vectors (no token, no position)
    torch.testing.assert_close(h[0, 4], emb.text_pad[4])
    torch.testing.assert_close(h[0, 5], emb.text_pad[5])
    assert not torch.allclose(emb.text_pad[4], emb.text_pad[5])
    torch.testing.assert_close(h[0, 1], emb.text_tok[text[0, 1]] + emb.text_pos[1])
    # the padding vectors get gradient only from padded positions
    loss, _ = model.loss(text, codes)
    loss.backward()
    assert emb.text_pad.grad[4].abs().sum() > 0
    assert emb.text_pad.grad[:4].abs().sum() == 0
    assert emb.text_tok.grad[PAD_ID].abs().sum() == 0  # the pad id's token row is never used


def test_image_inputs_are_soi_then_shifted_codes_with_row_and_column_embeddings():
    model = _model()
    text, codes = _batch()
    emb = model.embed
    h = emb(text, codes)[:, SMALL.text_len:]  # (B, N, d)
    torch.testing.assert_close(h[1, 0], emb.soi + emb.image_row[0] + emb.image_col[0])
    j = 6  # slot (1, 2) holds code 5 and predicts code 6
    torch.testing.assert_close(h[1, j], emb.image_tok[codes[1, j - 1]] + emb.image_row[1] + emb.image_col[2])


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_causality(attention):
    model = _model(attention=attention).eval()
    text, codes = _batch()
    t_logits, i_logits = model(text, codes)
    # change text token 3: text logits at positions < 3 unchanged, later ones and all image logits change
    text2 = text.clone()
    text2[:, 3] = (text2[:, 3] % (SMALL.text_vocab_size - 1)) + 1
    t2, i2 = model(text2, codes)
    torch.testing.assert_close(t2[:, :3], t_logits[:, :3])
    assert not torch.allclose(t2[:, 3], t_logits[:, 3])
    assert not torch.allclose(i2, i_logits)
    # change code 7: image logits for codes 0..7 unchanged (code 7 is input only to slot 8), text unchanged
    codes2 = codes.clone()
    codes2[:, 7] = (codes2[:, 7] + 1) % SMALL.image_vocab_size
    t3, i3 = model(text, codes2)
    torch.testing.assert_close(t3, t_logits)
    torch.testing.assert_close(i3[:, :8], i_logits[:, :8])
    assert not torch.allclose(i3[:, 8], i_logits[:, 8])
    # the last code is never an input
    codes3 = codes.clone()
    codes3[:, -1] = (codes3[:, -1] + 1) % SMALL.image_vocab_size
    torch.testing.assert_close(model(text, codes3)[1], i_logits)


def test_backends_give_the_same_model_outputs_and_gradients():
    text, codes = _batch()
    results = {}
    for attention in ("dense", "sparse"):
        model = _model(attention=attention)
        loss, _ = model.loss(text, codes)
        loss.backward()
        results[attention] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["sparse"][0], results["dense"][0])
    for name, grad in results["dense"][1].items():
        torch.testing.assert_close(results["sparse"][1][name], grad, msg=name)


def test_activation_checkpointing_gives_the_same_gradients():
    text, codes = _batch()
    grads = []
    for ckpt in (False, True):
        model = _model(activation_checkpointing=ckpt).train()
        loss, _ = model.loss(text, codes)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_branch_fn_sees_every_residual_branch_in_order():
    model = _model()
    text, codes = _batch()
    seen = []

    def fn(branch, h, idx):
        seen.append((idx, type(branch).__name__))
        return 0.0 * branch(h)  # drop every branch: the output depends on the embeddings alone

    model.set_branch_fn(fn)
    t_logits, i_logits = model(text, codes)
    assert seen == [(i, "AttentionBranch" if i % 2 == 0 else "MLPBranch") for i in range(6)]
    h = model.ln_f(model.embed(text, codes))
    torch.testing.assert_close(i_logits, model.image_head(h[:, SMALL.text_len:]).to(i_logits.dtype))
    model.set_branch_fn(None)
    assert not torch.allclose(model(text, codes)[1], i_logits)


def test_prefix_logits_match_the_full_forward():
    model = _model().eval()
    text, codes = _batch()
    _, i_logits = model(text, codes)
    for n in (0, 5, SMALL.image_len - 1):
        torch.testing.assert_close(model.prefix_logits(text, codes[:, :n]), i_logits[:, :n + 1])


def test_no_decay_and_keep_fp32_name_rules():
    model = Prior(SMALL)
    decayed = {n for n, p in model.named_parameters() if not no_decay(n, p)}
    assert decayed == {f"blocks.{i}.{m}.weight" for i in range(3) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")} \
        | {"text_head.weight", "image_head.weight"}
    for name in ("embed.text_pad", "embed.image_row", "blocks.0.attn.ln.weight", "ln_f.weight", "blocks.2.mlp.fc.bias"):
        assert no_decay(name) and no_decay("module." + name)
    assert keep_fp32("text_head.weight") and keep_fp32("module.image_head.weight")
    assert not keep_fp32("blocks.0.mlp.fc.weight")


def test_param_count_formula():
    tiny = load_config("tiny").model
    assert Prior.num_params(tiny) == sum(p.numel() for p in Prior(tiny).parameters())
    assert Prior.num_params(SMALL) == sum(p.numel() for p in Prior(SMALL).parameters())
    paper = load_config("paper").model
    assert 11.5e9 < Prior.num_params(paper) < 12.5e9  # "12 billion parameters"
    # FLOPs: the sparse count is below the dense one, both above 6 x non-embedding params per token
    dense, sparse = Prior.flops_per_sequence(tiny, dense_attention=True), Prior.flops_per_sequence(tiny)
    assert sparse < dense
    assert sparse > 6 * tiny.n_layers * 12 * tiny.d_model**2 * tiny.seq_len


def test_bad_inputs_are_named():
    model = Prior(SMALL)
    text, codes = _batch()
    with pytest.raises(ValueError, match=r"text: expected int64 \(B, 6\)"):
        model(text[:, :5], codes)
    with pytest.raises(ValueError, match="codes: expected"):
        model(text, codes[:, :-1])
    with pytest.raises(ValueError, match=r"codes: token ids must be in \[0, 20\)"):
        model(text, codes + 20)
    with pytest.raises(ValueError, match="text: token ids"):
        model(text - 1, codes)
    with pytest.raises(ValueError, match="codes_prefix"):
        model.prefix_logits(text, codes)


def test_text_len_one_has_no_text_targets():
    cfg = replace(SMALL, text_len=1)
    model = Prior(cfg)
    text = torch.ones(2, 1, dtype=torch.long)
    codes = torch.zeros(2, cfg.image_len, dtype=torch.long)
    loss, parts = model.loss(text, codes)
    assert float(parts["text_loss"]) == 0.0
    torch.testing.assert_close(loss, cfg.image_loss_weight * parts["image_loss"])
