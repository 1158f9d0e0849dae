"""A WD14-style image tagger: an ONNX model plus its selected_tags.csv, run with onnxruntime."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
# Danbooru tag categories as the WD14 CSV numbers them; anything else counts as general.
RATING, CHARACTER = 9, 4
_LETTER_PAIR = re.compile(r"[^\W\d_]{2}")


class CaptionModelError(ValueError):
    """A captioning model that cannot be loaded or run; the message names the file and what to do."""


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def readable_tag(name: str) -> str:
    """Underscores become spaces, except in kaomoji such as `^_^` or `o_o` (no two letters in a row)."""
    return name.replace("_", " ") if _LETTER_PAIR.search(name) else name


def read_tags(path: Path) -> list[Tag]:
    """The tags of a WD14 selected_tags.csv (columns name and category), in model output order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        tags = [Tag(readable_tag(row["name"].strip()), int(row["category"])) for row in rows]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CaptionModelError(
            f"{path}: not a readable WD14 tags file ({type(exc).__name__}: {exc}); it needs a header with "
            "'name' and 'category' columns and one row per model output"
        ) from exc
    if not tags:
        raise CaptionModelError(f"{path}: no tags in the file")
    return tags


def _session(model_path: Path):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise CaptionModelError(
            f"{model_path}: WD14 taggers need onnxruntime; install it into ComfyUI's Python "
            "(`python -m pip install onnxruntime`, or onnxruntime-gpu for CUDA) and restart ComfyUI"
        ) from exc
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for broken files
        raise CaptionModelError(
            f"{model_path}: not a loadable ONNX model ({type(exc).__name__}: {exc}); download it again"
        ) from exc


class OnnxTagger:
    """Tags an image; general and character tags above their thresholds, rating tags never."""

    def __init__(self, folder: Path, general_threshold: float = 0.35, character_threshold: float = 0.85):
        self.folder = Path(folder)
        self.name = self.folder.name
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.tags = read_tags(self.folder / TAGS_FILE)
        self.session = _session(self.folder / MODEL_FILE)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.channels_first, self.size = _layout(model_input.shape, self.folder / MODEL_FILE)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags):
            raise CaptionModelError(
                f"{self.folder}: {MODEL_FILE} gives {outputs[-1]} scores but {TAGS_FILE} lists {len(self.tags)} tags; "
                "use the CSV that came with the model"
            )

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """WD14 input: padded to a white square, resized, BGR, float 0-255, batch of one."""
        image = image.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        array = np.asarray(square, dtype=np.float32)[:, :, ::-1]
        if self.channels_first:
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array[None])

    def scores(self, image: Image.Image) -> dict[str, float]:
        """Every tag's score for `image`, rating tags included."""
        return {tag.name: float(s) for tag, s in zip(self.tags, self._scores(image), strict=True)}

    def _scores(self, image: Image.Image) -> np.ndarray:
        try:
            (out, *_) = self.session.run(None, {self.input_name: self.preprocess(image)})
        except Exception as exc:  # onnxruntime's own exception types
            raise CaptionModelError(f"{self.folder / MODEL_FILE}: inference failed ({type(exc).__name__}: {exc})") from exc
        scores = np.asarray(out, dtype=np.float32).reshape(-1)
        if scores.size != len(self.tags):
            raise CaptionModelError(
                f"{self.folder}: {MODEL_FILE} gave {scores.size} scores for the {len(self.tags)} tags of {TAGS_FILE}"
            )
        return scores

    def caption(self, image: Image.Image) -> str:
        """Character tags, then general tags, each by falling score."""
        scores = self._scores(image)
        chosen = []
        for character, threshold in ((True, self.character_threshold), (False, self.general_threshold)):
            found = [(float(score), tag.name) for tag, score in zip(self.tags, scores, strict=True)
                     if tag.category != RATING and (tag.category == CHARACTER) == character and score > threshold]
            chosen.extend(name for _, name in sorted(found, key=lambda pair: -pair[0]))
        return ", ".join(dict.fromkeys(chosen))

    def close(self) -> None:
        self.session = None


def _layout(shape, model_path: Path) -> tuple[bool, int]:
    """(channels first?, side) from the model's input shape: [N, H, W, 3] (WD14) or [N, 3, H, W]."""
    dims = list(shape)
    if len(dims) == 4 and dims[3] == 3 and isinstance(dims[1], int) and dims[1] == dims[2]:
        return False, dims[1]
    if len(dims) == 4 and dims[1] == 3 and isinstance(dims[2], int) and dims[2] == dims[3]:
        return True, dims[2]
    raise CaptionModelError(
        f"{model_path}: input shape {dims} is not a square RGB image ([batch, size, size, 3] or [batch, 3, size, size])"
    )
