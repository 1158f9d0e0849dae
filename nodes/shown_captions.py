"""Caption edits from the Caption Images node: each run's shown images, and the one caption file a save may write."""

from __future__ import annotations

import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..lora_core.files import write_text_atomic

MAX_RUNS = 64  # runs remembered; an older run's token is refused with a "run the node again"
MAX_CAPTION = 10_000  # characters


class CaptionEditError(ValueError):
    """A request the registry refuses; `field` names the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class CaptionedRun:
    root: Path  # resolved dataset folder
    extension: str  # ".txt"
    images: frozenset[str]  # paths relative to root, posix, as shown on the node


class CaptionEdits:
    """Run token -> the images a Caption Images run showed; writes the caption file of one of them."""

    def __init__(self):
        self._runs: OrderedDict[str, CaptionedRun] = OrderedDict()
        self._lock = threading.Lock()
        self.generation = 0  # saves so far: the node's fingerprint, so a saved edit reaches the next run

    def register(self, root: Path, extension: str, images: list[Path]) -> tuple[str, dict[Path, str]]:
        """Remember a run's shown images (those inside root); returns (token, {image: its name relative to root})."""
        root = Path(root).resolve()
        names = {image: image.relative_to(root).as_posix() for image in images if image.is_relative_to(root)}
        token = secrets.token_hex(16)
        with self._lock:
            self._runs[token] = CaptionedRun(root, extension, frozenset(names.values()))
            while len(self._runs) > MAX_RUNS:
                self._runs.popitem(last=False)
        return token, names

    def save(self, token: object, image: object, caption: object) -> str:
        """Write `caption` (exactly) as the caption file of a shown image; returns its name relative to the root."""
        with self._lock:
            run = self._runs.get(token) if isinstance(token, str) else None
        if run is None:
            raise CaptionEditError("token", "unknown Caption Images run (the server restarted or it is too old); "
                                   "run the node again")
        name = _image_name(image)
        if name not in run.images:
            raise CaptionEditError("image", f"{name!r} is not one of the {len(run.images)} images this run showed")
        _check_caption(caption)
        path = _sidecar(run, name)
        write_text_atomic(caption, path)
        with self._lock:
            self.generation += 1
        return path.relative_to(run.root).as_posix()


def _image_name(image: object) -> str:
    if not isinstance(image, str) or not image:
        raise CaptionEditError("image", "give the image's path relative to the dataset folder, as a string")
    if "\0" in image:
        raise CaptionEditError("image", "contains a NUL byte")
    if os.path.isabs(image) or image.startswith(("/", "\\")) or "\\" in image:
        raise CaptionEditError("image", f"{image!r}: absolute paths and backslashes are not allowed")
    if ".." in PurePosixPath(image).parts:
        raise CaptionEditError("image", f"{image!r}: '..' is not allowed")
    return image


def _check_caption(caption: object) -> None:
    if not isinstance(caption, str):
        raise CaptionEditError("caption", f"must be a string, not {type(caption).__name__}")
    if len(caption) > MAX_CAPTION:
        raise CaptionEditError("caption", f"{len(caption)} characters; at most {MAX_CAPTION}")
    if "\0" in caption:
        raise CaptionEditError("caption", "contains a NUL byte")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON can send one) has no UTF-8 form
        raise CaptionEditError("caption", f"character {e.start} ({caption[e.start]!a}) is half of a UTF-16 pair, "
                               "which no text file can hold; type the character again") from None


def _sidecar(run: CaptionedRun, name: str) -> Path:
    """The image's caption file, its folder resolved; refused when a symlink leads it out of the root."""
    relative = PurePosixPath(name).with_suffix(run.extension)
    folder = (run.root / relative.parent).resolve()
    path = folder / relative.name
    if not folder.is_relative_to(run.root) or not path.resolve().is_relative_to(run.root):
        raise CaptionEditError("image", f"{name!r}: its caption file leads out of {run.root} (a symlink)")
    return path


CAPTION_EDITS = CaptionEdits()
