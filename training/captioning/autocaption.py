"""Captioning a dataset's images: read the sidecars, run a model where asked, edit, and write sidecars safely.

Existing caption files are replaced only with write="overwrite existing"; a file that cannot be read is
never written; every write is atomic, so a cancel or a crash leaves each file either old or new.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageOps

from ...lora_core.files import write_text_atomic
from ..data.captions import split_tags, tag_frequency
from ..data.dataset import Dataset
from ..data.images import to_rgb
from ..data.items import DatasetItem
from .captioner import Captioner, CaptionModelError
from .edit import EditOptions, edit_caption

MODES = ("caption missing", "keep existing", "re-caption all")
WRITES = ("new files only", "none", "overwrite existing")
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass
class Sidecar:
    path: Path
    text: str = ""  # "" when the file is missing, empty or unreadable
    exists: bool = False
    error: str = ""  # why an existing file could not be read


def read_sidecar(image: Path, extension: str = ".txt") -> Sidecar:
    path = image.with_suffix(extension)
    if not path.exists():
        return Sidecar(path)
    try:
        return Sidecar(path, path.read_text(encoding="utf-8-sig").strip(), exists=True)
    except (OSError, UnicodeDecodeError) as exc:
        return Sidecar(path, exists=True, error=f"cannot be read as UTF-8 text ({type(exc).__name__}: {exc})")


def open_image(path: Path) -> Image.Image:
    """The image as displayed (EXIF-rotated) in RGB, transparency on white."""
    with Image.open(path) as opened:
        return to_rgb(ImageOps.exif_transpose(opened))


def wants_model(sidecar: Sidecar, mode: str) -> bool:
    return mode == "re-caption all" or (mode == "caption missing" and not sidecar.text)


@dataclass
class CaptionResult:
    image: Path
    folder: str
    caption: str
    source: str  # "file", "model", "dataset" (folder name or the loaded caption) or "none"
    written: str = ""  # "new", "replaced" or ""
    problem: str = ""


@dataclass
class CaptionRun:
    mode: str
    write: str
    model: str = ""
    results: list[CaptionResult] = field(default_factory=list)

    def captions(self) -> dict[Path, str]:
        return {r.image: r.caption for r in self.results}

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Tag counts per dataset folder: the shape of kohya's ss_tag_frequency."""
        by_folder: dict[str, list[str]] = defaultdict(list)
        for r in self.results:
            by_folder[r.folder].append(r.caption)
        return tag_frequency(by_folder)

    def listing(self, root: Path | None = None) -> str:
        """One `image: caption` line per image (paths relative to root when given)."""
        def name(path: Path) -> str:
            return path.relative_to(root).as_posix() if root and path.is_relative_to(root) else str(path)

        return "\n".join(f"{name(r.image)}: {r.caption}" for r in self.results)

    def summary(self, top: int = 40) -> str:
        """What was captioned how, what was written, what went wrong, and the most frequent tags."""
        sources = Counter(r.source for r in self.results)
        written = Counter(r.written for r in self.results if r.written)
        model = f" with {self.model}" if self.model else ""
        lines = [
            f"{len(self.results)} images{model} (mode: {self.mode}; caption files: {self.write})",
            f"Captions: {sources['file']} from caption files, {sources['model']} by the model, "
            f"{sources['dataset']} from the dataset (folder names), {sources['none']} without caption",
            f"Caption files: {written['new']} written new, {written['replaced']} replaced",
        ]
        missing = [r.image for r in self.results if not r.caption]
        lines.append(f"Images without caption ({len(missing)})" + (":" if missing else ""))
        lines.extend(f"  {path}" for path in missing)
        problems = [r for r in self.results if r.problem]
        lines.append(f"Problems ({len(problems)})" + (":" if problems else ""))
        lines.extend(f"  {r.problem}" for r in problems)
        counts = Counter(tag for r in self.results for tag in split_tags(r.caption))
        lines.append(f"Tag frequency ({len(counts)} tags" + (f", top {top}):" if len(counts) > top else "):"))
        lines.extend(f"  {n:5d}  {tag}" for tag, n in counts.most_common(top))
        return "\n".join(lines)


