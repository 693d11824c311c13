"""Scores whether an image of the shapes corpus matches its caption.

The shapes corpus (``data_prep/make_shapes_corpus.py``) draws one or two flat shapes on a plain,
achromatic background. This module owns that little world's vocabulary (palette, kinds, sizes,
positions, the caption phrases) and checks an image against a caption:

1. detect: every pixel gets the palette colour of nearest *hue* if its chroma (max - min of RGB)
   is at least half that colour's chroma. Blending a colour with a grey background (anti-aliasing,
   blur, a dVAE's soft edges) keeps its hue and scales its chroma, so the 50% chroma contour sits on
   the object's true edge. Same-colour 4-connected components, minus tiny or thin blobs, are the
   objects; size from the box side, position (3x3 grid cell) from the box centre. Kind: each
   object's crop is re-read as blend fraction between the background and the object's own colour
   (``_alpha``), upsampled 4x and cut at 0.5; two sub-pixel measures of that outline decide it
   (how bottom-heavy: triangle; how far the corners reach: square vs circle, see ``_kind``).
2. parse: a grammar for the corpus's caption templates (``parse_caption``).
3. compare: caption objects are paired with detections, then every attribute the caption states
   (count, colour, kind, size, position or relation, background) is checked; ``match`` means all.

    score(Image.open("000000123.png"), "a small red circle above a large blue square").match
    python -m dalle_ds.evaluation.shapes_scorer FOLDER   # match and per-attribute rates of images + same-named .txt
"""

from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

# ---------------------------------------------------------------- the corpus's vocabulary
# Saturated colours with well separated hues (0, 31, 57, 128, 224, 280 degrees).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (240, 230, 30),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "purple": (150, 50, 200),
}
# Achromatic backgrounds: never confusable with a palette colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "light grey": (192, 192, 192),
}
KINDS = ("circle", "square", "triangle")
# Side of the shape's bounding box as a fraction of the image side (before +-SIZE_JITTER).
SIZES: dict[str, float] = {"small": 0.20, "large": 0.36}
SIZE_JITTER = 0.02
LARGE_MIN_SIDE = 0.28  # a detected box side >= this (fraction of image) is "large"
# Grid cells: centre fractions along each axis (before +-POSITION_JITTER).
COLUMNS: dict[str, float] = {"left": 0.25, "center": 0.5, "right": 0.75}
ROWS: dict[str, float] = {"top": 0.25, "middle": 0.5, "bottom": 0.75}
POSITION_JITTER = 0.03

# Caption phrases (the generator picks one, the parser accepts all).
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# relation of the first object to the second
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# (column, row) of a single object
POSITION_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("left", "middle"): ("on the left", "on the left side"),
    ("right", "middle"): ("on the right", "on the right side"),
    ("center", "top"): ("at the top",),
    ("center", "bottom"): ("at the bottom",),
    ("center", "middle"): ("in the center", "in the middle"),
    ("left", "top"): ("in the top left corner", "at the top left"),
    ("right", "top"): ("in the top right corner", "at the top right"),
    ("left", "bottom"): ("in the bottom left corner", "at the bottom left"),
    ("right", "bottom"): ("in the bottom right corner", "at the bottom right"),
}

# ---------------------------------------------------------------- detector thresholds
CHROMA_FRACTION = 0.5  # a pixel is "object" at >= this fraction of its palette colour's chroma
MIN_CHROMA = 40.0  # ... and never below this (0-255 scale): keeps noisy greys out
MAX_HUE_DISTANCE = 35.0  # degrees from the nearest palette hue
MIN_AREA_FRACTION = 0.008  # blobs smaller than this fraction of the image are dropped
MIN_SIDE_FRACTION = 0.06  # ... and so are blobs thinner than this fraction of the side
UPSAMPLE = 4  # kind features are measured on a 4x bilinear upsampling of the object's crop
TRIANGLE_MAX_TOP = 0.43  # less of the area than this in the box's upper half: a triangle
SQUARE_MIN_CORNER = 1.10  # otherwise a diagonal/axis extent ratio at least this: a square, else a circle
MAX_BACKGROUND_DISTANCE = 60.0  # border median farther than this from every background: "unknown"


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma (max - min) of float RGB in 0..255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = mx - mn
    c = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / c) % 6.0, np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return hue * 60.0, chroma


