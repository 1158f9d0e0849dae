"""Video clips and folders of numbered frames as training samples: probing, which frames to take, decoding."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # frames of a frame folder, and the dataset's still images
EXTRACTIONS = ("head", "uniform", "chunk")
FRAME_FOLDER_FPS = 16.0  # a frame folder's rate when the dataset's frame_rate is 0 (Wan's training rate)


class VideoError(ValueError):
    """A clip that cannot be used, or frame settings that do not fit; the message says why."""


@dataclass(frozen=True)
class ClipInfo:
    width: int
    height: int
    frames: int
    fps: float


def _av():
    """PyAV, imported at the first video: a dataset of still images needs no video library."""
    try:
        import av
    except ImportError as exc:
        raise VideoError("reading videos needs PyAV (pip install av; ComfyUI installs it)") from exc
    return av


def _read_errors(av) -> tuple[type[BaseException], ...]:
    """What PyAV and the OS raise for a file that is not a readable video (av's InvalidDataError is a ValueError)."""
    return av.FFmpegError, OSError, ValueError, EOFError, IndexError, MemoryError


def probe(path: str | os.PathLike, max_pixels: int | None = None) -> ClipInfo:
    """Size, frame count and rate of a video file; decodes its first frame to prove it is readable."""
    path = Path(path)
    av = _av()
    try:
        if path.stat().st_size == 0:
            raise VideoError("empty file (0 bytes), perhaps a copy that did not finish; copy it again or remove it")
        with av.open(str(path)) as container:
            return _probe_open(container, max_pixels)
    except VideoError:
        raise
    except _read_errors(av) as exc:
        raise VideoError(f"not a readable video ({type(exc).__name__}: {exc})") from exc


def _probe_open(container, max_pixels: int | None) -> ClipInfo:
    if not container.streams.video:
        raise VideoError("no video stream in the file")
    stream = container.streams.video[0]
    check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else FRAME_FOLDER_FPS
    first, count = None, 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
        if first is None:
            first = next(iter(packet.decode()), None)
        elif stream.frames > 0:
            break  # the header's count is trusted: no need to read the rest of the file
    if first is None:
        raise VideoError("no frame could be decoded")
    return ClipInfo(first.width, first.height, stream.frames if stream.frames > 0 else count, fps)


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """VideoError when a frame has more than `max_pixels` pixels (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"too large: {width}x{height} ({width * height / 1e6:.3g} megapixels, the limit is "
                         f"{max_pixels / 1e6:.3g}); downscale it")


def read_frames(path: str | os.PathLike, indices: list[int] | tuple[int, ...]) -> list[Image.Image]:
    """The RGB frames at `indices` (0-based, in that order, repeats allowed), decoding no further than needed."""
    wanted = set(indices)
    found: dict[int, Image.Image] = {}
    decoded = 0
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in wanted:
                    found[index] = frame.to_image().convert("RGB")
                if len(found) == len(wanted):
                    break
    except _read_errors(av) as exc:
        raise VideoError(f"not a readable video ({type(exc).__name__}: {exc})") from exc
    missing = sorted(wanted - set(found))
    if missing:
        raise VideoError(f"has no frame {missing[0]} (it ends after {decoded} frames)")
    return [found[i] for i in indices]


def is_frame_name(name: str) -> bool:
    """A file named only by digits with an image extension (0001.png)."""
    stem, ext = os.path.splitext(name)
    return stem.isdigit() and ext.lower() in IMAGE_EXTENSIONS


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The numbered images of a frame folder in numeric order (2.png before 10.png); hidden files left out."""
    names = [n for n in os.listdir(folder) if not n.startswith(".") and is_frame_name(n)]
    return [Path(folder) / n for n in sorted(names, key=lambda n: (int(os.path.splitext(n)[0]), n))]


def probe_frame_folder(folder: str | os.PathLike, frame_rate: float = 0.0, max_pixels: int | None = None) -> ClipInfo:
    """A frame folder as a clip; its rate is `frame_rate` (the dataset's), or FRAME_FOLDER_FPS (16) when that is 0.

    Only the images' headers are read: every frame must have the first one's size.
    """
    files = frame_files(folder)
    if not files:
        raise VideoError("frame folder without numbered images")
    sizes = {}
    for file in files:
        try:
            with Image.open(file) as img:
                sizes[file] = ImageOps.exif_transpose(img).size if img.getexif().get(0x0112) else img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise VideoError(f"frame {file.name} is not a readable image ({type(exc).__name__}: {exc})") from exc
    width, height = sizes[files[0]]
    check_pixels(width, height, max_pixels)
    odd = next((f for f in files if sizes[f] != (width, height)), None)
    if odd is not None:
        raise VideoError(f"frame {odd.name} is {sizes[odd][0]}x{sizes[odd][1]}, frame {files[0].name} is "
                         f"{width}x{height}: all frames of a clip must have one size")
    return ClipInfo(width, height, len(files), frame_rate if frame_rate > 0 else FRAME_FOLDER_FPS)


def read_frame_folder(folder: str | os.PathLike, indices: list[int] | tuple[int, ...]) -> list[Image.Image]:
    """The RGB images at `indices` of a frame folder (in frame_files' numeric order)."""
    files = frame_files(folder)
    out = []
    for index in indices:
        if index >= len(files):
            raise VideoError(f"has no frame {index} (it has {len(files)})")
        try:
            with Image.open(files[index]) as img:
                out.append(ImageOps.exif_transpose(img).convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise VideoError(f"frame {files[index].name} is not a readable image ({exc})") from exc
    return out


def fit(count: int, frame_multiple: int) -> int:
    """The largest k * frame_multiple + 1 that is at most `count` (at least 1)."""
    return max(0, count - 1) // frame_multiple * frame_multiple + 1


def check_frames(frames: int, frame_multiple: int) -> None:
    """VideoError unless `frames` is k * frame_multiple + 1, naming the two nearest counts that are."""
    if frame_multiple < 1:
        raise VideoError(f"frame_multiple must be at least 1, got {frame_multiple}")
    if frames < 1:
        raise VideoError(f"frames must be at least 1, got {frames}")
    if (frames - 1) % frame_multiple:
        lower = fit(frames, frame_multiple)
        raise VideoError(f"frames {frames} does not fit frame_multiple {frame_multiple}: use {lower} or "
                         f"{lower + frame_multiple}")


def resampled(length: int, fps: float, frame_rate: float) -> list[int]:
    """Source frame of each output frame at `frame_rate` (0: every frame); halves round up."""
    if frame_rate <= 0 or fps <= 0:
        return list(range(length))
    out, step = [], fps / frame_rate
    while (source := math.floor(len(out) * step + 0.5)) < length:
        out.append(source)
    return out


def frame_indices(
    length: int, fps: float, frames: int, extraction: str, frame_multiple: int, frame_rate: float = 0.0
) -> list[tuple[int, ...]]:
    """The source frame indices of each sample a clip of `length` frames gives (see EXTRACTIONS)."""
    check_frames(frames, frame_multiple)
    if extraction not in EXTRACTIONS:
        raise VideoError(f"frame_extraction {extraction!r} is not one of {', '.join(EXTRACTIONS)}")
    source = resampled(length, fps, frame_rate)
    if not source:
        return []
    if extraction == "chunk" and len(source) >= frames:
        return [tuple(source[start:start + frames]) for start in range(0, len(source) - frames + 1, frames)]
    count = min(frames, fit(len(source), frame_multiple))
    if extraction == "uniform":
        return [tuple(source[int(p)] for p in np.linspace(0, len(source) - 1, count).round())]
    return [tuple(source[:count])]
