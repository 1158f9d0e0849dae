"""A folder of training images and video clips with captions, kohya's folder convention, buckets, and a readable
report.

Over 300 lines because scanning, the report of what was skipped and why, and reading an image the way the
buckets expect are one concept that changes together (kohya's folder rules).
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Bucketizer, Size, resize_and_crop
from .captions import tag_frequency
from .masks import ALPHA, SIXTEEN_BIT_MODES, check_mask_shape, has_alpha, mask_file, to_8bit
from .video import (
    EXTRACTIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoError,
    check_frames,
    frame_indices,
    is_frame_name,
    probe,
    probe_frame_folder,
    read_frame_folder,
    read_frames,
    resampled,
)

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")
# EXIF orientations that turn the stored picture by 90 degrees: width and height swap on display.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
# Above any camera's photo (150 MP medium format) and below the size Pillow refuses by default (179 MP), so this
# check and its message are what a user meets. It reads the header, so a decompression bomb is never decoded.
MAX_IMAGE_PIXELS = 160_000_000
# Pillow opens a 16-bit greyscale PNG as I;16 (older Pillow: I); convert() clips it, so it would turn white.
_USABLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT_MODES)
SUMMARY_LIST_LIMIT = 20  # lines per list in the summary: a report of 10,000 files stays readable
_LINKED_FOLDER = "symlink to a folder, not followed; copy the folder here, or link its image files one by one"
CONTROL_FOLDER = "control"  # the edit models' source images, when the dataset folder has this sub-folder
# A caption file above this size is not read (a 10 MB one made Train LoRA tokenize for minutes, past Cancel).
MAX_CAPTION_BYTES = 64 * 1024
# Captions are cut to this many characters: about 1,000 tokens, twice what the longest-reading text encoders are
# trained on (T5-XXL / UMT5: 512 tokens); CLIP reads 75 per chunk and the host would encode every chunk.
MAX_CAPTION_CHARS = 4000


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message says what to change."""


class _Unusable(ValueError):
    """A file the scan leaves out; the message is the reason the report gives."""


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


@dataclass
class ClipEntry:
    """One clip in the report: what the file holds and the samples taken from it."""

    name: str
    frames: int
    fps: float
    frame_rate: float  # the rate it was resampled to, 0 when kept
    resampled: int  # frames at frame_rate
    samples: int
    sample_frames: int
    bucket: Size

    def line(self) -> str:
        """The clip's line in the summary."""
        rate = f" ({self.resampled} at {self.frame_rate:g} fps)" if self.frame_rate > 0 else ""
        plural = "s" if self.samples != 1 else ""
        return (f"  {self.name}: {self.frames} frames at {self.fps:g} fps{rate} -> {self.samples} sample{plural} of "
                f"{self.sample_frames} frames, {self.bucket[0]}x{self.bucket[1]}")


