"""One input sample -> one kept shard sample or one drop reason (pure function; runs in workers).

Checks run in a fixed order and the first failure is the reason, so every input gets exactly
one outcome: caption (missing / not UTF-8 / too short), then the image bytes (unreadable /
empty / too large), then the image (not an image / decompression bomb / too small / aspect
ratio / undecodable / unsupported mode). Valid CMYK, palette, 16-bit, greyscale and alpha
images are converted to RGB (alpha composited on white). Duplicates are found later, in
order, by the caller from the returned pixel hash.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dalle_ds.data import storage

# Every drop reason the job can report, in check order; the manifest lists all of them.
DROP_REASONS = (
    "bad_row",  # a table row or tar member group that cannot be read as a sample
    "missing_image",  # a caption (or tar member group) without an image
    "missing_caption",
    "caption_not_utf8",
    "caption_too_short",
    "caption_too_long",  # longer than max_caption_bytes with long_caption="drop"
    "caption_boilerplate",  # matches one of SampleConfig.boilerplate (e.g. "IMG 1234", "stock photo")
    "caption_language",  # detected language not in SampleConfig.languages, or below min_language_confidence
    "read_error",  # the image file / S3 object / tar cannot be read
    "empty_file",
    "file_too_large",
    "not_an_image",
    "decompression_bomb",
    "too_small",
    "aspect_ratio",
    "undecodable",  # truncated or corrupt image data
    "unsupported_mode",
    "duplicate",  # same pixels as an earlier kept sample
    "near_duplicate",  # pHash within --phash-distance of an earlier kept sample's
    "caption_repeated",  # --max-caption-repeats earlier kept samples already have this caption
)


# Captions that say nothing about the image (camera file names, stock-site boilerplate); searched
# case-insensitively in the normalised caption. --boilerplate-pattern adds, --no-default-boilerplate clears.
DEFAULT_BOILERPLATE = (
    r"^(an? |the )?(image|photo|picture|img|dsc|dcim|untitled|screenshot|thumbnail)s?"
    r"([\s_-]*(\d+|image|photo|picture))*(\.(jpe?g|png|gif|webp))?$",
    r"\b(royalty[- ]free|all rights reserved|stock (photo|image|illustration|vector)s?)\b",
    r"^(click|tap) (here|to)\b",
)


@dataclass(frozen=True)
class SampleConfig:
    """The knobs that decide a sample's fate and bytes (all of them go into the manifest)."""

    image_size: int = 384  # shorter side of the stored JPEG
    min_size: int = 64  # shorter side of the original below this -> too_small
    max_aspect: float = 2.0  # long/short side above this -> aspect_ratio (paper: [1/2, 2])
    min_caption_words: int = 2
    max_pixels: int = 1 << 26  # width*height above this -> decompression_bomb
    max_file_bytes: int = 64 << 20
    jpeg_quality: int = 95
    max_caption_bytes: int = 2048  # UTF-8 bytes after whitespace normalisation (the prior reads 256 tokens)
    long_caption: str = "truncate"  # or "drop": what happens to a longer caption (either way counted)
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE  # regexes; a caption matching one is dropped
    languages: tuple[str, ...] = ()  # ISO 639-1 codes a caption may be in (py3langid); () = any
    min_language_confidence: float = 0.0  # the detector's probability for an allowed language below this -> drop
    phash: bool = False  # compute the 64-bit pHash (for --phash-distance) into the sample's .json

    def __post_init__(self):
        if self.languages:
            from data_prep._shard_filters import language_codes

            unknown = sorted(set(self.languages) - set(language_codes()))
            if unknown:
                raise ValueError(f"--languages: unknown code(s) {unknown}; the detector knows {language_codes()}")
        if not 0.0 <= self.min_language_confidence <= 1.0:
            raise ValueError(f"--min-language-confidence={self.min_language_confidence}: must be in [0, 1]")


@dataclass
class Item:
    """An input sample. image/caption are a URL, in-memory bytes, a str (captions) or None."""

    index: int
    source: str
    image: str | bytes | None
    caption: str | bytes | None
    caption_is_url: bool = False
    reason: str | None = None  # set when enumeration already knows the sample is bad
    detail: str = ""


@dataclass
class Outcome:
    index: int
    source: str
    reason: str | None  # None = kept
    detail: str = ""
    jpg: bytes = b""
    txt: bytes = b""
    meta: dict | None = None
    pixel_hash: str = ""
    truncated: bool = False  # the caption was cut to max_caption_bytes
    phash: int | None = None  # 64-bit perceptual hash when SampleConfig.phash


