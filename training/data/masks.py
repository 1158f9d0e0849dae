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


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit L (value / 257, rounded); any other image as it is."""
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    values = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


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


def check_mask_shape(mask: Path, image: Path, size: tuple[int, int]) -> None:
    """Refuse a mask whose shape (as shown, EXIF rotation applied) is not its image's: it would be cut elsewhere."""
    try:
        with Image.open(mask) as opened:
            width, height = ImageOps.exif_transpose(opened).size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"mask {mask} cannot be read ({exc}); fix or remove it") from exc
    if abs(width * size[1] - height * size[0]) > 0.01 * size[0] * height:
        raise ValueError(f"mask {mask} is {width}x{height}, its image {image} is {size[0]}x{size[1]} as shown (EXIF "
                         "rotation applied): a mask must have its image's shape (any scale); make it from the image "
                         "as shown")


def load_mask(image: Path, source: str | Path, bucket: Size, flip: bool = False) -> torch.Tensor:
    """The mask as float [H, W] in [0, 1] at the bucket's size, cut as the image is."""
    with Image.open(image if source == ALPHA else source) as opened:
        img = to_8bit(ImageOps.exif_transpose(opened))  # a 16-bit mask would clip to white
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


class LossMasks:
    """The run's loss masks at the latents' size, by item index, flip and split; and the loss weights they give."""

    def __init__(self, floor: float):
        self.floor = floor  # the weight where a mask is black
        self._masks: dict[tuple[bool, int, bool], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._masks)

    def get(self, index: int, flip: bool = False, validation: bool = False) -> torch.Tensor:
        return self._masks[(validation, index, flip)]

    def encode(self, items, latents, flips: tuple[bool, ...], validation: bool = False) -> None:
        """Each masked item's mask, cut as its image and averaged down to its latent's size (from `latents`)."""
        for index, item in enumerate(items):
            for flip in flips if item.mask is not None else ():
                pixels = load_mask(item.path, item.mask, item.bucket, flip)
                self._masks[(validation, index, flip)] = latent_mask(pixels, latents.get(index, flip, validation).shape)

    def weights(self, items, indices: list[int], flips: list[bool], validation: bool, latents,
                device) -> torch.Tensor:
        """Per sample (the items' loss weights), or per latent element where an item has a mask: the mask lifted
        to the floor and scaled to mean 1, so a masked image's loss is its mean over the area it learns."""
        weights = torch.tensor([item.loss_weight for item in items], device=device)
        keys = [(validation, i, f) for i, f in zip(indices, flips, strict=True)]
        if not any(key in self._masks for key in keys):
            return weights
        shape = latents.get(indices[0], flips[0], validation).shape
        ones = torch.ones(1, *[1] * (len(shape) - 3), *shape[-2:])
        masks = torch.stack([self.floor + (1 - self.floor) * self._masks[key] if key in self._masks else ones
                             for key in keys])
        per_sample = [-1, *[1] * (masks.dim() - 1)]
        masks = masks / masks.flatten(1).mean(1).clamp_min(1e-6).view(per_sample)
        return (masks * weights.cpu().view(per_sample)).to(device)
