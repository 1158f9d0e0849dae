"""A dataset: the scanned, bucketed and captioned items of a folder (and a regularisation folder), the held-out
share, the epoch order, and the pixels of an item as training reads them."""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

from .buckets import Bucketizer, Size, resize_and_crop
from .captions import tag_frequency
from .images import read_rgb
from .items import DatasetError, DatasetItem, check_positive
from .report import DatasetReport
from .scan import Scanner, clip_rule
from .video import VideoError, read_frame_folder, read_frames

CONTROL_FOLDER = "control"  # the edit models' source images, when the dataset folder has this sub-folder


@dataclass
class Dataset:
    items: list[DatasetItem]
    validation: list[DatasetItem]
    report: DatasetReport
    root: Path
    reg_empty_prompt: bool = False  # the regularisation images train with the empty prompt
    options: dict | None = None  # the Load Dataset settings it was made with (kept in the LoRA's metadata)

    def epoch_order(self, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        """Batches of indices into `items` for one epoch: each item `repeats` times, one bucket and frame count per
        batch (so a batch stacks into one tensor)."""
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}")
        # A str seed is hashed with sha512 by random, so the order is the same in every process.
        rng = random.Random(f"{seed}/{epoch}")
        # A one-frame clip sample is [1, H, W, 3], a still image [H, W, 3]: is_clip keeps them apart too.
        by_shape: dict[tuple[Size, int, bool], list[int]] = defaultdict(list)
        for index, item in enumerate(self.items):
            by_shape[(item.bucket, item.frame_count, item.is_clip)].extend([index] * item.repeats)
        batches: list[list[int]] = []
        # Still images all have the key (bucket, 1, False): the groups come in bucket order, as when keyed by bucket.
        for shape in sorted(by_shape):
            indices = by_shape[shape]
            rng.shuffle(indices)
            batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
        rng.shuffle(batches)
        return batches

    def load_image(
        self, item: DatasetItem, crop: str = "center", flip: bool = False, rng: random.Random | None = None
    ) -> torch.Tensor:
        """The item's image as float [H, W, 3] in [0, 1] (ComfyUI IMAGE layout, no batch), exactly bucket-sized;
        a clip's frames as [T, H, W, 3], all cut alike."""
        return load_item_image(item, crop, flip, rng)[0]

    @property
    def has_control(self) -> bool:
        """Whether the items are edit pairs: each has a control (source) image."""
        return any(item.control is not None for item in self.items + self.validation)

    def load_control(self, item: DatasetItem, flip: bool = False) -> torch.Tensor:
        """The item's control (source) image as float [H, W, 3] in [0, 1], cut to the item's bucket (centred)."""
        if item.control is None:
            raise DatasetError(f"{item.path} has no control image")
        img, _ = resize_and_crop(read_rgb(item.control), item.bucket, crop="center")
        if flip:
            img = ImageOps.mirror(img)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Tag counts per folder over the non-regularisation items (kohya's ss_tag_frequency)."""
        by_folder: dict[str, list[str]] = defaultdict(list)
        counted: set[Path] = set()
        for item in self.items + self.validation:
            # The samples of one clip share its caption: it counts once.
            if not item.is_reg and item.path not in counted:
                counted.add(item.path)
                by_folder[item.folder].append(item.caption)
        return tag_frequency(by_folder)


def load_item_image(
    item: DatasetItem, crop: str = "center", flip: bool = False, rng: random.Random | None = None
) -> tuple[torch.Tensor, Size]:
    """The item's image tensor and the crop's (top, left) corner in the resized image (for SDXL conditioning)."""
    if item.is_clip:
        return _load_clip(item, crop, flip, rng)
    img, corner = resize_and_crop(read_rgb(item.path), item.bucket, crop=crop, rng=rng)
    if flip:
        img = ImageOps.mirror(img)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()), corner


