"""Text-encoder outputs kept on disk beside the latents, so a second run on the same captions encodes nothing (and
never loads the text encoder)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ...lora_core.files import AdapterFileError, read_safetensors, write_safetensors
from .latent_cache import FOLDER, weights_fingerprint

log = logging.getLogger("lora_foundry")


def encoder_fingerprint(clip) -> str | None:
    """A short id of what the text encoders compute: their class, layer, weight names and shapes and a few values.
    None when the CLIP carries patches (a LoRA on it, a changed layer): its outputs are then not cached on disk."""
    if clip.patcher.patches or clip.patcher.object_patches:
        return None
    model = clip.cond_stage_model
    return weights_fingerprint(model, f"{type(model).__name__}|{getattr(clip, 'layer_idx', None)}|")


class TextCache:
    """One safetensors file per (caption, text encoders): `<dataset>/.lora_foundry_cache/text/<key>.safetensors` (a
    folder of their own: the images at the dataset's top level keep their latents in `.lora_foundry_cache`).

    Holds the host conditioning ([[cond, {pooled_output, ...}]]): tensors by position, the other values as JSON. A
    folder that cannot be written turns the cache off with one warning; the run goes on from memory.
    """

    def __init__(self, folder: Path, encoder_id: str):
        self.folder, self.encoder_id = folder / FOLDER / "text", encoder_id
        self.writable = True

    def path(self, caption: str) -> Path:
        key = hashlib.sha256(f"{self.encoder_id}|{caption}".encode()).hexdigest()[:20]
        return self.folder / f"{key}.safetensors"

    def load(self, caption: str) -> list | None:
        """The cached conditioning, or None (none yet, or unreadable: it is encoded and written again)."""
        path = self.path(caption)
        if not path.is_file():
            return None
        try:
            tensors, metadata = read_safetensors(path)
            if metadata.get("caption") != caption:
                return None
            layout = json.loads(metadata["layout"])
            return [[tensors[f"{i}.cond"], {k: tensors[f"{i}.{k}"] if k in tensors_of else others[k]
                                             for k in tensors_of + list(others)}]
                    for i, (tensors_of, others) in enumerate(layout)]
        except (AdapterFileError, KeyError, ValueError) as exc:
            log.warning("text cache: ignoring unreadable %s (%s); encoding the caption again", path, exc)
            return None

    def save(self, caption: str, conditioning: list) -> None:
        if not self.writable:
            return
        tensors, layout = {}, []
        for i, (cond, extras) in enumerate(conditioning):
            tensors[f"{i}.cond"] = cond.contiguous()
            named = [k for k, v in extras.items() if torch.is_tensor(v)]
            tensors.update({f"{i}.{k}": extras[k].contiguous() for k in named})
            others = {k: v for k, v in extras.items() if not torch.is_tensor(v)}
            layout.append([named, others])
        try:
            metadata = {"caption": caption, "encoders": self.encoder_id, "layout": json.dumps(layout)}
        except TypeError:
            return  # a value JSON cannot hold: this caption stays in memory only
        path = self.path(caption)
        try:
            write_safetensors(tensors, path, metadata)
        except OSError as exc:
            self.writable = False
            log.warning("text cache: cannot write %s (%s); text-encoder outputs stay in memory for this run",
                        path.parent, exc)