def needs_model(items: Iterable[DatasetItem], mode: str, extension: str = ".txt") -> bool:
    """Whether any item would be captioned by the model (so it is only loaded when it is used)."""
    return mode != "keep existing" and any(wants_model(read_sidecar(i.path, extension), mode) for i in items)


def caption_items(
    items: list[DatasetItem],
    mode: str,
    write: str,
    edit: EditOptions,
    extension: str = ".txt",
    captioner: Captioner | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
) -> CaptionRun:
    """Caption `items` one by one; check_cancel may raise between images, leaving what was written intact."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if write not in WRITES:
        raise ValueError(f"write must be one of {WRITES}, got {write!r}")
    extension = extension if extension.startswith(".") else "." + extension
    run = CaptionRun(mode, write, captioner.name if captioner else "")
    for done, item in enumerate(items, 1):
        if check_cancel:
            check_cancel()
        sidecar = read_sidecar(item.path, extension)
        result = _caption_one(item, sidecar, mode, edit, captioner, run)
        if not result.problem:
            _write(result, sidecar, write)
        run.results.append(result)
        if on_progress:
            on_progress(done, len(items))
    return run


def _caption_one(item: DatasetItem, sidecar: Sidecar, mode: str, edit: EditOptions,
                 captioner: Captioner | None, run: CaptionRun) -> CaptionResult:
    problem = f"{sidecar.path}: {sidecar.error}; left as it is" if sidecar.error else ""
    if sidecar.text:
        raw, source = sidecar.text, "file"
    elif item.caption:
        raw, source = item.caption, "dataset"
    else:
        raw, source = "", "none"
    if wants_model(sidecar, mode):
        if captioner is None:
            raise CaptionModelError(f"mode {mode!r} needs a captioning model for {item.path}; pick one")
        try:
            image = open_image(item.path)
        except _IMAGE_ERRORS as exc:
            problem = f"{item.path}: not a readable image ({type(exc).__name__}: {exc}); no caption written"
        else:
            try:
                raw, source = captioner.caption(image), "model"
            except CaptionModelError as exc:
                written = sum(1 for r in run.results if r.written)
                raise CaptionModelError(f"{exc} (on {item.path}; {written} caption files were written before "
                                        "it and are kept)") from exc
    caption = edit_caption(raw, edit)
    return CaptionResult(item.path, item.folder, caption, source if caption else "none", problem=problem)


def _write(result: CaptionResult, sidecar: Sidecar, write: str) -> None:
    """Write the caption if the policy allows it; record why not when a write fails."""
    if write == "none" or not result.caption or result.caption == sidecar.text:
        return
    replacing = bool(sidecar.text)
    if replacing and write != "overwrite existing":
        return
    try:
        # An empty file holds nothing to lose; any other file is only replaced when asked.
        write_text_atomic(result.caption + "\n", sidecar.path, overwrite=sidecar.exists)
    except FileExistsError:
        result.problem = f"{sidecar.path}: appeared while captioning; left as it is"
        return
    except OSError as exc:
        result.problem = f"{sidecar.path}: cannot be written ({type(exc).__name__}: {exc})"
        return
    result.written = "replaced" if replacing else "new"


def with_captions(dataset: Dataset, captions: dict[Path, str]) -> Dataset:
    """A copy of `dataset` whose items carry `captions` (items not in it keep theirs); the input is unchanged."""
    def update(items: list[DatasetItem]) -> list[DatasetItem]:
        return [replace(i, caption=captions[i.path]) if i.path in captions else i for i in items]

    return replace(dataset, items=update(dataset.items), validation=update(dataset.validation))
