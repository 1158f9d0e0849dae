"""Aspect-ratio bucketing (kohya style): every image trains at a size close to its own shape, never squashed."""

from __future__ import annotations

import math
import random

from PIL import Image

Size = tuple[int, int]


class Bucketizer:
    """The bucket sizes for one target resolution, and which bucket an image of a given size goes to."""

    def __init__(
        self,
        resolution: int | Size,
        min_side: int = 256,
        max_side: int = 1024,
        step: int = 64,
        no_upscale: bool = False,
    ) -> None:
        width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
        for name, value in (
            ("resolution", width),
            ("resolution", height),
            ("min_side", min_side),
            ("max_side", max_side),
            ("step", step),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_side < min_side:
            raise ValueError(f"max_side ({max_side}) must be at least min_side ({min_side})")
        self.area = width * height
        self.min_side = min_side
        self.max_side = max_side
        self.step = step
        self.no_upscale = no_upscale
        self.buckets: list[Size] = self._make_buckets()
        if not self.buckets:
            raise ValueError(
                f"no bucket fits: with resolution {width}x{height}, step {step} and sides in "
                f"[{min_side}, {max_side}] there is no size; lower min_side or raise the resolution"
            )

    def _make_buckets(self) -> list[Size]:
        step, lo, hi = self.step, self.min_side, self.max_side
        found: set[Size] = set()
        square = min(hi, math.isqrt(self.area) // step * step)
        if square >= lo:
            found.add((square, square))
        first = -(-lo // step) * step
        for w in range(first, hi + 1, step):
            # The tallest height on the step grid whose area still fits: the bucket is maximal.
            h = min(hi, self.area // w // step * step)
            if h >= lo:
                found.add((w, h))
                found.add((h, w))
        return sorted(found)

    def assign(self, width: int, height: int) -> Size:
        """The bucket for an image of width x height: closest aspect ratio, then the larger area."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.no_upscale and width * height <= self.area:
            return self._own_size(width, height)
        target = math.log(width / height)
        return min(
            self.buckets,
            key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1], b[0]),
        )

    def _own_size(self, width: int, height: int) -> Size:
        """The image's own size rounded down to the step grid: it is cropped a little, never enlarged."""
        return (
            max(self.step, min(self.max_side, width // self.step * self.step)),
            max(self.step, min(self.max_side, height // self.step * self.step)),
        )


def cover_size(size: Size, bucket: Size) -> Size:
    """The size the image is resized to, keeping its aspect ratio, so that it just covers the bucket."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def resize_and_crop(
    img: Image.Image,
    bucket: Size,
    crop: str = "center",
    rng: random.Random | None = None,
) -> tuple[Image.Image, Size]:
    """Resize `img` (aspect kept) to cover `bucket`, then crop it to exactly the bucket size.

    Returns the cropped image and the crop's top-left corner as (top, left) in the resized image,
    the order SDXL's crop_coords_top_left conditioning uses.
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    bw, bh = bucket
    new_w, new_h = cover_size(img.size, bucket)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if crop == "center":
        left, top = (new_w - bw) // 2, (new_h - bh) // 2
    else:
        rng = rng or random.Random()
        left, top = rng.randint(0, new_w - bw), rng.randint(0, new_h - bh)
    if (new_w, new_h) != (bw, bh):
        img = img.crop((left, top, left + bw, top + bh))
    return img, (top, left)
