"""Latents kept on disk next to the images, so a second run on the same data skips the VAE."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ...lora_core.files import AdapterFileError, read_safetensors, write_safetensors
from .dataset import DatasetItem

log = logging.getLogger("lora_foundry")

FOLDER = ".lora_foundry_cache"  # hidden: dataset scans skip it


def vae_fingerprint(vae) -> str:
    """A short id of the VAE's weights."""
    return weights_fingerprint(vae.first_stage_model)


def weights_fingerprint(module, salt: str = "") -> str:
    """A short id of a module's weights (after `salt`): parameter names and shapes plus the values of a few tensors."""
    state = module.state_dict()
    digest = hashlib.sha256(salt.encode())
    names = sorted(state)
    for name in names:
        digest.update(f"{name}:{tuple(state[name].shape)};".encode())
    for name in names[:2] + names[-2:]:
        digest.update(state[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentCache:
    """One safetensors file per (image, bucket, flip, VAE): `<image folder>/.lora_foundry_cache/<stem>-<key>.safetensors`.

    The key covers the image file's size and modification time, so an edited image is encoded again.
    A folder that cannot be written turns the cache off with one warning; training goes on from memory.
    """

    def __init__(self, vae_id: str):
        self.vae_id = vae_id
        self.writable = True

    def path(self, item: DatasetItem, flip: bool) -> Path:
        stat = item.path.stat()
        key = f"{self.vae_id}|{item.path.name}|{stat.st_size}|{stat.st_mtime_ns}|{item.bucket}|{flip}|center"
        if item.frames:  # each sample of a clip has its own latent; still images keep their keys
            key += f"|{item.frames}"
        return item.path.parent / FOLDER / f"{item.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    def load(self, item: DatasetItem, flip: bool) -> torch.Tensor | None:
        """The cached latent, or None when there is none (or it is unreadable, so it will be written again)."""
        path = self.path(item, flip)
        if not path.is_file():
            return None
        try:
            tensors, _ = read_safetensors(path)
            return tensors["latent"]
        except (AdapterFileError, KeyError) as exc:
            log.warning("latent cache: ignoring unreadable %s (%s); encoding the image again", path, exc)
            return None

    def save(self, item: DatasetItem, flip: bool, latent: torch.Tensor) -> None:
        if not self.writable:
            return
        path = self.path(item, flip)
        try:
            write_safetensors({"latent": latent}, path, {"image": item.path.name, "vae": self.vae_id})
        except OSError as exc:
            self.writable = False
            log.warning("latent cache: cannot write %s (%s); latents stay in memory for this run", path.parent, exc)
