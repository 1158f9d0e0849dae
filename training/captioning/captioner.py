"""Captioning models from local folders: a WD14 ONNX tagger or a transformers image-to-text model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from .tagger import MODEL_FILE, TAGS_FILE, CaptionModelError, OnnxTagger

__all__ = ["CaptionModelError", "Captioner", "CaptionerSettings", "find_captioners", "load_captioner",
           "model_folder_help"]


class Captioner(Protocol):
    name: str

    def caption(self, image: Image.Image) -> str: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CaptionerSettings:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    prompt: str = ""
    max_new_tokens: int = 48
    device: str = "cpu"


def is_tagger(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file()


def is_transformers(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def find_captioners(bases: list[str | os.PathLike]) -> dict[str, Path]:
    """{name: folder} of the model folders directly inside `bases` (the first base wins a name)."""
    found: dict[str, Path] = {}
    for base in bases:
        base = Path(base)
        if not base.is_dir():
            continue
        for folder in sorted(base.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and (is_tagger(folder) or is_transformers(folder)):
                found.setdefault(folder.name, folder)
    return found


def model_folder_help(bases: list[str | os.PathLike]) -> str:
    """Where models go and what a model folder holds (for the message when none is there)."""
    where = " or ".join(str(Path(b) / "<name>") for b in bases) or "models/captioners/<name>"
    return (f"put a captioning model in its own folder {where}/, holding either a WD14 tagger "
            f"({MODEL_FILE} + {TAGS_FILE}, e.g. from SmilingWolf/wd-vit-tagger-v3) or a transformers "
            "image-to-text model saved with save_pretrained (config.json, *.safetensors weights and the "
            "processor/tokenizer files, e.g. a BLIP or Florence-2 caption model); then refresh the page")


def load_captioner(folder: Path, settings: CaptionerSettings) -> Captioner:
    """The captioner in `folder`, loaded from local files only (nothing is downloaded, no code is run)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionModelError(f"{folder}: no such model folder")
    if is_tagger(folder):
        if not (folder / TAGS_FILE).is_file():
            raise CaptionModelError(f"{folder}: {MODEL_FILE} is there but {TAGS_FILE} is missing; put the model's "
                                    f"tags CSV next to it")
        return OnnxTagger(folder, settings.general_threshold, settings.character_threshold)
    if is_transformers(folder):
        return TransformersCaptioner(folder, settings.prompt, settings.max_new_tokens, settings.device)
    raise CaptionModelError(f"{folder}: neither {MODEL_FILE} + {TAGS_FILE} (WD14 tagger) nor config.json "
                            "(transformers model) is in it")


class TransformersCaptioner:
    """A transformers image-to-text model (BLIP, GIT, Florence-2, ...): one generated sentence per image."""

    def __init__(self, folder: Path, prompt: str = "", max_new_tokens: int = 48, device: str = "cpu"):
        self.folder = Path(folder)
        self.name = self.folder.name
        self.prompt = prompt.strip()
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            # local_files_only: never a download; use_safetensors: never a pickle; no remote code is ever run.
            self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.folder, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=self.dtype)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError, ...)
            hint = ("; models that need trust_remote_code are never run: use a version of the model that "
                    "transformers supports natively" if "trust_remote_code" in str(exc) else "")
            raise CaptionModelError(
                f"{self.folder}: cannot load the transformers captioner ({type(exc).__name__}: {exc}); it needs "
                "config.json, *.safetensors weights and the processor/tokenizer files saved with save_pretrained"
                + hint
            ) from exc
        self.model.to(self.device).eval()

    def caption(self, image: Image.Image) -> str:
        kwargs = {"text": self.prompt} if self.prompt else {}
        try:
            inputs = self.processor(images=image.convert("RGB"), return_tensors="pt", **kwargs)
            inputs = {k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
                      for k, v in inputs.items()}
            with torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            prompt_ids = inputs.get("input_ids")
            # Decoder-only models return the prompt tokens first; keep only what they generated.
            if prompt_ids is not None and ids.shape[1] >= prompt_ids.shape[1] and torch.equal(
                    ids[:, : prompt_ids.shape[1]], prompt_ids):
                ids = ids[:, prompt_ids.shape[1]:]
            text = self.processor.batch_decode(ids, skip_special_tokens=True)[0]
        except Exception as exc:
            raise CaptionModelError(f"{self.folder}: captioning failed ({type(exc).__name__}: {exc})") from exc
        return " ".join(text.split())

    def close(self) -> None:
        self.model = None
        self.processor = None
