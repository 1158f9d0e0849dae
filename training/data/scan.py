"""Scanning a folder into items: kohya's `N_name` folder convention, caption files, masks, control images and clip
samples, recording in the report what was found and what was skipped, and why.

Over 300 lines because the scanner's rules for one file (size, caption, mask, control image, clip samples) change
together with kohya's folder conventions.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from . import images
from .buckets import Bucketizer, Size
from .captions import MAX_CAPTION_BYTES, MAX_CAPTION_CHARS
from .images import UnusableFile, inspect_image
from .items import DatasetError, DatasetItem, check_positive
from .masks import ALPHA, check_mask_shape, mask_file
from .report import ClipEntry, DatasetReport
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
    resampled,
)

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")
LINKED_FOLDER = "symlink to a folder, not followed; copy the folder here, or link its image files one by one"


@dataclass(frozen=True)
class ClipRule:
    """How samples are taken from clips (the arguments of video.frame_indices)."""

    frames: int
    extraction: str
    frame_rate: float
    frame_multiple: int


def clip_rule(frames: int, extraction: str, frame_rate: float, frame_multiple: int) -> ClipRule:
    """The clip settings, checked before any file is read."""
    check_positive("frames", frames)
    check_positive("frame_multiple", frame_multiple)
    if extraction not in EXTRACTIONS:
        raise DatasetError(f"frame_extraction must be one of {', '.join(EXTRACTIONS)}, got {extraction!r}")
    if not frame_rate >= 0:
        raise DatasetError(f"frame_rate must be 0 (each clip's own rate) or more, got {frame_rate}")
    try:
        check_frames(frames, frame_multiple)
    except VideoError as exc:
        raise DatasetError(str(exc)) from None
    return ClipRule(frames, extraction, float(frame_rate), frame_multiple)


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


class Scanner:
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
        clip_rule: ClipRule | None = None,
        control_root: Path | None = None,
    ) -> None:
        self.bucketizer = bucketizer
        self.caption_extensions = tuple(e if e.startswith(".") else f".{e}" for e in caption_extensions)
        self.min_image_side = min_image_side
        self.default_repeats = default_repeats
        self.report = report
        self.mask_root, self.alpha_mask = mask_root, alpha_mask
        self.clip_rule = clip_rule or clip_rule(17, "head", 0.0, 4)
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
        except UnusableFile as exc:
            return self._skip(path, str(exc))
        item = self._item(root, path, is_reg, loss_weight, size, control)
        item.mask = None if is_reg else self._mask(root, path, alpha, size)
        return item

    def clip(self, root: Path, path: Path, is_reg: bool, loss_weight: float) -> list[DatasetItem]:
        """The samples of a video file or frame folder (none, recorded as skipped, when it cannot be used)."""
        rule = self.clip_rule
        try:
            if path.is_dir():
                info = probe_frame_folder(path, rule.frame_rate, images.MAX_IMAGE_PIXELS)
            else:
                info = probe(path, images.MAX_IMAGE_PIXELS)
            if min(info.width, info.height) < self.min_image_side:
                raise UnusableFile(f"too small: {info.width}x{info.height} px, both sides must be at least "
                                f"{self.min_image_side} px")
            control = self._control(root, path, is_reg)
        except (VideoError, UnusableFile) as exc:
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
        """The edit source image of a training file (None without a control folder); UnusableFile when it has none."""
        if self.control_root is None or is_reg:
            return None
        control = mask_file(path, root, self.control_root)
        if control is None:
            expected = self.control_root / path.relative_to(root).with_suffix("")
            shown = expected.relative_to(root) if expected.is_relative_to(root) else expected
            raise UnusableFile(f"no control image: expected {shown.as_posix()}.<png|jpg|webp>")
        try:
            inspect_image(control)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise UnusableFile(f"control image {control} is not readable ({exc})") from exc
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
            (width, height), alpha, animated = inspect_image(path)
        except UnusableFile as exc:
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
        skipped.extend((here / d, LINKED_FOLDER) for d in links)
        clips = [d for d in visible if d not in links and _is_frame_folder(here / d, caption_extensions)]
        found.extend(here / d for d in clips)  # a frame folder is one clip, its images are not scanned alone
        subdirs[:] = [d for d in visible if d not in links and d not in clips]
        found.extend(here / f for f in files if not f.startswith(".") and f.lower().endswith(MEDIA_EXTENSIONS))
    return sorted(found)