_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_HUE, _PALETTE_CHROMA = _hue_chroma(np.array(list(PALETTE.values()), dtype=np.float32))


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class CaptionObject:
    colour: str
    kind: str
    size: str | None = None  # None: the caption does not say


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[CaptionObject, ...]
    relation: str | None = None  # first object relative to the second: left/right/above/below
    position: tuple[str, str] | None = None  # (column, row) of a single object
    background: str | None = None


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    kind: str
    size: str
    center: tuple[float, float]  # (x, y) of the bounding box centre, pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive, pixels
    area: int  # pixels
    column: str  # grid cell of the box centre: left / center / right
    row: str  # ... top / middle / bottom
    corner: float  # diagonal / axis extent (sub-pixel): square ~1.41, circle ~1.0, triangle ~1.06
    top: float  # share of the area in the box's upper half: upward triangle ~0.25, others ~0.5


@dataclass(frozen=True)
class Scene:
    """What ``detect`` sees in one image."""

    objects: tuple[DetectedObject, ...]  # largest first
    background: str  # a BACKGROUNDS name, or "unknown"


@dataclass
class ShapesScore:
    match: bool  # every checked attribute right (False when the caption is not understood)
    checks: dict[str, bool] = field(default_factory=dict)  # only the attributes the caption states
    parsed: ParsedCaption | None = None
    detected: list[DetectedObject] = field(default_factory=list)
    background: str | None = None  # detected background name, or "unknown"
    error: str | None = None  # why the caption could not be scored


def _cell(frac: float, names: tuple[str, str, str]) -> str:
    return names[0] if frac < 0.375 else names[2] if frac > 0.625 else names[1]


# ---------------------------------------------------------------- caption grammar
def _alt(words: Iterable[str]) -> str:
    return "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in sorted(words, key=len, reverse=True))


def _obj(i: int) -> str:
    sizes = _alt(w for ws in SIZE_WORDS.values() for w in ws)
    return (rf"(?:(?:a|an|the)\s+)?(?:(?P<size{i}>{sizes})\s+)?"
            rf"(?P<colour{i}>{_alt(PALETTE)})\s+(?P<kind{i}>{_alt(KINDS)})")


def _bg(name: str) -> str:
    return rf"(?:(?:a|an|the)\s+)?(?P<{name}>{_alt(BACKGROUNDS)})\s+background"


_RELATIONS = {w: rel for rel, ws in RELATION_WORDS.items() for w in ws}
_POSITIONS = {w: pos for pos, ws in POSITION_WORDS.items() for w in ws}
_SIZES = {w: size for size, ws in SIZE_WORDS.items() for w in ws}
_CAPTION_RE = re.compile(
    rf"^(?:there\s+(?:is|are)\s+)?(?:{_bg('bg1')}\s+with\s+)?{_obj(1)}"
    rf"(?:\s+(?:(?:is\s+)?(?P<rel>{_alt(_RELATIONS)})|(?P<conj>and|next\s+to))\s+{_obj(2)}"
    rf"|\s+(?P<pos>{_alt(_POSITIONS)}))?"
    rf"(?:\s+(?:on|against|of|in)\s+{_bg('bg2')})?$"
)


def normalize_caption(caption: str) -> str:
    text = caption.lower().replace("gray", "grey").replace("centre", "center")
    text = re.sub(r"[^a-z ]+", " ", text)
    return " ".join(text.split())


