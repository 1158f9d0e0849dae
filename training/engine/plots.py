"""A loss graph drawn with Pillow (no plotting dependency): raw and smoothed train loss, validation points."""

from __future__ import annotations

from PIL import Image, ImageDraw


def smooth(values: list[float], factor: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's smoothing shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor**i))
    return out


def loss_graph(losses: list[float], validation: list[tuple[int, float]] = (), width: int = 640,
               height: int = 360) -> Image.Image:
    img = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    values = list(losses) + [v for _, v in validation]
    if not values:
        d.text((left, top), "no loss recorded", fill=(220, 220, 220))
        return img
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    steps = max(len(losses), max((s for s, _ in validation), default=1), 2)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (right - left) * (step - 1) / (steps - 1), bottom - (bottom - top) * (value - lo) / (hi - lo))

    d.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    for frac in (0.0, 0.5, 1.0):
        value = lo + (hi - lo) * frac
        y = bottom - (bottom - top) * frac
        d.text((4, y - 6), f"{value:.4g}", fill=(170, 170, 180))
    d.text((left, bottom + 8), "step 1", fill=(170, 170, 180))
    d.text((right - 60, bottom + 8), f"step {steps}", fill=(170, 170, 180))
    if len(losses) > 1:
        d.line([xy(i, v) for i, v in enumerate(losses, start=1)], fill=(90, 120, 170), width=1)
        d.line([xy(i, v) for i, v in enumerate(smooth(losses), start=1)], fill=(120, 190, 255), width=2)
    for step, value in validation:
        x, y = xy(step, value)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 170, 60))
    d.text((left + 6, top - 18), "train loss (smoothed)", fill=(120, 190, 255))
    if validation:
        d.text((left + 190, top - 18), "validation", fill=(255, 170, 60))
    return img
