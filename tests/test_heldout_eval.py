"""The honest held-out evaluation: the meaning split never leaks, the intervals are the textbook
values, the per-attribute counts count what the scorer checked."""

from __future__ import annotations

import json
import math

import pytest

from dalle_ds.evaluation import shapes_scorer as ss
from dalle_ds.evaluation.stats import cluster_bootstrap, wilson
from data_prep import make_shapes_corpus as msc


# ---------------------------------------------------------------- the split
def test_caption_key_collapses_synonyms_and_templates_but_not_meanings():
    k = ss.caption_key
    assert k("a small red circle above a large blue square") == k("a little red circle over a big blue square")
    assert k("a white background with a large green triangle on the left") == \
        k("a large green triangle on the left side of a white background")
    assert k("a red circle") != k("a small red circle")  # a more specific caption is another meaning
    assert k("a red circle above a blue square") != k("a blue square above a red circle")
    assert k("a red circle and a blue square") != k("a red circle above a blue square")
    assert k("a red circle") == "1|red circle -|rel=-|pos=-|bg=-"


def test_heldout_and_train_meanings_are_disjoint_across_seeds():
    train = [msc.make_sample(seed, i, 32, "train")[2] for seed in (0, 5) for i in range(300)]
    held = [msc.make_sample(1, i, 32, "heldout")[2] for i in range(120)]
    train_keys = {ss.caption_key(t["caption"]) for t in train}
    held_keys = {ss.caption_key(t["caption"]) for t in held}
    assert train_keys.isdisjoint(held_keys)
    assert {t["caption"] for t in train}.isdisjoint({t["caption"] for t in held})
    # the recorded key is the caption's, and the hash puts it on its side
    assert all(t["caption_key"] == ss.caption_key(t["caption"]) and t["split"] == "heldout" for t in held)
    assert all(msc.is_heldout(t["caption_key"]) for t in held)
    assert not any(msc.is_heldout(t["caption_key"]) for t in train)
    assert len(held_keys) > 60  # many distinct held-out meanings, not a handful repeated


def test_unsplit_corpus_leaks_which_is_what_the_split_prevents():
    """The check above can fail: an unsplit corpus of another seed shares meanings with seed 0's."""
    a = {ss.caption_key(msc.make_sample(0, i, 32)[1]) for i in range(400)}
    b = {ss.caption_key(msc.make_sample(1, i, 32)[1]) for i in range(400)}
    assert len(a & b) > 20


def test_split_all_is_the_unsplit_corpus_byte_for_byte_and_held_fraction_is_near_the_setting():
    assert msc.make_sample(3, 7, 32) == msc.make_sample(3, 7, 32, "all")
    keys = [ss.caption_key(msc.make_sample(0, i, 32)[1]) for i in range(2000)]
    share = sum(msc.is_heldout(k) for k in keys) / len(keys)
    assert 0.02 < share < 0.09  # fraction 0.05 of meanings (samples weight meanings unevenly)
    assert msc.make_sample(2, 4, 32, "heldout") == msc.make_sample(2, 4, 32, "heldout")  # deterministic


def test_corpus_index_records_the_split(tmp_path):
    msc.make_corpus(tmp_path, 6, size=32, seed=1, split="heldout")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["split"] == "heldout" and index["holdout"]["fraction"] == 0.05
    for s in index["samples"]:
        truth = json.loads((tmp_path / s["image"]).with_suffix(".json").read_text())
        assert truth["split"] == "heldout" and msc.is_heldout(truth["caption_key"])
    with pytest.raises(ValueError, match="split"):
        msc.make_corpus(tmp_path / "x", 2, split="test")


# ---------------------------------------------------------------- intervals
def test_wilson_matches_hand_computed_values():
    # 2/16: p = .125, z^2/n = .2401; centre (.125 + .12005) / 1.2401 = .19761,
    # half 1.96 * sqrt(.125 * .875 / 16 + 3.8415 / 1024) / 1.2401 = .16263
    lo, hi = wilson(2, 16)
    assert lo == pytest.approx(0.03498, abs=5e-5) and hi == pytest.approx(0.36024, abs=5e-5)
    # 0/10: centre = half = (3.8415 / 20) / 1.38415 = .13876: [0, .27752]
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27752, abs=5e-5)
    # 90/128 (the rerank target 0.70)
    lo, hi = wilson(90, 128)
    assert lo == pytest.approx(0.6190, abs=5e-4) and hi == pytest.approx(0.7750, abs=5e-4)
    lo, hi = wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.27752, abs=5e-5)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_cluster_bootstrap_is_wider_than_wilson_for_clustered_candidates():
    # 32 captions x 16 candidates; half the captions always match, half never: the per-candidate
    # rate is 0.5 with only 32 independent units, not 512
    rows = [[True] * 16 if i % 2 else [False] * 16 for i in range(32)]
    lo, hi = cluster_bootstrap(rows, iters=2000, seed=0)
    wlo, whi = wilson(256, 512)
    assert lo < 0.5 < hi
    assert (hi - lo) > 2 * (whi - wlo)  # independence would understate the uncertainty
    assert cluster_bootstrap(rows, iters=2000, seed=0) == (lo, hi)  # seeded
    assert cluster_bootstrap([[True, True]] * 5) == (1.0, 1.0)
    # the interval is about the binomial one over clusters: 16/32 captions
    clo, chi = wilson(16, 32)
    assert math.isclose(hi - lo, chi - clo, rel_tol=0.25)