@dataclass
class DatasetReport:
    root: str = ""
    images_per_folder: dict[str, int] = field(default_factory=dict)
    clips_per_folder: dict[str, int] = field(default_factory=dict)
    repeats_per_folder: dict[str, int] = field(default_factory=dict)
    buckets: dict[Size, int] = field(default_factory=dict)
    frame_buckets: dict[tuple[Size, int], int] = field(default_factory=dict)  # (bucket, frames per sample): samples
    clips: list[ClipEntry] = field(default_factory=list)
    clip_samples: int = 0  # of train_count + validation_count + reg_count
    captions_found: int = 0
    captions_from_folder: int = 0
    captions_missing: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    caption_errors: list[tuple[Path, str]] = field(default_factory=list)
    captions_cut: list[tuple[Path, int]] = field(default_factory=list)  # (caption file, its length before the cut)
    animated: list[Path] = field(default_factory=list)  # images with several frames: the first one is used
    # Images differing only by extension, and the caption file they share (None: none yet).
    shared_captions: list[tuple[tuple[Path, ...], Path | None]] = field(default_factory=list)
    masks: str = ""  # where masks come from, empty when masked loss is off
    masks_found: int = 0
    masks_missing: list[Path] = field(default_factory=list)
    control: str = ""  # the control folder of an edit dataset, empty without one
    control_pairs: int = 0
    train_count: int = 0
    validation_count: int = 0
    reg_count: int = 0
    samples_per_epoch: int = 0

    def summary(self) -> str:
        """A multi-line text for the user: what was found, how it is bucketed, and what was left out why."""
        lines = [f"Dataset: {self.root}", self._counts_line(), "Folders:"]
        for folder, count in self.images_per_folder.items():
            clips = f", {self.clips_per_folder[folder]} clip(s)" if self.clips_per_folder.get(folder) else ""
            lines.append(f"  {folder}: {count} image(s){clips} x {self.repeats_per_folder.get(folder, 1)} repeat(s)")
        lines.extend(self._bucket_lines())
        if self.clips:
            lines.append(f"Clips ({len(self.clips)}):")
            lines.extend(capped([clip.line() for clip in self.clips]))
        lines.append(
            f"Captions: {self.captions_found} from caption files, {self.captions_from_folder} from folder names, "
            f"{self.captions_missing} missing (empty caption)"
        )
        if self.captions_missing:
            lines.append(
                "  (put a .txt caption next to each image, or name its folder like '10_sks dog' to caption it 'sks dog')"
            )
        if self.masks:
            lines.append(f"Masks ({self.masks}): {self.masks_found} image(s) masked, {len(self.masks_missing)} "
                         "without a mask (they learn everywhere)")
            lines.extend(capped([f"  no mask: {path}" for path in self.masks_missing]))
        if self.control:
            lines.append(f"Control images ({self.control}): {self.control_pairs} pairs")
        if self.shared_captions:
            lines.append(f"Images with the same name in one folder ({len(self.shared_captions)}): one caption file "
                         "captions all of them; rename all but one and give each its own caption")
            lines.extend(capped([f"  {', '.join(map(str, paths))}: "
                                  + (f"share {caption}" if caption else "no caption file yet, one would caption all")
                                  for paths, caption in self.shared_captions]))
        if self.animated:
            lines.append(f"Animated images ({len(self.animated)}): the first frame of each is used")
            lines.extend(capped([f"  {path}" for path in self.animated]))
        if self.caption_errors:
            lines.append(f"Caption files that could not be read ({len(self.caption_errors)}):")
            lines.extend(capped([f"  {path}: {reason}" for path, reason in self.caption_errors]))
        if self.captions_cut:
            lines.append(f"Captions cut to their first {MAX_CAPTION_CHARS:,} characters, far more than a text encoder "
                         f"reads ({len(self.captions_cut)}):")
            lines.extend(capped([f"  {path}: {length:,} characters" for path, length in self.captions_cut]))
        if self.skipped:
            lines.append(f"Skipped files ({len(self.skipped)}):")
            lines.extend(capped([f"  {path}: {reason}" for path, reason in self.skipped]))
        else:
            lines.append("Skipped files: none")
        return "\n".join(lines)

    def _counts_line(self) -> str:
        spe = f"{self.samples_per_epoch} samples per epoch with repeats"
        split = (f"{self.train_count} for training, {self.validation_count} for validation, {self.reg_count} "
                 "regularisation")
        if not self.clips:
            return f"Images: {split}; {spe}"
        total = self.train_count + self.validation_count + self.reg_count
        return (f"Samples: {split} ({self.clip_samples} from {len(self.clips)} clip(s), {total - self.clip_samples} "
                f"still image(s)); {spe}")

    def _bucket_lines(self) -> list[str]:
        if not self.clips:
            return ["Buckets (width x height: training images, regularisation included):",
                    *(f"  {w}x{h}: {count}" for (w, h), count in sorted(self.buckets.items()))]
        lines = ["Buckets (width x height x frames: training samples, regularisation included):"]
        for ((w, h), frames), count in sorted(self.frame_buckets.items()):
            lines.append(f"  {w}x{h} x {frames} frames: {count}" if frames > 1 else f"  {w}x{h}: {count}")
        return lines


