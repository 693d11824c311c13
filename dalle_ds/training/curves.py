"""The prior's learning curve as a PNG, drawn with Pillow only (matplotlib is not a dependency).

    write_learning_curve("runs/demo/prior")   # -> runs/demo/prior/learning_curve.png

Two panels, image loss and text loss (nats per token) against updates: the training loss of
``metrics.jsonl`` (thin line: every update; thick line: its exponential moving average) and the
validation loss of ``eval.jsonl`` (dots joined by a line), with axis ticks and a legend.
``write_comparison_curve`` draws several runs of one quantity on one panel the same way (benchmarks).
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dalle_ds.training.logger import read_jsonl

TRAIN, TRAIN_EMA, VAL = (170, 190, 230), (40, 90, 200), (220, 60, 40)
PANEL_W, PANEL_H, MARGIN_L, MARGIN_B, MARGIN_T, MARGIN_R = 420, 300, 52, 36, 26, 12


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]


def _ema(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Bias-corrected exponential moving average over about 2% of the run (0.5 to 0.98 per point)."""
    decay = min(0.98, max(0.5, 1.0 - 50.0 / max(len(points), 1)))
    out, avg, weight = [], 0.0, 0.0
    for x, y in points:
        avg, weight = decay * avg + (1 - decay) * y, decay * weight + (1 - decay)
        out.append((x, avg / weight))
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = max(hi - lo, 1e-9)
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _panel(title: str, series: list[tuple[list[tuple[float, float]], tuple[int, int, int], int, bool]],
           font) -> Image.Image:
    img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    d = ImageDraw.Draw(img)
    d.text((MARGIN_L, 6), title, fill="black", font=font)
    pts = [p for s, *_ in series for p in s]
    x0, y0, x1, y1 = MARGIN_L, MARGIN_T, PANEL_W - MARGIN_R, PANEL_H - MARGIN_B
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    if not pts:
        d.text((x0 + 10, y0 + 10), "no data yet", fill="black", font=font)
        return img
    xs, ys = [p[0] for p in pts], sorted(p[1] for p in pts)
    xlo, xhi = 0.0, max(max(xs), 1.0)
    # robust y range: ignore the first percent (the initial loss dwarfs the rest)
    ylo, yhi = ys[0], ys[min(len(ys) - 1, int(0.99 * len(ys)))]
    pad = 0.05 * max(yhi - ylo, 1e-6)
    ylo, yhi = ylo - pad, yhi + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        y = min(max(y, ylo), yhi)
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _ticks(ylo, yhi):
        _, py = to_px(xlo, t)
        d.line([x0, py, x1, py], fill=(235, 235, 235))
        d.text((4, py - 6), f"{t:.3g}", fill="black", font=font)
    for t in _ticks(xlo, xhi):
        px, _ = to_px(t, ylo)
        d.line([px, y1, px, y1 + 4], fill="black")
        d.text((px - 12, y1 + 6), f"{t:.0f}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 20, PANEL_H - 14), "updates", fill="black", font=font)
    for points, colour, width, dots in series:
        if len(points) > 1:
            d.line([to_px(x, y) for x, y in points], fill=colour, width=width)
        if dots:
            for x, y in points:
                px, py = to_px(x, y)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    return img


def write_learning_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``<run_dir>/learning_curve.png`` (or ``out``) from metrics.jsonl and eval.jsonl; returns the path."""
    run_dir = Path(run_dir)
    train, val = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    font = ImageFont.load_default()
    panels = []
    for key, title in (("image_loss", "image loss (nats/token)"), ("text_loss", "text loss (nats/token)")):
        t = _series(train, key)
        panels.append(_panel(title, [(t, TRAIN, 1, False), (_ema(t), TRAIN_EMA, 2, False),
                                     (_series(val, key), VAL, 2, True)], font))
    legend_h = 20
    img = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + legend_h), "white")
    for i, p in enumerate(panels):
        img.paste(p, (i * PANEL_W, 0))
    d = ImageDraw.Draw(img)
    x = MARGIN_L
    for colour, label in ((TRAIN, "train"), (TRAIN_EMA, "train (EMA)"), (VAL, "validation (held-out tokens)")):
        d.rectangle([x, PANEL_H + 6, x + 14, PANEL_H + 14], fill=colour)
        d.text((x + 18, PANEL_H + 4), label, fill="black", font=font)
        x += 30 + 7 * len(label)
    path = Path(out) if out is not None else run_dir / "learning_curve.png"
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


PALETTE = ((40, 90, 200), (220, 60, 40), (40, 150, 60), (150, 60, 170))


def _light(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c + 0.6 * (255 - c)) for c in colour)  # type: ignore[return-value]


def write_comparison_curve(path: str | Path, title: str, curves: dict[str, list[float]]) -> Path:
    """One panel, one colour per named curve (value per update): thin raw line, thick EMA; legend
    with each curve's final EMA value. Returns the path."""
    font = ImageFont.load_default()
    series, legend = [], []
    for colour, (label, values) in zip(PALETTE * 4, curves.items()):
        points = [(float(i), float(v)) for i, v in enumerate(values) if math.isfinite(v)]
        smooth = _ema(points)
        series += [(points, _light(colour), 1, False), (smooth, colour, 2, False)]
        legend.append((colour, f"{label} (EMA at end {smooth[-1][1]:.4f})" if smooth else label))
    panel = _panel(title, series, font)
    legend_h = 16 * len(legend) + 6
    img = Image.new("RGB", (PANEL_W, PANEL_H + legend_h), "white")
    img.paste(panel, (0, 0))
    d = ImageDraw.Draw(img)
    for i, (colour, label) in enumerate(legend):
        y = PANEL_H + 4 + 16 * i
        d.rectangle([MARGIN_L, y + 2, MARGIN_L + 14, y + 10], fill=colour)
        d.text((MARGIN_L + 18, y), label, fill="black", font=font)
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import sys

    print(write_learning_curve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