# ---------------------------------------------------------------- per-attribute counts
def _img(truth_seed: int, index: int, split: str = "all"):
    from io import BytesIO

    from PIL import Image

    png, caption, truth = msc.make_sample(truth_seed, index, 64, split)
    return Image.open(BytesIO(png)).convert("RGB"), caption


def test_attribute_counts_count_stated_attributes_and_split_position_from_relation():
    single = next(i for i in range(50) if len(msc.make_sample(0, i, 64)[2]["objects"]) == 1)
    im1, _ = _img(0, single)
    scene = ss.detect(im1)
    o = scene.objects[0]
    wrong_colour = next(c for c in ss.PALETTE if c != o.colour)
    size_word = o.size
    captions = [
        f"a {size_word} {o.colour} {o.kind}",  # right
        f"a {wrong_colour} {o.kind}",  # wrong colour, no size stated
        f"a {o.colour} {o.kind} on a {'black' if scene.background != 'black' else 'white'} background",  # wrong bg
    ]
    counts = ss.attribute_counts([scene] * 3, captions)
    assert counts["match"] == (1, 3) and counts["understood"] == (3, 3)
    assert counts["colour"] == (2, 3) and counts["kind"] == (3, 3) and counts["count"] == (3, 3)
    assert counts["size"] == (1, 1)  # only the first caption states a size
    assert counts["background"] == (0, 1)
    assert "position" not in counts and "relation" not in counts

    # a pair with a relation counts under "relation", a single object's cell under "position"
    pair = next(i for i in range(50) if len(msc.make_sample(0, i, 64)[2]["objects"]) == 2
                and msc.make_sample(0, i, 64)[2]["relation"])
    im2, _ = _img(0, pair)
    t = msc.make_sample(0, pair, 64)[2]
    a, b = t["objects"]
    rel = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[t["relation"]]
    flipped = {"left": "to the right of", "right": "to the left of", "above": "below", "below": "above"}[t["relation"]]
    im3 = im1
    s = msc.make_sample(0, single, 64)[2]["objects"][0]
    pos = ss.POSITION_WORDS[(s["column"], s["row"])][0]
    counts = ss.attribute_counts([im2, im2, im3], [f"a {a['colour']} {a['kind']} {rel} a {b['colour']} {b['kind']}",
                                                   f"a {a['colour']} {a['kind']} {flipped} a {b['colour']} {b['kind']}",
                                                   f"a {s['colour']} {s['kind']} {pos}"])
    assert counts["relation"] == (1, 2) and counts["position"] == (1, 1)
    assert counts["match"] == (2, 3)
    # attribute_rates keeps its old meaning: position = cells and relations together
    assert ss.attribute_rates([im2, im2, im3], [f"a {a['colour']} {a['kind']} {rel} a {b['colour']} {b['kind']}",
                                                f"a {a['colour']} {a['kind']} {flipped} a {b['colour']} {b['kind']}",
                                                f"a {s['colour']} {s['kind']} {pos}"])["position"] == pytest.approx(2 / 3)


def test_split_pool_takes_distinct_dev_then_test_captions_then_references():
    from dalle_ds.evaluate_captions import split_pool

    caps = ["a", "b", "a", "c", "d", "b", "e", "f", "g"]
    dev, test, refs = split_pool(caps, 1, 3)
    assert [caps[i] for i in dev] == ["a"] and [caps[i] for i in test] == ["b", "c", "d"]
    assert refs == [5, 6, 7, 8]


def test_overlap_counts_strings_and_meanings():
    from dalle_ds.evaluate_captions import overlap

    train = ["a small red circle", "a big blue square on the left"]
    ev = ["a small red circle", "a large blue square on the left side", "a green triangle"]
    assert overlap(ev, train) == {"captions": 3, "training_captions": 2, "distinct_training_captions": 2,
                                  "strings": 1, "meanings": 2}