def capped(lines: list[str], limit: int = SUMMARY_LIST_LIMIT) -> list[str]:
    """The first `limit` lines, then how many more there are."""
    return lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])


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
        img, _ = resize_and_crop(_read_rgb(item.control), item.bucket, crop="center")
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
    img, corner = resize_and_crop(_read_rgb(item.path), item.bucket, crop=crop, rng=rng)
    if flip:
        img = ImageOps.mirror(img)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()), corner


def _read_rgb(path: Path) -> Image.Image:
    """The image file as RGB, EXIF rotation applied; DatasetError when it cannot be read (any more)."""
    try:
        with _open_image(path) as opened:
            return _to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read {path} any more ({exc}); reload the dataset") from exc


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


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """The image opened, not decoded yet; _Unusable when its header says it has more than MAX_IMAGE_PIXELS."""
    with warnings.catch_warnings():
        # MAX_IMAGE_PIXELS decides; Pillow's warning for images over 89 MP would repeat at every load.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _Unusable(f"too large: {width}x{height} ({width * height / 1e6:.3g} megapixels, the limit is "
                                f"{MAX_IMAGE_PIXELS / 1e6:.3g}); downscale it")
            yield img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent areas become white rather than whatever colour the hidden pixels have."""
    img = to_8bit(img)
    if has_alpha(img) or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


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
) -> Dataset:
    """Scan `folder` (and `reg_folder`) into bucketed, captioned items and a report.

    Videos and frame folders give clip samples of `frames` frames (see video.frame_indices); a control folder (or a
    `control` sub-folder) pairs each training image with an edit model's source image of the same name.
    """
    _check_positive("resolution", *(resolution if isinstance(resolution, (tuple, list)) else (resolution,)))
    _check_positive("min_side", min_side)
    _check_positive("max_side", max_side)
    _check_positive("bucket_step", bucket_step)
    _check_positive("min_image_side", min_image_side)
    _check_positive("default_repeats", default_repeats)
    if max_side < min_side:
        raise DatasetError(f"max_side ({max_side}) must be at least min_side ({min_side})")
    if not 0.0 <= validation_split < 1.0:
        raise DatasetError(f"validation_split must be in [0, 1), got {validation_split}")
    if prior_loss_weight < 0:
        raise DatasetError(f"prior_loss_weight must be 0 or more, got {prior_loss_weight}")
    clip_rule = _clip_rule(frames, frame_extraction, frame_rate, frame_multiple)
    try:
        bucketizer = Bucketizer(resolution, min_side, max_side, bucket_step, no_upscale)
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
    scan = _Scanner(bucketizer, caption_extensions, min_image_side, default_repeats, report, mask_root, alpha_mask,
                    clip_rule, control_root)

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

    report.buckets = dict(sorted(Counter(item.bucket for item in items).items()))
    report.frame_buckets = dict(sorted(Counter((item.bucket, item.frame_count) for item in items).items()))
    report.clip_samples = sum(item.is_clip for item in items + validation)
    report.train_count = len(items) - len(reg)
    report.validation_count = len(validation)
    report.reg_count = len(reg)
    report.samples_per_epoch = sum(item.repeats for item in items)
    return Dataset(items=items, validation=validation, report=report, root=root, reg_empty_prompt=reg_empty_prompt)


@dataclass(frozen=True)
class _ClipRule:
    """How samples are taken from clips (the arguments of video.frame_indices)."""

    frames: int
    extraction: str
    frame_rate: float
    frame_multiple: int


def _clip_rule(frames: int, extraction: str, frame_rate: float, frame_multiple: int) -> _ClipRule:
    """The clip settings, checked before any file is read."""
    _check_positive("frames", frames)
    _check_positive("frame_multiple", frame_multiple)
    if extraction not in EXTRACTIONS:
        raise DatasetError(f"frame_extraction must be one of {', '.join(EXTRACTIONS)}, got {extraction!r}")
    if not frame_rate >= 0:
        raise DatasetError(f"frame_rate must be 0 (each clip's own rate) or more, got {frame_rate}")
    try:
        check_frames(frames, frame_multiple)
    except VideoError as exc:
        raise DatasetError(str(exc)) from None
    return _ClipRule(frames, extraction, float(frame_rate), frame_multiple)


def _control_root(root: Path, control_folder: str | os.PathLike | None) -> Path | None:
    """The control folder as given, else the dataset's `control` sub-folder when there is one, else None."""
    if control_folder is not None and str(control_folder).strip():
        control = _existing_folder(control_folder, "control_folder")
        if control == root:
            raise DatasetError(f"control_folder must be a different folder from folder (both are {root})")
        return control
    auto = root / CONTROL_FOLDER
    return auto if auto.is_dir() and not auto.is_symlink() else None


