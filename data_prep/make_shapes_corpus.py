"""Draws the embedded default corpus: captioned images of one or two flat shapes.

    python data_prep/make_shapes_corpus.py --output data/shapes --count 4000 --size 64 --seed 0

Each scene is a plain achromatic background (white, black, light grey) with one or two shapes
(circle, square, upward triangle; a palette colour; small or large; on a 3x3 grid of positions).
Two shapes never overlap, have different colours and sit in one row (left/right of each other)
or one column (above/below). The caption states the scene in one of several templates
("a small red circle above a large blue square", "a blue square", "a large green triangle on
the left of a white background"). The vocabulary and the scorer live in dalle_ds/evaluation/shapes_scorer.py.

Output (the folder-tree-with-.txt-captions layout the sharder reads):
    DIR/000000/000000123.png   the image (RGB)
    DIR/000000/000000123.txt   its caption (UTF-8, one line)
    DIR/000000/000000123.json  ground truth: background, objects (colour, kind, size, bbox, cell), relation
    DIR/index.json             the generator's settings, vocabulary and every sample's key, image and caption
Sample i depends only on (seed, i): the same seed gives byte-identical files with any --workers.

Held-out split (``--split train|heldout``): a caption's *meaning* (``shapes_scorer.caption_key``:
what it states, synonyms and template wording collapsed) is held out when its salted hash falls in
the lowest ``--holdout-fraction`` (``is_heldout``). A split corpus redraws each sample until its
caption's meaning is on its side, so no held-out caption, under any phrasing, occurs in a train
corpus of any seed. ``--split all`` (the default) is the unsplit corpus, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dalle_ds.cli_args import Parser, run
from dalle_ds.evaluation.shapes_scorer import (  # noqa: E402
    BACKGROUNDS, COLUMNS, KINDS, PALETTE, POSITION_JITTER, POSITION_WORDS, RELATION_WORDS, ROWS, SIZE_JITTER,
    SIZE_WORDS, SIZES, caption_key,
)

FORMAT = "shapes-corpus/1"
PER_FOLDER = 10_000  # images per numbered sub-folder
SUPERSAMPLE = 4  # drawn at 4x and box-downsampled: anti-aliased edges
MIN_GAP = 0.06  # empty space between two shapes, fraction of the image side
SPLITS = ("all", "train", "heldout")
HOLDOUT_FRACTION = 0.05  # share of caption meanings held out (hashed, see is_heldout)
HOLDOUT_SALT = "shapes-holdout/1"
MAX_ATTEMPTS = 10_000  # redraws per sample until its caption falls in the wanted split

SINGLE_TEMPLATES = (
    "a {size} {colour} {kind}",
    "a {colour} {kind}",
    "a {size} {colour} {kind} {pos}",
    "a {colour} {kind} {pos}",
    "a {size} {colour} {kind} {pos} of a {bg} background",
    "a {size} {colour} {kind} on a {bg} background",
    "a {bg} background with a {size} {colour} {kind} {pos}",
    "there is a {colour} {kind} {pos}",
)
PAIR_TEMPLATES = (
    "a {size1} {colour1} {kind1} {rel} a {size2} {colour2} {kind2}",
    "a {colour1} {kind1} {rel} a {colour2} {kind2}",
    "a {size1} {colour1} {kind1} {rel} a {size2} {colour2} {kind2} on a {bg} background",
    "the {colour1} {kind1} is {rel} the {colour2} {kind2}",
    "a {colour1} {kind1} and a {colour2} {kind2}",
    "a {bg} background with a {size1} {colour1} {kind1} {rel} a {size2} {colour2} {kind2}",
)


def _place(rng: random.Random, size: int, kind: str, colour: str, size_name: str, column: str, row: str) -> dict:
    side = (SIZES[size_name] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * size
    cx = (COLUMNS[column] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * size
    cy = (ROWS[row] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * size
    bbox = [round(v, 2) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)]
    return {"colour": colour, "kind": kind, "size": size_name, "bbox": bbox,
            "center": [round(cx, 2), round(cy, 2)], "column": column, "row": row}


def sample_scene(rng: random.Random, size: int, n_objects: int | None = None) -> dict:
    """A random scene (background, objects, relation of the first object to the second)."""
    n = n_objects or rng.choice((1, 2))
    background = rng.choice(sorted(BACKGROUNDS))
    colours = rng.sample(sorted(PALETTE), n)
    kinds = [rng.choice(KINDS) for _ in range(n)]
    sizes = [rng.choice(sorted(SIZES)) for _ in range(n)]
    if n == 1:
        column, row = rng.choice(sorted(POSITION_WORDS))
        return {"background": background, "relation": None,
                "objects": [_place(rng, size, kinds[0], colours[0], sizes[0], column, row)]}
    relation = rng.choice(sorted(RELATION_WORDS))
    horizontal = relation in ("left", "right")
    along, across = (tuple(COLUMNS), tuple(ROWS)) if horizontal else (tuple(ROWS), tuple(COLUMNS))
    for _ in range(1000):  # resample until the shapes are MIN_GAP apart (two large ones need cells 0 and 2)
        i, j = sorted(rng.sample(range(3), 2))
        first, second = (i, j) if relation in ("left", "above") else (j, i)
        k = rng.choice(across)
        cells = [(along[first], k), (along[second], k)] if horizontal else [(k, along[first]), (k, along[second])]
        objs = [_place(rng, size, kd, c, s, col, row) for kd, c, s, (col, row) in zip(kinds, colours, sizes, cells)]
        lo, hi = sorted(objs, key=lambda o: o["center"][0 if horizontal else 1])
        axis = 0 if horizontal else 1
        if hi["bbox"][axis] - lo["bbox"][axis + 2] >= MIN_GAP * size:
            return {"background": background, "relation": relation, "objects": objs}
    raise RuntimeError("could not place two shapes apart")  # unreachable with the sizes in SIZES


def caption_for(scene: dict, template: str, rng: random.Random) -> str:
    """Fill a template with the scene's attributes (one of each attribute's phrasings)."""
    fields = {"bg": scene["background"]}
    for i, o in enumerate(scene["objects"], start=1):
        words = {"size": rng.choice(SIZE_WORDS[o["size"]]), "colour": o["colour"], "kind": o["kind"]}
        fields.update({f"{k}{i}": v for k, v in words.items()})
        if len(scene["objects"]) == 1:
            fields.update(words, pos=rng.choice(POSITION_WORDS[(o["column"], o["row"])]))
    if scene["relation"]:
        fields["rel"] = rng.choice(RELATION_WORDS[scene["relation"]])
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(**fields))


def draw(scene: dict, size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene["background"]])
    pen = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x0, y0, x1, y1 = (round(v * SUPERSAMPLE) for v in o["bbox"])
        fill = PALETTE[o["colour"]]
        if o["kind"] == "circle":
            pen.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o["kind"] == "square":
            pen.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            pen.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return img.reduce(SUPERSAMPLE)


def is_heldout(key: str, fraction: float = HOLDOUT_FRACTION, salt: str = HOLDOUT_SALT) -> bool:
    """Whether the caption meaning ``key`` (``shapes_scorer.caption_key``) belongs to the held-out split:
    its salted blake2b hash falls in the lowest ``fraction`` of the 64-bit range. A property of the
    meaning alone, so every corpus (any seed, count or size) agrees on it."""
    h = int.from_bytes(hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest(), "big")
    return h < fraction * 2.0 ** 64


def _draw_scene(seed: int, index: int, size: int, split: str, fraction: float, salt: str
                ) -> tuple[dict, str, int, str]:
    """(scene, caption, template index, caption key): attempt 0 is the ``--split all`` sample; a split
    redraws with attempts 1, 2, ... until the caption's meaning falls on its side."""
    for attempt in range(MAX_ATTEMPTS):
        rng = random.Random(f"shapes-corpus/{seed}/{index}" + (f"/{attempt}" if attempt else ""))
        scene = sample_scene(rng, size)
        templates = SINGLE_TEMPLATES if len(scene["objects"]) == 1 else PAIR_TEMPLATES
        template = rng.randrange(len(templates))
        caption = caption_for(scene, templates[template], rng)
        if split == "all":
            return scene, caption, template, ""
        key = caption_key(caption)
        if is_heldout(key, fraction, salt) == (split == "heldout"):
            return scene, caption, template, key
    raise RuntimeError(f"sample {index}: no {split} caption in {MAX_ATTEMPTS} attempts (holdout fraction {fraction})")


