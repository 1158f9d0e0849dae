"""Loss masks: where in an image the loss counts (white) and where it does not (black).

A mask comes from a mask folder (the image's file name, any image extension, in the same sub-folder) or from the
image's own alpha channel. It is cut to the bucket exactly as the image is (resized to cover, centre-cropped,
mirrored with it), then averaged down to the latent's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .buckets import Size, resize_and_crop

MASK_EXTENSIONS = (".png", ".webp", ".jpg", ".jpeg")
ALPHA = "alpha"  # DatasetItem.mask_source of a mask read from the image's own alpha channel


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def mask_file(image: Path, root: Path, mask_root: Path) -> Path | None:
    """The mask for `image` (under `root`) in `mask_root`: same relative folder and file stem."""
    relative = image.relative_to(root).with_suffix("")
    for ext in MASK_EXTENSIONS:
        for candidate in (mask_root / f"{relative}{ext}", mask_root / f"{relative}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_mask(image: Path, source: str | Path, bucket: Size, flip: bool = False) -> torch.Tensor:
    """The mask as float [H, W] in [0, 1] at the bucket's size, cut as the image is."""
    with Image.open(image if source == ALPHA else source) as opened:
        img = ImageOps.exif_transpose(opened)
        if source == ALPHA:
            img = img.convert("RGBA").getchannel("A")
        else:
            img = img.convert("RGBA")  # a mask with transparency: transparent counts as black
            img = Image.composite(img, Image.new("RGBA", img.size, (0, 0, 0, 255)), img).convert("L")
    img, _ = resize_and_crop(img, bucket, crop="center")
    if flip:
        img = ImageOps.mirror(img)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy() / 255.0)


def latent_mask(mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """A [H, W] pixel mask averaged down to a latent of `latent_shape` ([C, H, W] or [C, T, H, W]): [1, ..., h, w]."""
    small = F.interpolate(mask[None, None], size=tuple(latent_shape[-2:]), mode="area")[0, 0]
    return small.view(1, *[1] * (len(latent_shape) - 3), *small.shape)