def _check_positive(name: str, *values: object) -> None:
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DatasetError(f"{name} must be a positive integer, got {value!r}")


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


def _folder_convention(root: Path, directory: Path) -> tuple[int, str] | None:
    """(repeats, tokens) of the nearest folder named 'N_tokens' from `directory` up to `root`, if any."""
    current = directory
    while True:
        match = _REPEATS_FOLDER.match(current.name)
        if match and int(match.group(1)) > 0:
            return int(match.group(1)), " ".join(match.group(2).split())
        if current == root or current.parent == current:
            return None
        current = current.parent


class _Scanner:
    """Turns the files under a folder into items, recording in the report what it found and skipped."""

    def __init__(
        self,
        bucketizer: Bucketizer,
        caption_extensions: tuple[str, ...],
        min_image_side: int,
        default_repeats: int,
        report: DatasetReport,
        mask_root: Path | None = None,
        alpha_mask: bool = False,
        clip_rule: _ClipRule | None = None,
        control_root: Path | None = None,
    ) -> None:
        self.bucketizer = bucketizer
        self.caption_extensions = tuple(e if e.startswith(".") else f".{e}" for e in caption_extensions)
        self.min_image_side = min_image_side
        self.default_repeats = default_repeats
        self.report = report
        self.mask_root, self.alpha_mask = mask_root, alpha_mask
        self.clip_rule = clip_rule or _clip_rule(17, "head", 0.0, 4)
        self.control_root = control_root

    def folder(self, root: Path, *, is_reg: bool, loss_weight: float, exclude: tuple = ()) -> list[DatasetItem]:
        items = []
        for path in _media_files(root, exclude, self.report.skipped, self.caption_extensions):
            if path.suffix.lower() in VIDEO_EXTENSIONS or path.is_dir():
                items.extend(self.clip(root, path, is_reg, loss_weight))
                continue
            item = self.image(root, path, is_reg, loss_weight)
            if item is not None:
                items.append(item)
        self._shared_names(items)
        return items

    def _shared_names(self, items: list[DatasetItem]) -> None:
        """Record images that differ only by extension (a.png, a.jpg): one caption file stands for all of them."""
        by_stem: dict[Path, list[Path]] = defaultdict(list)
        for path in dict.fromkeys(item.path for item in items):  # a clip's samples share one file
            by_stem[path.with_suffix("")].append(path)
        for paths in by_stem.values():
            if len(paths) > 1:
                sidecars = (paths[0].with_suffix(ext) for ext in self.caption_extensions)
                self.report.shared_captions.append((tuple(paths), next((s for s in sidecars if s.is_file()), None)))

    def image(self, root: Path, path: Path, is_reg: bool, loss_weight: float) -> DatasetItem | None:
        found = self._size(path)
        if found is None:
            return None
        size, alpha = found
        try:
            control = self._control(root, path, is_reg)
        except _Unusable as exc:
            return self._skip(path, str(exc))
        item = self._item(root, path, is_reg, loss_weight, size, control)
        item.mask = None if is_reg else self._mask(root, path, alpha, size)
        return item

    def clip(self, root: Path, path: Path, is_reg: bool, loss_weight: float) -> list[DatasetItem]:
        """The samples of a video file or frame folder (none, recorded as skipped, when it cannot be used)."""
        rule = self.clip_rule
        try:
            if path.is_dir():
                info = probe_frame_folder(path, rule.frame_rate, MAX_IMAGE_PIXELS)
            else:
                info = probe(path, MAX_IMAGE_PIXELS)
            if min(info.width, info.height) < self.min_image_side:
                raise _Unusable(f"too small: {info.width}x{info.height} px, both sides must be at least "
                                f"{self.min_image_side} px")
            control = self._control(root, path, is_reg)
        except (VideoError, _Unusable) as exc:
            self._skip(path, str(exc))
            return []
        windows = frame_indices(info.frames, info.fps, rule.frames, rule.extraction, rule.frame_multiple,
                                rule.frame_rate)
        item = self._item(root, path, is_reg, loss_weight, (info.width, info.height), control, clip=True)
        if not is_reg and (self.mask_root is not None or self.alpha_mask):
            self.report.masks_missing.append(path)  # clips take no mask
        name = ("reg: " if is_reg else "") + path.relative_to(root).as_posix()
        self.report.clips.append(ClipEntry(
            name, info.frames, info.fps, rule.frame_rate, len(resampled(info.frames, info.fps, rule.frame_rate)),
            len(windows), len(windows[0]), item.bucket,
        ))
        return [replace(item, frames=window) for window in windows]

    def _item(
        self, root: Path, path: Path, is_reg: bool, loss_weight: float, size: Size, control: Path | None,
        clip: bool = False,
    ) -> DatasetItem:
        """The item of an image or clip file: caption, repeats and bucket; counted in the report."""
        folder = path.parent.relative_to(root).as_posix()
        convention = _folder_convention(root, path.parent)
        repeats, tokens = convention if convention else (self.default_repeats, "")
        caption = self._caption(path, tokens)
        key = f"reg: {folder}" if is_reg else folder
        counts = self.report.clips_per_folder if clip else self.report.images_per_folder
        self.report.images_per_folder.setdefault(key, 0)
        counts[key] = counts.get(key, 0) + 1
        self.report.repeats_per_folder[key] = repeats
        return DatasetItem(
            path=path,
            caption=caption,
            folder=folder,
            repeats=repeats,
            is_reg=is_reg,
            loss_weight=loss_weight,
            size=size,
            bucket=self.bucketizer.assign(*size),
            control=control,
        )

    def _control(self, root: Path, path: Path, is_reg: bool) -> Path | None:
        """The edit source image of a training file (None without a control folder); _Unusable when it has none."""
        if self.control_root is None or is_reg:
            return None
        control = mask_file(path, root, self.control_root)
        if control is None:
            expected = self.control_root / path.relative_to(root).with_suffix("")
            shown = expected.relative_to(root) if expected.is_relative_to(root) else expected
            raise _Unusable(f"no control image: expected {shown.as_posix()}.<png|jpg|webp>")
        try:
            _inspect(control)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise _Unusable(f"control image {control} is not readable ({exc})") from exc
        self.report.control_pairs += 1
        return control

    def _mask(self, root: Path, path: Path, alpha: bool, size: Size) -> Path | str | None:
        """The image's mask (the mask folder's first, then its alpha channel); recorded in the report."""
        if self.mask_root is None and not self.alpha_mask:
            return None
        mask = mask_file(path, root, self.mask_root) if self.mask_root is not None else None
        if mask is not None:
            try:
                check_mask_shape(mask, path, size)
            except ValueError as error:
                raise DatasetError(str(error)) from None
        if mask is None and self.alpha_mask and alpha:
            mask = ALPHA
        if mask is None:
            self.report.masks_missing.append(path)
        else:
            self.report.masks_found += 1
        return mask

    def _size(self, path: Path) -> tuple[Size, bool] | None:
        """The displayed (EXIF-rotated) size and whether it has alpha, or None after recording why it cannot be used."""
        try:
            (width, height), alpha, animated = _inspect(path)
        except _Unusable as exc:
            return self._skip(path, str(exc))
        except Image.DecompressionBombError as exc:
            return self._skip(path, f"too large for Pillow ({exc}); downscale it")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            return self._skip(path, f"not a readable image ({type(exc).__name__}: {exc})")
        if min(width, height) < self.min_image_side:
            return self._skip(
                path, f"too small: {width}x{height} px, both sides must be at least {self.min_image_side} px"
            )
        if animated:
            self.report.animated.append(path)
        return (width, height), alpha

    def _skip(self, path: Path, reason: str) -> None:
        self.report.skipped.append((path, reason))

    def _caption(self, path: Path, tokens: str) -> str:
        """The sidecar caption, else the folder's tokens; counts where it came from in the report."""
        for ext in self.caption_extensions:
            sidecar = _sidecar(path, ext)
            if sidecar.is_dir():
                self.report.caption_errors.append((sidecar, "a folder, not a caption file; rename the folder and put "
                                                   "the caption in a text file of that name"))
                break
            if not sidecar.is_file():
                continue
            try:
                size = sidecar.stat().st_size
                if size > MAX_CAPTION_BYTES:
                    self.report.caption_errors.append((sidecar, f"{size:,} bytes, over the {MAX_CAPTION_BYTES:,} a "
                                                       "caption file may hold; not read: shorten it"))
                    break
                text = sidecar.read_text(encoding="utf-8-sig").strip()
            except (OSError, UnicodeDecodeError) as exc:
                self.report.caption_errors.append((sidecar, f"cannot be read as UTF-8 text ({exc})"))
                break
            if len(text) > MAX_CAPTION_CHARS:
                self.report.captions_cut.append((sidecar, len(text)))
                text = text[:MAX_CAPTION_CHARS].strip()
            if text:
                self.report.captions_found += 1
                return text
            break  # an empty caption file counts as no caption
        if tokens:
            self.report.captions_from_folder += 1
            return tokens
        self.report.captions_missing += 1
        return ""