def make_sample(seed: int, index: int, size: int, split: str = "all", holdout_fraction: float = HOLDOUT_FRACTION,
                holdout_salt: str = HOLDOUT_SALT) -> tuple[bytes, str, dict]:
    """PNG bytes, caption and ground truth of sample ``index`` (a pure function of its arguments).

    ``split="all"``: any scene (today's corpus, byte for byte). ``"train"`` / ``"heldout"``: only scenes
    whose caption meaning is (not) held out by :func:`is_heldout`; the truth json records ``split`` and
    ``caption_key``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: one of {list(SPLITS)}")
    scene, caption, template, key = _draw_scene(seed, index, size, split, holdout_fraction, holdout_salt)
    buf = io.BytesIO()
    draw(scene, size).save(buf, format="PNG")
    truth = {"key": f"{index:09d}", "caption": caption, "image_size": size, "seed": seed,
             "template": f"{'single' if len(scene['objects']) == 1 else 'pair'}/{template}", **scene}
    if split != "all":
        truth.update(split=split, caption_key=key)
    return buf.getvalue(), caption, truth


def sample_path(index: int) -> str:
    return f"{index // PER_FOLDER:06d}/{index:09d}"


def _write(job: tuple) -> dict:
    output, seed, size, index, *split = job
    png, caption, truth = make_sample(seed, index, size, *split)
    stem = Path(output) / sample_path(index)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".png").write_bytes(png)
    stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps(truth, sort_keys=True) + "\n", encoding="utf-8")
    return {"key": truth["key"], "image": sample_path(index) + ".png", "caption": caption}


def _clear_previous(output: Path) -> None:
    """Remove the samples of an earlier corpus in ``output``; refuse a folder that is not one."""
    index = output / "index.json"
    if index.exists():
        for s in json.loads(index.read_text())["samples"]:
            for ext in (".png", ".txt", ".json"):
                (output / s["image"]).with_suffix(ext).unlink(missing_ok=True)
        index.unlink()
    elif output.exists() and any(output.iterdir()):
        raise SystemExit(f"--output {output} is not empty and holds no shapes corpus index.json; refusing to write")


def make_corpus(output: Path | str, count: int, size: int = 64, seed: int = 0, workers: int = 1, split: str = "all",
                holdout_fraction: float = HOLDOUT_FRACTION, holdout_salt: str = HOLDOUT_SALT) -> Path:
    """Write ``count`` samples and ``index.json`` into ``output``; returns the index path.
    ``split`` train / heldout: only scenes whose caption meaning is (not) held out (:func:`is_heldout`)."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: one of {list(SPLITS)}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction must be in (0, 1), got {holdout_fraction}")
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    if size < 16:
        raise ValueError(f"--size must be >= 16 pixels, got {size}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    output = Path(output)
    _clear_previous(output)
    output.mkdir(parents=True, exist_ok=True)
    extra = () if split == "all" else (split, holdout_fraction, holdout_salt)
    jobs = [(str(output), seed, size, i, *extra) for i in range(count)]
    bar = dict(total=count, desc=f"shapes corpus -> {output}", unit="img", mininterval=0.5)
    if workers == 1:
        samples = [_write(j) for j in tqdm(jobs, **bar)]
    else:
        with Pool(workers) as pool:
            samples = list(tqdm(pool.imap(_write, jobs, chunksize=64), **bar))
    index = {
        "format": FORMAT, "count": count, "image_size": size, "seed": seed,
        "palette": PALETTE, "backgrounds": BACKGROUNDS, "kinds": list(KINDS), "sizes": SIZES,
        "templates": {"single": list(SINGLE_TEMPLATES), "pair": list(PAIR_TEMPLATES)},
        "samples": samples,
    }
    if split != "all":
        index["split"] = split
        index["holdout"] = {"fraction": holdout_fraction, "salt": holdout_salt, "key": "shapes_scorer.caption_key"}
    tmp = output / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, output / "index.json")  # written last: a corpus without it is incomplete
    return output / "index.json"


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True, help="folder to write (created)")
    ap.add_argument("--count", type=int, default=4000, help="number of images")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes drawing in parallel")
    ap.add_argument("--split", choices=SPLITS, default="all",
                    help="all: any scene; train / heldout: only scenes whose caption meaning is not / is held out")
    ap.add_argument("--holdout-fraction", type=float, default=HOLDOUT_FRACTION, help="share of meanings held out")
    ap.add_argument("--holdout-salt", default=HOLDOUT_SALT, help="salt of the meaning hash (another salt, another split)")
    args = ap.parse_args(argv)
    try:
        index = make_corpus(args.output, args.count, args.size, args.seed, args.workers, args.split,
                            args.holdout_fraction, args.holdout_salt)
    except ValueError as e:
        ap.error(str(e))
    split = "" if args.split == "all" else f" ({args.split} split: caption meanings hashed, {args.holdout_fraction:g} held out)"
    print(f"wrote {args.count} images of {args.size}x{args.size} and {index}{split}")


if __name__ == "__main__":
    raise SystemExit(run(main))
