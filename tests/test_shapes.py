"""The embedded shapes corpus and its scorer: determinism, layout, and scoring the corpus's own images."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from bench.shapes_scorer import blur_noise, jpeg
from dalle_ds.evaluation import shapes_scorer as ss
from data_prep import make_shapes_corpus as msc

N_SCORED = 300  # corpus images scored per condition


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(images, captions, ground truths, detected scenes) of a 300-image 64x64 corpus."""
    out = tmp_path_factory.mktemp("shapes")
    msc.make_corpus(out, N_SCORED, size=64, seed=0)
    index = json.loads((out / "index.json").read_text())
    images, truths = [], []
    for s in index["samples"]:
        with Image.open(out / s["image"]) as im:
            images.append(im.convert("RGB"))
        truths.append(json.loads((out / s["image"]).with_suffix(".json").read_text()))
    return images, [s["caption"] for s in index["samples"]], truths, [ss.detect(im) for im in images]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_with_any_worker_count(tmp_path):
    msc.make_corpus(tmp_path / "a", 40, size=64, seed=7, workers=1)
    msc.make_corpus(tmp_path / "b", 40, size=64, seed=7, workers=2)
    msc.make_corpus(tmp_path / "c", 40, size=64, seed=8, workers=1)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 30  # another seed, other scenes


def test_layout_images_captions_sidecars_and_index(tmp_path):
    msc.make_corpus(tmp_path, 12, size=48, seed=1)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["count"] == 12 and index["image_size"] == 48 and len(index["samples"]) == 12
    for s in index["samples"]:
        png = tmp_path / s["image"]
        assert png.parent.name == "000000" and png.stem == s["key"]
        with Image.open(png) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
        assert png.with_suffix(".txt").read_text(encoding="utf-8").strip() == s["caption"]
        truth = json.loads(png.with_suffix(".json").read_text())
        assert truth["caption"] == s["caption"] and truth["background"] in ss.BACKGROUNDS
        assert 1 <= len(truth["objects"]) <= 2
        for o in truth["objects"]:
            assert o["colour"] in ss.PALETTE and o["kind"] in ss.KINDS and o["size"] in ss.SIZES
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48