def _inspect(path: Path) -> tuple[Size, bool, bool]:
    """The displayed (EXIF-rotated) size, whether it has alpha, whether it is animated. Decodes the whole file, so
    a truncated or corrupt one fails here rather than mid-training."""
    if path.stat().st_size == 0:
        raise _Unusable("empty file (0 bytes), perhaps a copy that did not finish; copy it again or remove it")
    with _open_image(path) as img:
        if img.mode not in _USABLE_MODES:
            raise _Unusable(f"unsupported colour mode {img.mode}; save it as an 8-bit RGB PNG or JPEG")
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


def _sidecar(path: Path, ext: str) -> Path:
    """The caption file of an image or video (a.png: a.txt) or of a frame folder (walk/: walk.txt)."""
    return path.with_name(path.name + ext) if path.is_dir() else path.with_suffix(ext)


def _is_frame_folder(folder: Path, caption_extensions: tuple[str, ...]) -> bool:
    """A folder of numbered images only (0001.png ...) with a caption file named after it beside it: one clip."""
    if not any(_sidecar(folder, ext).is_file() for ext in caption_extensions):
        return False
    try:
        names = [name for name in os.listdir(folder) if not name.startswith(".")]
    except OSError:
        return False
    return bool(names) and all(is_frame_name(name) and (folder / name).is_file() for name in names)