def parse_caption(caption: str) -> ParsedCaption:
    """The attributes a corpus caption states; ValueError (quoting the caption) if it is not one."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
    m = _CAPTION_RE.match(normalize_caption(caption))
    if m is None:
        raise ValueError(f"caption not understood by the shapes grammar: {caption!r}")
    g = m.groupdict()
    objects = [CaptionObject(g["colour1"], g["kind1"], _SIZES.get(g["size1"] or ""))]
    if g["colour2"]:
        objects.append(CaptionObject(g["colour2"], g["kind2"], _SIZES.get(g["size2"] or "")))
        if objects[0].colour == objects[1].colour:
            raise ValueError(f"caption names two {objects[0].colour} objects (the corpus never does): {caption!r}")
    if g["bg1"] and g["bg2"] and g["bg1"] != g["bg2"]:
        raise ValueError(f"caption names two backgrounds: {caption!r}")
    relation = _RELATIONS[" ".join(g["rel"].split())] if g["rel"] else None
    position = _POSITIONS[" ".join(g["pos"].split())] if g["pos"] else None
    return ParsedCaption(tuple(objects), relation, position, g["bg1"] or g["bg2"])


def caption_kind(parsed: ParsedCaption) -> str:
    """``single`` (one object), ``pair_relation`` (two, with a relation) or ``pair_and`` ("a X and a Y")."""
    if len(parsed.objects) == 1:
        return "single"
    return "pair_relation" if parsed.relation else "pair_and"


def caption_key(caption: "str | ParsedCaption") -> str:
    """The canonical *meaning* of a caption: what it states, not how it is phrased.

    Synonyms collapse ("little"/"small", "over"/"above", "on the left side"/"on the left") and so do
    the templates' articles and word order ("a white background with a red circle" = "a red circle on
    a white background"), e.g. ``2|red circle small|blue square -|rel=above|pos=-|bg=white``. The corpus
    holds scenes out by this key (data_prep/make_shapes_corpus.py), so a held-out caption's meaning
    never occurs in the training corpus under any phrasing. ValueError for a caption the grammar does not read.
    """
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    objs = "|".join(f"{o.colour} {o.kind} {o.size or '-'}" for o in parsed.objects)
    pos = ",".join(parsed.position) if parsed.position else "-"
    return (f"{len(parsed.objects)}|{objs}|rel={parsed.relation or '-'}|pos={pos}"
            f"|bg={parsed.background or '-'}")


# ---------------------------------------------------------------- detector
def as_rgb_array(image) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 from a PIL image, an HWC/CHW array or tensor (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # a torch tensor, without importing torch
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 8:
        raise ValueError(f"image must be (H, W, 3) or (3, H, W) with H, W >= 8, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"image array must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels: (H, W) ids, -1 outside."""
    h, w = labels.shape
    fg = labels >= 0
    big = h * w
    comp = np.where(fg, np.arange(big).reshape(h, w), big)
    while True:
        prev = comp
        best = comp.copy()
        for axis, step in ((0, 1), (0, -1), (1, 1), (1, -1)):
            nb = np.roll(comp, step, axis=axis)
            same = np.roll(labels, step, axis=axis) == labels
            if axis == 0:  # np.roll wraps around: the wrapped row/column is not a neighbour
                same[0 if step == 1 else -1, :] = False
            else:
                same[:, 0 if step == 1 else -1] = False
            best = np.where(fg & same, np.minimum(best, nb), best)
        flat = np.append(best.ravel(), big)
        while True:  # pointer jumping: follow the id to the smallest id it already reaches
            jumped = np.where(fg.ravel(), flat[flat[:-1]], big)
            if np.array_equal(jumped, flat[:-1]):
                break
            flat[:-1] = jumped
        comp = flat[:-1].reshape(h, w)
        if np.array_equal(comp, prev):
            return np.where(fg, comp, -1)


def _kind(strength: np.ndarray) -> tuple[str, float, float]:
    """Kind, corner ratio and top-half share of one object from its soft mask (a crop, 1 = full colour).

    The crop is upsampled 4x (bilinear) and cut at 0.5, which puts the edge at sub-pixel accuracy.
    top = share of the area in the box's upper half: ~0.5 for symmetric kinds, ~0.27 for an upward
    triangle (blur clips the apex, but a trapezoid is still bottom-heavy). corner = mean extent
    along the two diagonals / mean extent along the axes: sqrt(2) for a square, 1 for a circle
    (blur rounds a square's corners, which lowers it towards 1.2 on a small blurred square).
    """
    h, w = strength.shape
    up = np.asarray(Image.fromarray(strength.astype(np.float32)).resize((w * UPSAMPLE, h * UPSAMPLE),
                                                                         Image.BILINEAR))
    ys, xs = np.nonzero(up >= 0.5)
    if len(ys) == 0:
        return "circle", 1.0, 0.5
    axes = (np.ptp(xs) + np.ptp(ys) + 2) / 2  # pixels are 1 wide along an axis ...
    diagonals = (np.ptp(xs + ys) + np.ptp(xs - ys) + 4) / 2 / np.sqrt(2)  # ... and sqrt(2) along a diagonal
    corner = float(diagonals / axes)
    top = float((ys < (ys.min() + ys.max() + 1) / 2).mean())
    if top < TRIANGLE_MAX_TOP:
        return "triangle", corner, top
    return ("square" if corner >= SQUARE_MIN_CORNER else "circle"), corner, top


