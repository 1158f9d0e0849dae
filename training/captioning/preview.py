"""Image + caption tiles, so captions can be checked in the graph before training."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

BACKGROUND, TEXT, DIM = (28, 28, 32), (235, 235, 235), (150, 150, 160)


def caption_tile(image: Image.Image | None, caption: str, label: str = "", size: int = 256, lines: int = 7,
                 placeholder: str = "(image not readable)") -> Image.Image:
    """The image fitted into a size x size square above its caption (wrapped, cut after `lines` lines)."""
    font = ImageFont.load_default()
    line_height = int(font.getbbox("Ag")[3]) + 3
    tile = Image.new("RGB", (size, size + line_height * (lines + 1) + 8), BACKGROUND)
    draw = ImageDraw.Draw(tile)
    if image is not None:
        thumb = ImageOps.contain(image.convert("RGB"), (size, size))
        tile.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    else:
        draw.text((8, size // 2), placeholder, fill=DIM, font=font)
    chars = max(8, int((size - 8) / max(font.getlength("n"), 1)))
    wrapped = textwrap.wrap(caption, chars) or ["(no caption)"]
    if len(wrapped) > lines:
        wrapped = wrapped[: lines - 1] + [textwrap.shorten(" ".join(wrapped[lines - 1:]), chars, placeholder=" ...")]
    y = size + 4
    draw.text((4, y), label[-chars:], fill=DIM, font=font)
    for text in wrapped:
        y += line_height
        draw.text((4, y), text, fill=TEXT if caption else DIM, font=font)
    return tile


def preview_tiles(captions: list[tuple[Path, str]], open_image, size: int = 256) -> list[Image.Image]:
    """A tile per (image path, caption); `open_image` loads a path (an unreadable image gets a blank tile)."""
    tiles = []
    for path, caption in captions:
        try:
            image = open_image(path)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
            image = None
        tiles.append(caption_tile(image, caption, path.name, size))
    return tiles
