"""A dataset's items (an image, or a clip's sample) and the error for a dataset that cannot be used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .buckets import Size


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message says what to change."""


@dataclass
class DatasetItem:
    path: Path
    caption: str
    folder: str
    repeats: int
    is_reg: bool
    loss_weight: float
    size: Size
    bucket: Size
    mask: Path | str | None = None  # a mask file, masks.ALPHA (the image's alpha channel), or None (learn everywhere)
    frames: tuple[int, ...] = ()  # source frame indices of a clip sample; empty for a still image
    control: Path | None = None  # an edit model's source image (the target is `path`), None without one

    @property
    def is_clip(self) -> bool:
        """A sample of a video or frame folder rather than a still image."""
        return bool(self.frames)

    @property
    def frame_count(self) -> int:
        """Frames of the sample: 1 for a still image."""
        return len(self.frames) or 1


def check_positive(name: str, *values: object) -> None:
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DatasetError(f"{name} must be a positive integer, got {value!r}")