class Drop(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def process(item: Item, cfg: SampleConfig) -> Outcome:
    try:
        if item.reason:
            raise Drop(item.reason, item.detail)
        caption, truncated = _long_caption(_caption(item, cfg), cfg)
        data = _image_bytes(item, cfg)
        rgb, width, height, mode = _decode(data, cfg)
        pixel_hash = _pixel_hash(rgb)
        jpg = _encode(_resize_shorter(rgb, cfg.image_size), cfg.jpeg_quality)
    except Drop as d:
        return Outcome(item.index, item.source, d.reason, d.detail)
    meta = {"source": item.source, "width": width, "height": height, "mode": mode, "pixel_hash": pixel_hash}
    phash = None
    if cfg.phash:  # of the original pixels, so a finalize over parts sees what a single run saw
        from data_prep._shard_filters import perceptual_hash

        phash = perceptual_hash(rgb)
        meta["phash"] = f"{phash:016x}"
    return Outcome(item.index, item.source, None, "", jpg, caption.encode("utf-8"), meta, pixel_hash, truncated,
                   phash)


def process_batch(items: list[Item], cfg: SampleConfig) -> list[Outcome]:
    return [process(item, cfg) for item in items]


# ---------------------------------------------------------------- captions


def normalise_caption(text: str) -> str:
    return " ".join(text.replace("\ufeff", " ").split())


def _long_caption(text: str, cfg: SampleConfig) -> tuple[str, bool]:
    """(caption, truncated): a caption over ``max_caption_bytes`` is dropped or cut at the last
    whole word that fits (a single longer word: at the last whole character)."""
    data = text.encode("utf-8")
    if len(data) <= cfg.max_caption_bytes:
        return text, False
    if cfg.long_caption == "drop":
        raise Drop("caption_too_long", f"{len(data)} bytes > {cfg.max_caption_bytes}")
    cut = data[: cfg.max_caption_bytes + 1].decode("utf-8", errors="ignore")
    head = cut.rsplit(" ", 1)[0] if " " in cut else cut[:-1]
    return head.encode("utf-8")[: cfg.max_caption_bytes].decode("utf-8", errors="ignore").rstrip(), True


def _caption(item: Item, cfg: SampleConfig) -> str:
    raw = item.caption
    if raw is None:
        raise Drop("missing_caption", "no caption")
    if item.caption_is_url:
        try:
            raw = storage.read_bytes(raw)
        except Exception as e:  # noqa: BLE001 - any read failure is this sample's problem
            raise Drop("missing_caption", f"{item.caption}: {type(e).__name__}: {e}") from None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Drop("caption_not_utf8", str(e)) from None
    try:
        raw.encode("utf-8")  # surrogate escapes from a non-UTF-8 table
    except UnicodeEncodeError as e:
        raise Drop("caption_not_utf8", str(e)) from None
    text = normalise_caption(raw)
    if not text:
        raise Drop("missing_caption", "empty caption")
    if len(text.split()) < cfg.min_caption_words:
        raise Drop("caption_too_short", f"{text!r} has < {cfg.min_caption_words} words")
    for pattern in _compiled(cfg.boilerplate):
        if pattern.search(text):
            raise Drop("caption_boilerplate", f"{text[:200]!r} matches {pattern.pattern!r}")
    if cfg.languages:
        _check_language(text, cfg)
    return text


def _check_language(text: str, cfg: SampleConfig) -> None:
    from data_prep._shard_filters import caption_language

    lang, prob = caption_language(text)
    if lang not in cfg.languages or prob < cfg.min_language_confidence:
        raise Drop("caption_language", f"{text[:200]!r}: {lang} (p={prob:.2f}); allowed {list(cfg.languages)}"
                   + (f" with p >= {cfg.min_language_confidence:g}" if cfg.min_language_confidence else ""))


@functools.lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


# ---------------------------------------------------------------- images


def _image_bytes(item: Item, cfg: SampleConfig) -> bytes:
    if isinstance(item.image, bytes):
        data = item.image
    else:
        try:
            with storage.open_read(item.image) as f:
                data = f.read(cfg.max_file_bytes + 1)
        except Exception as e:  # noqa: BLE001
            raise Drop("read_error", f"{type(e).__name__}: {e}") from None
    if not data:
        raise Drop("empty_file", "0 bytes")
    if len(data) > cfg.max_file_bytes:
        raise Drop("file_too_large", f"> {cfg.max_file_bytes} bytes")
    return data


def _decode(data: bytes, cfg: SampleConfig) -> tuple[np.ndarray, int, int, str]:
    """Bytes -> (H, W, 3) uint8 RGB, original width, height and mode."""
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # Pillow's own guard (raises above 2x) backs up ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Drop("decompression_bomb", str(e)) from None
        except UnidentifiedImageError:
            raise Drop("not_an_image", f"{data[:16]!r}...") from None
        except Exception as e:  # noqa: BLE001 - corrupt headers raise all sorts
            raise Drop("undecodable", f"{type(e).__name__}: {e}") from None
        width, height = im.size
        if width * height > cfg.max_pixels:
            raise Drop("decompression_bomb", f"{width}x{height} > {cfg.max_pixels} pixels")
        if min(width, height) < cfg.min_size:
            raise Drop("too_small", f"{width}x{height}, shorter side < {cfg.min_size}")
        if max(width, height) > cfg.max_aspect * min(width, height):
            raise Drop("aspect_ratio", f"{width}x{height} outside [1/{cfg.max_aspect:g}, {cfg.max_aspect:g}]")
        mode = im.mode
        try:
            im.load()
            im = _upright(im)
            rgb = to_rgb(im)
        except Drop:
            raise
        except Image.DecompressionBombError as e:
            raise Drop("decompression_bomb", str(e)) from None
        except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, ValueError...
            raise Drop("undecodable", f"{type(e).__name__}: {e}") from None
    return rgb, width, height, mode


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth a drop
        return im


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8; alpha over white; 16-bit and float scaled to 8 bits."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        g = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)  # (H, W)
        return np.repeat(g[:, :, None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA")
    elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "L"):
        im = im.convert("RGB")
    elif im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im).astype(np.uint32)  # (H, W, 4)
        alpha = a[:, :, 3:4]
        rgb = (a[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)
    if im.mode != "RGB":
        raise Drop("unsupported_mode", im.mode)
    return np.asarray(im, dtype=np.uint8)


def _pixel_hash(rgb: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{rgb.shape[1]}x{rgb.shape[0]}:".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def _resize_shorter(rgb: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(rgb, "RGB")
    w, h = im.size
    if min(w, h) == size:
        return im
    scale = size / min(w, h)
    new = (size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), size)
    return im.resize(new, Image.Resampling.LANCZOS)


def _encode(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def meta_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