def _load_clip(
    item: DatasetItem, crop: str, flip: bool, rng: random.Random | None
) -> tuple[torch.Tensor, Size]:
    """The clip sample's frames as float [T, H, W, 3], every frame cut (and mirrored) alike, and the crop corner."""
    try:
        frames = read_frame_folder(item.path, item.frames) if item.path.is_dir() else read_frames(item.path, item.frames)
    except VideoError as exc:
        raise DatasetError(f"cannot read {item.path} any more ({exc}); reload the dataset") from exc
    seed = (rng or random.Random()).random()  # one draw, so a random crop is the same window in every frame
    cut = [resize_and_crop(frame, item.bucket, crop=crop, rng=random.Random(seed)) for frame in frames]
    arrays = [np.asarray(ImageOps.mirror(img) if flip else img, dtype=np.float32) for img, _ in cut]
    return torch.from_numpy(np.stack(arrays) / 255.0), cut[0][1]


def load_dataset(
    folder: str | os.PathLike,
    *,
    caption_extensions: tuple[str, ...] = (".txt", ".caption"),
    resolution: int | Size = 512,
    min_side: int = 256,
    max_side: int = 1024,
    bucket_step: int = 64,
    no_upscale: bool = False,
    reg_folder: str | os.PathLike | None = None,
    prior_loss_weight: float = 1.0,
    validation_split: float = 0.0,
    seed: int = 0,
    min_image_side: int = 8,
    default_repeats: int = 1,
    mask_folder: str | os.PathLike | None = None,
    alpha_mask: bool = False,
    reg_empty_prompt: bool = False,
    frames: int = 17,
    frame_extraction: str = "head",
    frame_rate: float = 0.0,
    frame_multiple: int = 4,
    control_folder: str | os.PathLike | None = None,
    resolutions: tuple[int, ...] = (),
) -> Dataset:
    """Scan `folder` (and `reg_folder`) into bucketed, captioned items and a report.

    Videos and frame folders give clip samples of `frames` frames (see video.frame_indices); a control folder (or a
    `control` sub-folder) pairs each training image with an edit model's source image of the same name. Each of
    `resolutions` (multi-resolution training) buckets every training and regularisation image once more at that size.
    """
    check_positive("resolution", *(resolution if isinstance(resolution, (tuple, list)) else (resolution,)))
    check_positive("min_side", min_side)
    check_positive("max_side", max_side)
    check_positive("bucket_step", bucket_step)
    check_positive("min_image_side", min_image_side)
    check_positive("default_repeats", default_repeats)
    check_positive("resolutions", *resolutions)
    if max_side < min_side:
        raise DatasetError(f"max_side ({max_side}) must be at least min_side ({min_side})")
    if not 0.0 <= validation_split < 1.0:
        raise DatasetError(f"validation_split must be in [0, 1), got {validation_split}")
    if prior_loss_weight < 0:
        raise DatasetError(f"prior_loss_weight must be 0 or more, got {prior_loss_weight}")
    rule = clip_rule(frames, frame_extraction, frame_rate, frame_multiple)
    try:
        bucketizer = Bucketizer(resolution, min_side, max_side, bucket_step, no_upscale)
        more = [Bucketizer(r, min_side, max_side, bucket_step, no_upscale) for r in resolutions]
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc

    root = _existing_folder(folder, "folder")
    # A blank reg_folder (an empty text widget) means none.
    has_reg = reg_folder is not None and bool(str(reg_folder).strip())
    reg_root = _existing_folder(reg_folder, "reg_folder") if has_reg else None
    if reg_root == root:
        raise DatasetError(f"reg_folder must be a different folder from folder (both are {root})")
    mask_root = _existing_folder(mask_folder, "mask_folder") if mask_folder is not None else None
    control_root = _control_root(root, control_folder)
    report = DatasetReport(root=str(root))
    if mask_root is not None or alpha_mask:
        report.masks = " and ".join(([str(mask_root)] if mask_root else []) + (["alpha channels"] if alpha_mask else []))
    report.control = str(control_root) if control_root else ""
    scan = Scanner(bucketizer, caption_extensions, min_image_side, default_repeats, report, mask_root, alpha_mask,
                    rule, control_root)

    train = scan.folder(root, is_reg=False, loss_weight=1.0, exclude=(reg_root, mask_root, control_root))
    if not train:
        raise DatasetError(_no_images_message(root, "folder", report.skipped))
    reg = scan.folder(reg_root, is_reg=True, loss_weight=prior_loss_weight) if reg_root else []
    if reg_root and not reg:
        raise DatasetError(_no_images_message(reg_root, "reg_folder", report.skipped))

    # Split by file: the samples of one clip stay together (for still images a file is an item, as before).
    files = list(dict.fromkeys(item.path for item in train))
    held_out = {files[i] for i in _validation_indices(len(files), validation_split, seed)}
    validation = [item for item in train if item.path in held_out]
    items = [item for item in train if item.path not in held_out] + reg
    report.train_count = len(items) - len(reg)
    report.reg_count = len(reg)
    items = at_every_resolution(items, more)
    report.resolutions = tuple(dict.fromkeys((resolution, *resolutions))) if resolutions else ()

    report.buckets = dict(sorted(Counter(item.bucket for item in items).items()))
    report.frame_buckets = dict(sorted(Counter((item.bucket, item.frame_count) for item in items).items()))
    report.clip_samples = sum(item.is_clip for item in items + validation)
    report.validation_count = len(validation)
    report.samples_per_epoch = sum(item.repeats for item in items)
    return Dataset(items=items, validation=validation, report=report, root=root, reg_empty_prompt=reg_empty_prompt)