def _background(rgb: np.ndarray) -> tuple[str, np.ndarray]:
    """Name ("unknown" if none is near) and measured colour: the median of the border pixels."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    median = np.median(border, axis=0)
    dist = {name: float(np.linalg.norm(median - np.array(c))) for name, c in BACKGROUNDS.items()}
    name = min(dist, key=dist.get)
    return (name if dist[name] <= MAX_BACKGROUND_DISTANCE else "unknown"), median


def _alpha(crop: np.ndarray, background: np.ndarray, obj: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """How far each pixel of ``crop`` (h, w, 3) is from the background towards the object's colour.

    Projects on the background->object colour line, so a blend with the background (anti-aliasing,
    blur, a dVAE's soft edge) reads as its blend fraction, using luminance as well as chroma
    (JPEG keeps luminance at full resolution). The object's colour is its own (90th percentile
    along the line), so a washed-out rendering still reads 1 inside. ``obj`` marks the object's
    pixels; pixels outside ``keep`` (another object's) read 0.
    """
    direction = np.median(crop[obj], axis=0) - background
    t = (crop - background) @ direction / max(float(direction @ direction), 1e-6)  # (h, w)
    full = max(float(np.percentile(t[obj], 90)), 1e-6)
    return np.where(keep, t / full, 0.0)


def detect(image) -> Scene:
    """The objects (largest first) and the background of one image."""
    rgb = as_rgb_array(image)
    h, w, _ = rgb.shape
    hue, chroma = _hue_chroma(rgb)
    dist = np.abs(hue[..., None] - _PALETTE_HUE)  # (H, W, P)
    dist = np.minimum(dist, 360.0 - dist)
    nearest = dist.argmin(axis=-1)  # (H, W)
    strength = np.where(dist.min(axis=-1) <= MAX_HUE_DISTANCE, chroma / _PALETTE_CHROMA[nearest], 0.0)  # (H, W)
    is_obj = (strength >= CHROMA_FRACTION) & (chroma >= MIN_CHROMA)
    labels = np.where(is_obj, nearest, -1)
    comp = _components(labels)
    background, bg_rgb = _background(rgb)
    ids, counts = np.unique(comp[comp >= 0], return_counts=True)
    objects = []
    for cid, area in zip(ids, counts):
        if area < MIN_AREA_FRACTION * h * w:
            continue
        ys, xs = np.nonzero(comp == cid)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        if min(x1 - x0 + 1, y1 - y0 + 1) < MIN_SIDE_FRACTION * min(h, w):
            continue
        colour = int(labels[ys[0], xs[0]])
        cy0, cy1, cx0, cx1 = max(y0 - 2, 0), min(y1 + 3, h), max(x0 - 2, 0), min(x1 + 3, w)
        crop_comp = comp[cy0:cy1, cx0:cx1]
        obj = crop_comp == cid
        alpha = _alpha(rgb[cy0:cy1, cx0:cx1], bg_rgb, obj, obj | ~is_obj[cy0:cy1, cx0:cx1])
        kind, corner, top = _kind(alpha)
        side = max((x1 - x0 + 1) / w, (y1 - y0 + 1) / h)
        cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
        objects.append(DetectedObject(
            colour=_PALETTE_NAMES[colour], kind=kind, size="large" if side >= LARGE_MIN_SIDE else "small",
            center=(cx, cy), bbox=(x0, y0, x1, y1), area=int(area),
            column=_cell(cx / w, ("left", "center", "right")), row=_cell(cy / h, ("top", "middle", "bottom")),
            corner=corner, top=top,
        ))
    return Scene(tuple(sorted(objects, key=lambda o: -o.area)), background)


# ---------------------------------------------------------------- comparison
def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    horizontal = abs(dx) > abs(dy)
    return {"left": horizontal and dx < 0, "right": horizontal and dx > 0,
            "above": not horizontal and dy < 0, "below": not horizontal and dy > 0}[relation]


def _pair(wanted: Sequence[CaptionObject], found: Sequence[DetectedObject]) -> list[DetectedObject | None]:
    """The detections (one each, or None) that agree best with the caption's objects, in caption order."""
    def agreement(pairs):
        return sum(3 * (c.colour == d.colour) + 2 * (c.kind == d.kind) + (c.size in (None, d.size))
                   for c, d in pairs if d is not None)

    padded = list(found) + [None] * len(wanted)
    best = max(itertools.permutations(padded, len(wanted)), key=lambda p: agreement(zip(wanted, p)))
    return list(best)


def score(image, caption: str) -> ShapesScore:
    """Does ``image`` show what ``caption`` says? Never raises for a bad caption (see ``error``)."""
    return compare(detect(image), caption)


def compare(scene: Scene, caption: str) -> ShapesScore:
    """``score`` for an already detected scene (detect once, compare with many captions)."""
    detected, background = list(scene.objects), scene.background
    try:
        parsed = parse_caption(caption)
    except ValueError as e:
        return ShapesScore(False, {}, None, detected, background, error=str(e))
    paired = _pair(parsed.objects, detected)
    checks = {"count": len(detected) == len(parsed.objects)}
    checks["colour"] = all(d is not None and d.colour == c.colour for c, d in zip(parsed.objects, paired))
    checks["kind"] = all(d is not None and d.kind == c.kind for c, d in zip(parsed.objects, paired))
    if any(c.size for c in parsed.objects):
        checks["size"] = all(d is not None and c.size in (None, d.size) for c, d in zip(parsed.objects, paired))
    if parsed.relation:
        checks["position"] = None not in paired and _relation_holds(paired[0], paired[1], parsed.relation)
    elif parsed.position:
        checks["position"] = paired[0] is not None and (paired[0].column, paired[0].row) == parsed.position
    if parsed.background:
        checks["background"] = background == parsed.background
    return ShapesScore(all(checks.values()), checks, parsed, detected, background)


def caption_match_rate(images: Sequence, captions: Sequence[str]) -> float:
    """Fraction of (image, caption) pairs whose ``score(...).match`` is True (an image may be a detected ``Scene``)."""
    return attribute_rates(images, captions)["match"]


ATTRIBUTES = ("count", "colour", "kind", "size", "position", "relation", "background")


def attribute_counts(images: Sequence, captions: Sequence[str] | None = None,
                     scores: Sequence[ShapesScore] | None = None) -> dict[str, tuple[int, int]]:
    """Per attribute ``(k, n)``: n images whose caption states it, k of them right; plus ``match`` and
    ``understood`` over all images. ``position`` counts single objects' grid cells, ``relation`` the
    pairs' relations (both are the scorer's ``checks["position"]``). Pass ``scores`` (already compared)
    instead of images and captions to count without scoring again."""
    if scores is None:
        if captions is None or len(images) != len(captions) or not len(captions):
            raise ValueError(f"need as many images as captions (>= 1), got {len(images)} images, "
                             f"{0 if captions is None else len(captions)} captions")
        scores = [compare(im if isinstance(im, Scene) else detect(im), cap) for im, cap in zip(images, captions)]
    out = {"match": (sum(s.match for s in scores), len(scores)),
           "understood": (sum(s.error is None for s in scores), len(scores))}
    checks = [attribute_checks(s) for s in scores]
    for attr in ATTRIBUTES:
        stated = [c[attr] for c in checks if attr in c]
        if stated:
            out[attr] = (sum(stated), len(stated))
    return out


def attribute_checks(s: ShapesScore) -> dict[str, bool]:
    """One score's checks by ATTRIBUTES name: the scorer's ``position`` check is ``relation`` for a pair."""
    out = dict(s.checks)
    if "position" in out and s.parsed is not None and s.parsed.relation:
        out["relation"] = out.pop("position")
    return out


def attribute_rates(images: Sequence, captions: Sequence[str]) -> dict[str, float]:
    """``match`` rate, ``understood`` caption rate, and per attribute the rate among captions stating it
    (``position``: single objects' cells and pairs' relations together, as the scorer's ``checks``)."""
    if len(images) != len(captions) or not len(captions):
        raise ValueError(f"need as many images as captions (>= 1), got {len(images)} images, {len(captions)} captions")
    scores = [compare(im if isinstance(im, Scene) else detect(im), cap) for im, cap in zip(images, captions)]
    counts = attribute_counts([], scores=scores)
    rates = {k: counts[k][0] / counts[k][1] for k in ("match", "understood")}
    for attr in ("count", "colour", "kind", "size", "position", "background"):
        stated = [s.checks[attr] for s in scores if attr in s.checks]
        if stated:
            rates[attr] = sum(stated) / len(stated)
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Score a folder of images with same-named .txt captions.")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N images (sorted)")
    args = ap.parse_args(argv)
    from dalle_ds.data.shards import captioned_images

    try:
        pairs = captioned_images(args.folder, args.limit)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    scenes = []
    for p, _ in tqdm(pairs, desc=f"scoring {args.folder}", unit="img", mininterval=0.5):
        with Image.open(p) as im:
            scenes.append(detect(im))
    rates = attribute_rates(scenes, [caption for _, caption in pairs])
    print(f"{len(pairs)} images: " + " ".join(f"{k}={v:.4f}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
