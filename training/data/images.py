"""Reading image files as the buckets expect them: size and mode checked from the header (a decompression bomb is
never decoded), EXIF rotation applied, transparency on white."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps

from .buckets import Size
from .items import DatasetError
from .masks import SIXTEEN_BIT_MODES, has_alpha, to_8bit

# EXIF orientations that turn the stored picture by 90 degrees: width and height swap on display.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
# Above any camera's photo (150 MP medium format) and below the size Pillow refuses by default (179 MP), so this
# check and its message are what a user meets. It reads the header, so a decompression bomb is never decoded.
MAX_IMAGE_PIXELS = 160_000_000
# Pillow opens a 16-bit greyscale PNG as I;16 (older Pillow: I); convert() clips it, so it would turn white.
_USABLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT_MODES)


class UnusableFile(ValueError):
    """A file the scan leaves out; the message is the reason the report gives."""


def read_rgb(path: Path) -> Image.Image:
    """The image file as RGB, EXIF rotation applied; DatasetError when it cannot be read (any more)."""
    try:
        with open_image(path) as opened:
            return to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read {path} any more ({exc}); reload the dataset") from exc


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """The image opened, not decoded yet; UnusableFile when its header says it has more than MAX_IMAGE_PIXELS."""
    with warnings.catch_warnings():
        # MAX_IMAGE_PIXELS decides; Pillow's warning for images over 89 MP would repeat at every load.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UnusableFile(f"too large: {width}x{height} ({width * height / 1e6:.3g} megapixels, the limit is "
                                f"{MAX_IMAGE_PIXELS / 1e6:.3g}); downscale it")
            yield img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent areas become white rather than whatever colour the hidden pixels have."""
    img = to_8bit(img)
    if has_alpha(img) or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def inspect_image(path: Path) -> tuple[Size, bool, bool]:
    """The displayed (EXIF-rotated) size, whether it has alpha, whether it is animated. Decodes the whole file, so
    a truncated or corrupt one fails here rather than mid-training."""
    if path.stat().st_size == 0:
        raise UnusableFile("empty file (0 bytes), perhaps a copy that did not finish; copy it again or remove it")
    with open_image(path) as img:
        if img.mode not in _USABLE_MODES:
            raise UnusableFile(f"unsupported colour mode {img.mode}; save it as an 8-bit RGB PNG or JPEG")
        width, height = img.size  # before draft() shrinks it
        orientation = img.getexif().get(0x0112)
        if img.format == "JPEG":
            # At 1/8 scale a JPEG still reads all its data (truncation is still found) in under half the time.
            img.draft(img.mode, (1, 1))
        img.load()
        alpha, animated = has_alpha(img), getattr(img, "is_animated", False)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return (width, height), alpha, animated


