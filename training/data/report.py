"""What a scan found, bucketed and left out, as the summary Load Dataset shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .buckets import Size
from .captions import MAX_CAPTION_CHARS

SUMMARY_LIST_LIMIT = 20  # lines per list in the summary: a report of 10,000 files stays readable


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
    resolutions: tuple[int, ...] = ()  # multi-resolution: every size each image trains at; empty for one

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
        sizes = ([f"Resolutions: {', '.join(map(str, self.resolutions))} (each image bucketed at each: "
                  f"{sum(self.buckets.values())} sized copies of {self.train_count + self.reg_count} images)"]
                 if self.resolutions else [])
        return sizes + self._bucket_table()

    def _bucket_table(self) -> list[str]:
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