def test_two_objects_never_overlap_and_differ_in_colour():
    for i in range(500):
        scene = msc.sample_scene(random.Random(i), 64, n_objects=2)
        a, b = scene["objects"]
        assert a["colour"] != b["colour"]
        apart_x = a["bbox"][2] < b["bbox"][0] or b["bbox"][2] < a["bbox"][0]
        apart_y = a["bbox"][3] < b["bbox"][1] or b["bbox"][3] < a["bbox"][1]
        assert apart_x or apart_y, scene


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="--count"):
        msc.make_corpus(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="--size"):
        msc.make_corpus(tmp_path / "x", 3, size=8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        msc.make_corpus(tmp_path / "full", 3)


def test_rewriting_a_corpus_removes_the_old_samples(tmp_path):
    msc.make_corpus(tmp_path, 30, seed=0)
    msc.make_corpus(tmp_path, 5, seed=0)
    assert len(list(tmp_path.rglob("*.png"))) == 5


def test_parser_reads_every_template_and_phrase():
    rng = random.Random(0)
    for n, templates in ((1, msc.SINGLE_TEMPLATES), (2, msc.PAIR_TEMPLATES)):
        for template in templates:
            for _ in range(40):  # several scenes and phrasings per template
                scene = msc.sample_scene(rng, 64, n_objects=n)
                caption = msc.caption_for(scene, template, rng)
                parsed = ss.parse_caption(caption)
                want = [(o["colour"], o["kind"]) for o in scene["objects"]]
                assert [(o.colour, o.kind) for o in parsed.objects] == want, caption
                sizes = [o.size for o in parsed.objects]
                assert sizes == ([o["size"] for o in scene["objects"]] if "{size" in template else [None] * n), caption
                assert parsed.relation == (scene["relation"] if "{rel}" in template else None), caption
                o = scene["objects"][0]
                assert parsed.position == ((o["column"], o["row"]) if "{pos}" in template else None), caption
                assert parsed.background == (scene["background"] if "{bg}" in template else None), caption
    for rel, phrases in ss.RELATION_WORDS.items():
        for p in phrases:
            assert ss.parse_caption(f"a red circle {p} a blue square").relation == rel
    for pos, phrases in ss.POSITION_WORDS.items():
        for p in phrases:
            assert ss.parse_caption(f"A Small ORANGE triangle {p}.").position == pos
    assert ss.parse_caption("a little red square on a light gray background").objects[0].size == "small"


def test_scores_own_corpus_near_100_percent(corpus):
    _, captions, _, scenes = corpus
    rate = ss.caption_match_rate(scenes, captions)
    assert rate >= 0.95, rate  # measured 1.000


def test_detections_agree_with_the_ground_truth_sidecars(corpus):
    _, _, truths, scenes = corpus
    agree = 0
    for scene, truth in zip(scenes, truths):
        want = sorted((o["colour"], o["kind"], o["size"], o["column"], o["row"]) for o in truth["objects"])
        got = sorted((d.colour, d.kind, d.size, d.column, d.row) for d in scene.objects)
        agree += got == want and scene.background == truth["background"]
    assert agree / len(scenes) >= 0.95, agree  # measured 300/300


def test_robust_to_mild_blur_noise_and_jpeg(corpus):
    images, captions, _, _ = corpus
    blurred = [blur_noise(im, 1.0, 8.0, i) for i, im in enumerate(images)]
    assert ss.caption_match_rate(blurred, captions) >= 0.95  # measured 1.000 (blur 1 px + noise sigma 8)
    jpegs = [jpeg(im, 75) for im in images]
    assert ss.caption_match_rate(jpegs, captions) >= 0.95  # measured 1.000 (quality 75, as shards store)


def test_mismatched_captions_score_low(corpus):
    _, captions, _, scenes = corpus
    rng = random.Random(0)
    order = list(range(len(captions)))
    while any(i == j for i, j in enumerate(order)):  # a derangement: no caption stays with its image
        rng.shuffle(order)
    shuffled = [captions[j] for j in order]
    assert ss.caption_match_rate(scenes, shuffled) <= 0.05  # measured 0.003-0.005 (chance agreements)

    def swap_colours(caption: str) -> str:
        named = [w for w in caption.split() if w in ss.PALETTE]
        new = dict(zip(named, rng.sample([c for c in ss.PALETTE if c not in named], len(named))))
        return " ".join(new.get(w, w) for w in caption.split())

    assert ss.caption_match_rate(scenes, [swap_colours(c) for c in captions]) <= 0.01  # measured 0.000


def test_mirrored_images_fail_left_right_captions(corpus):
    images, captions, _, _ = corpus
    parsed = [ss.parse_caption(c) for c in captions]
    sided = [i for i, p in enumerate(parsed)
             if p.relation in ("left", "right") or (p.position is not None and p.position[0] != "center")]
    assert len(sided) > 30
    mirrored = [ImageOps.mirror(images[i]) for i in sided]
    assert ss.caption_match_rate(mirrored, [captions[i] for i in sided]) == 0.0


def test_bad_captions_give_a_clear_non_match(corpus):
    image = corpus[0][0]
    for caption in ("a dog riding a skateboard", "", "a pink circle", "a red circle above a red square", None):
        result = ss.score(image, caption)
        assert result.match is False and result.checks == {} and result.parsed is None
        assert "caption" in result.error and repr(caption) in result.error
    with pytest.raises(ValueError, match="not understood"):
        ss.parse_caption("three red circles")


def test_wrong_count_is_a_mismatch(corpus):
    images, _, truths, _ = corpus
    i = next(i for i, t in enumerate(truths) if len(t["objects"]) == 2)
    o = truths[i]["objects"][0]
    result = ss.score(images[i], f"a {o['colour']} {o['kind']}")
    assert result.match is False and result.checks["count"] is False and result.checks["colour"] is True


def test_accepts_pil_uint8_and_float_chw_inputs(corpus):
    images, captions, _, _ = corpus
    im, caption = images[1], captions[1]
    hwc = np.asarray(im)
    chw = hwc.transpose(2, 0, 1).astype(np.float32) / 255.0
    results = [ss.score(x, caption) for x in (im, hwc, chw)]
    assert [r.match for r in results] == [True] * 3
    assert results[0].detected == results[1].detected
    with pytest.raises(ValueError, match=r"shape \(64, 64\)"):
        ss.score(hwc[..., 0], caption)
    with pytest.raises(ValueError, match="2 images, 1 captions"):
        ss.caption_match_rate(images[:2], captions[:1])