def at_every_resolution(items: list[DatasetItem], bucketizers: list[Bucketizer]) -> list[DatasetItem]:
    """The items, and each once more in its bucket of every other resolution (where that bucket is a new one)."""
    out = list(items)
    for item in items:
        seen = {item.bucket}
        for bucketizer in bucketizers:
            bucket = bucketizer.assign(*item.size)
            if bucket not in seen:
                seen.add(bucket)
                out.append(replace(item, bucket=bucket))
    return out


def _control_root(root: Path, control_folder: str | os.PathLike | None) -> Path | None:
    """The control folder as given, else the dataset's `control` sub-folder when there is one, else None."""
    if control_folder is not None and str(control_folder).strip():
        control = _existing_folder(control_folder, "control_folder")
        if control == root:
            raise DatasetError(f"control_folder must be a different folder from folder (both are {root})")
        return control
    auto = root / CONTROL_FOLDER
    return auto if auto.is_dir() and not auto.is_symlink() else None


def _existing_folder(folder: str | os.PathLike, name: str) -> Path:
    path = Path(folder).expanduser()
    if not str(folder).strip() or not path.is_dir():
        raise DatasetError(
            f"{name} {str(folder)!r} is not an existing folder: create it and put .png/.jpg/.webp images in it, "
            "optionally in sub-folders named like '10_sks dog' (10 repeats, caption 'sks dog')"
        )
    return path.resolve()


def _no_images_message(root: Path, name: str, skipped: list[tuple[Path, str]]) -> str:
    message = f"{name} {root} has no usable image: put .png/.jpg/.webp images in {root} (sub-folders are scanned too)"
    here = [(path, reason) for path, reason in skipped if path.is_relative_to(root)]
    if here:
        message += "; skipped:\n" + "\n".join(f"  {path}: {reason}" for path, reason in here[:10])
        if len(here) > 10:
            message += f"\n  ... and {len(here) - 10} more"
    return message


def _validation_indices(count: int, fraction: float, seed: int) -> set[int]:
    """Which of `count` images are held out: fixed by the seed, at least one, and never all of them."""
    if fraction <= 0 or count < 2:
        return set()
    wanted = min(count - 1, max(1, round(count * fraction)))
    return set(random.Random(seed).sample(range(count), wanted))


