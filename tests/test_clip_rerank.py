"""CLIP reranking: order from constructed embeddings, a tiny CLIP that learned its pairs ranks the
right candidate first, the project's processor pools at the first [PAD], Hugging Face folders load
offline, and train_clip writes a folder that loads back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dalle_ds.sampling.rerank import ClipScorer, ProjectClipProcessor, clip_score, rank, rerank
from dalle_ds.train_clip import MEAN, STD, build_clip, train
from tests.eval_fixtures import train_tokenizer, write_image_shards

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle at the top"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("cliptok")
    write_image_shards(root / "shards", 48, size=16)
    return train_tokenizer(root / "shards", root / "tokenizer.json", 320)


def test_rank_orders_by_cosine_and_keeps_k():
    text = torch.tensor([1.0, 0.0])
    imgs = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.2], [1.0, 1.0], [-1.0, 0.0],
                                                        [1.0, 0.2]]), dim=-1)
    keep, scores = rank(imgs, text, 3)
    assert keep.tolist() == [1, 4, 2]  # tie between 1 and 4: the earlier first
    torch.testing.assert_close(scores, imgs[:, 0])
    with pytest.raises(ValueError, match="keep=6"):
        rank(imgs, text, 6)


def _pairs():
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9], [0.1, 0.8, 0.2], [0.9, 0.9, 0.1]])
    images = colours[:, :, None, None].expand(-1, -1, 16, 16).clone()
    images[:, :, :8, :8] = 1.0 - images[:, :, :8, :8]  # not flat: the patch embedding sees structure
    return images


def test_trained_tiny_clip_ranks_the_matching_candidate_first(tokenizer, tmp_path):
    torch.manual_seed(0)
    proc = ProjectClipProcessor(str(tokenizer), 12, 16, MEAN, STD)
    model = build_clip(proc, seed=0, width=32, layers=1, heads=2, patch=8, embed_dim=16)
    images = _pairs()
    losses = train(model, proc, iter(lambda: {"images": images, "captions": CAPTIONS}, None), steps=80, lr=3e-3,
                   progress=False)
    assert losses[-1] < 0.5 * losses[0]
    model.save_pretrained(str(tmp_path / "clip"))
    proc.save(tmp_path / "clip")
    scorer = ClipScorer.load(tmp_path / "clip")
    assert isinstance(scorer.processor, ProjectClipProcessor)
    candidates = images[[2, 0, 3, 1]]  # the image of caption i is at position [1, 3, 0, 2][i]
    for i, where in enumerate([1, 3, 0, 2]):
        keep, scores = rerank(scorer, candidates, CAPTIONS[i], 2)
        assert keep[0].item() == where, (CAPTIONS[i], scores)
        assert scores[keep[0]] >= scores[keep[1]]
    matched = clip_score(scorer, images, CAPTIONS)
    shuffled = clip_score(scorer, images[[1, 2, 3, 0]], CAPTIONS)
    assert 0 <= shuffled < matched <= 100


def test_project_processor_pools_the_first_pad(tokenizer):
    """Every row ends in [PAD]; the text embedding does not depend on how many pads follow."""
    proc_short = ProjectClipProcessor(str(tokenizer), 10, 16, MEAN, STD)
    proc_long = ProjectClipProcessor(str(tokenizer), 20, 16, MEAN, STD)
    ids = proc_short.text(["a very very very long caption about many many things", "a red circle"])["input_ids"]
    assert ids.shape == (2, 10) and (ids[:, -1] == 0).all()
    torch.manual_seed(0)
    model = build_clip(proc_long, width=32, layers=1, heads=2, patch=8, embed_dim=16).eval()
    a = ClipScorer(model, proc_short).text_embeds(["a red circle"])
    b = ClipScorer(model, proc_long).text_embeds(["a red circle"])
    torch.testing.assert_close(a, b)


def test_hugging_face_clip_folder_loads_offline(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in ("a</w>", "red</w>", "blue</w>", "circle</w>", "square</w>", "a", "b", "c", "d", "e", "l", "r", "u"):
        vocab[w] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    folder = tmp_path / "hf"
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(folder))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, eos_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=16, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(folder))
    scorer = ClipScorer.load(folder)
    assert not isinstance(scorer.processor, ProjectClipProcessor)
    imgs = torch.rand(3, 3, 16, 16)
    keep, scores = rerank(scorer, imgs, "a red circle", 3)
    assert sorted(keep.tolist()) == [0, 1, 2] and scores[keep[0]] == scores.max()
    # same numbers as the model called by hand on the processor's tensors
    enc = scorer.processor.processor(text=["a red circle"], images=[(x * 255).round().byte().permute(1, 2, 0).numpy()
                                                                    for x in imgs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**enc)
    torch.testing.assert_close(scores, torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ClipScorer.load(tmp_path / "nothing")


def test_train_clip_cli_writes_a_loadable_folder(tmp_path, tokenizer):
    from dalle_ds import train_clip

    write_image_shards(tmp_path / "shards", 32, size=16)
    out = tmp_path / "clip"
    code = train_clip.main(["--shards", str(tmp_path / "shards"), "--tokenizer", str(tokenizer), "--out",
                            str(out), "--steps", "3", "--batch-size", "8", "--image-size", "16", "--width", "32",
                            "--layers", "1", "--heads", "2", "--context-length", "16", "--log-every", "2",
                            "--tensorboard"])
    assert code == 0
    log = json.loads((out / "train_log.json").read_text())
    # contrastive loss of a batch of 8: ln 8 ~ 2.08 for an untrained model; finite and of that order after 3 steps
    assert log["steps"] == 3 and math.isfinite(log["final_loss"]) and 0.0 < log["final_loss"] < 2 * math.log(8)
    assert log["args"]["log_every"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # the trainers' logger
    assert [r["step"] for r in rows] == [2, 3] and {"loss", "lr", "images_per_s"} <= rows[0].keys()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    s = ClipScorer.load(out)
    assert s.processor.context_length == 16 and s.image_embeds(torch.rand(2, 3, 16, 16)).shape == (2, 64)