def _media_files(
    root: Path, exclude: tuple, skipped: list[tuple[Path, str]], caption_extensions: tuple[str, ...] = ()
) -> list[Path]:
    """Image and video files and frame folders under root in a fixed order; hidden files and folders are left out,
    and folders that cannot be read or are symlinks are recorded in `skipped`."""
    found = []

    def unreadable(error: OSError) -> None:
        reason = f"folder cannot be read ({error.strerror or error}); check its permissions"
        skipped.append((Path(error.filename or root), reason))

    # os.walk does not follow symlinked folders (a link to a parent would loop forever), so say which it left out.
    for directory, subdirs, files in os.walk(root, onerror=unreadable):
        here = Path(directory)
        # Hidden entries are macOS '._' resource forks and tool caches (.ipynb_checkpoints), not pictures.
        visible = sorted(d for d in subdirs if not d.startswith(".") and here / d not in exclude)
        links = [d for d in visible if (here / d).is_symlink()]
        skipped.extend((here / d, _LINKED_FOLDER) for d in links)
        clips = [d for d in visible if d not in links and _is_frame_folder(here / d, caption_extensions)]
        found.extend(here / d for d in clips)  # a frame folder is one clip, its images are not scanned alone
        subdirs[:] = [d for d in visible if d not in links and d not in clips]
        found.extend(here / f for f in files if not f.startswith(".") and f.lower().endswith(MEDIA_EXTENSIONS))
    return sorted(found)
