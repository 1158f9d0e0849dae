"""The pass before the loop: the dataset encoded once into the model's spaces (latents and their mirrors, loss masks,
the image conditioning edit and image-to-video models take) and the fixed captions' conditioning."""

from __future__ import annotations

import torch

from ..data.dataset import Dataset
from ..data.latent_cache import LatentCache, vae_fingerprint
from ..data.latent_store import LatentStore
from ..data.masks import LossMasks
from .config import TrainConfig
from .image_inputs import REFERENCE, START_FRAME, reference_values, start_frame_values
from .text import TextConditioning


class EncodedData:
    """Latents, masks and image conditioning of the training and held-out images, by item index and mirror."""

    def __init__(self, dataset: Dataset, model, vae, config: TrainConfig):
        self.dataset, self.model, self.vae, self.config = dataset, model, vae, config
        self.latents = LatentStore()
        self.masks = LossMasks(config.mask_floor)
        self.image_input: str | None = None  # the image the model is conditioned on besides the caption
        self.image_values: dict[tuple[bool, int, bool], dict] = {}  # its conditioning values by (held out, item, flip)
        self._disk_cache: LatentCache | None = None

    def encode(self, text: TextConditioning) -> None:
        """Everything the loop reads: images, control images, masks, and the captions that never change."""
        dataset = self.dataset
        self.encode_images(dataset.items)
        self.encode_images(dataset.validation, validation=True)
        self.encode_control(dataset.items)
        self.encode_control(dataset.validation, validation=True)
        self.masks.encode(dataset.items, self.latents, self.flips(False))
        self.masks.encode(dataset.validation, self.latents, self.flips(True), validation=True)
        text.encode_fixed(dataset.items, dataset.validation)

    def encode_images(self, items, validation: bool = False, batch: int = 16) -> None:
        """Encode every image (and its mirror when flipping) once, in the model's latent space.

        Images of one bucket go through the VAE together: each host encode call has a fixed cost.
        A video VAE reads a batch of images as the frames of one clip, so there each image is
        encoded alone, as a one-frame clip.
        With the disk cache, latents found next to the images are read instead, and new ones written.
        """
        disk = self.disk_cache()
        flips = self.flips(validation)
        if getattr(self.vae, "latent_dim", 2) == 3:
            batch = 1
        todo: dict[tuple, list[tuple[int, bool]]] = {}
        for index, item in enumerate(items):
            for flip in flips:
                if self.latents.has(index, flip, validation):
                    continue
                # A start-frame model's conditioning comes from the pixels: they are read (and encoded) anyway.
                cached = disk.load(item, flip) if disk and self.image_input != START_FRAME else None
                if cached is not None:
                    self.latents.put(index, flip, validation, self.model.model.process_latent_in(cached).float()[0])
                else:
                    todo.setdefault((tuple(item.bucket), flip), []).append(index)
        import comfy.model_management as mm

        for (_, flip), indices in todo.items():
            for start in range(0, len(indices), batch):
                mm.throw_exception_if_processing_interrupted()  # Cancel: what was cached so far stays, whole
                chunk = indices[start:start + batch]
                pixels = torch.stack([self.dataset.load_image(items[i], crop="center", flip=flip) for i in chunk])
                if pixels.dim() == 5:  # one clip [1, T, H, W, 3]: the video VAE reads the frames as its batch
                    pixels = pixels[0]
                with torch.no_grad():
                    raw = self.vae.encode(pixels[..., :3]).float().cpu()
                    latents = self.model.model.process_latent_in(raw).float()
                    if self.image_input == START_FRAME:
                        self.image_values[(validation, chunk[0], flip)] = start_frame_values(self.vae, pixels)
                for index, latent, raw_latent in zip(chunk, latents, raw, strict=True):
                    self.latents.put(index, flip, validation, latent)
                    if disk:
                        disk.save(items[index], flip, raw_latent.unsqueeze(0))

    def encode_control(self, items, validation: bool = False) -> None:
        """The edit model's source image of every item (mirrored with it), as ReferenceLatent conditions on it."""
        if self.image_input != REFERENCE:
            return
        import comfy.model_management as mm

        for index, item in enumerate(items):
            for flip in self.flips(validation):
                mm.throw_exception_if_processing_interrupted()
                with torch.no_grad():
                    values = reference_values(self.vae, self.dataset.load_control(item, flip=flip))
                self.image_values[(validation, index, flip)] = values

    def sample_values(self, indices: list[int], flips: list[bool], validation: bool = False) -> list[dict]:
        """The image conditioning values of each sample (empty for a model conditioned on text alone)."""
        if self.image_input is None:
            return [{} for _ in indices]
        return [self.image_values[(validation, i, flip)] for i, flip in zip(indices, flips, strict=True)]

    def flips(self, validation: bool) -> tuple[bool, ...]:
        return (False, True) if self.config.flip and not validation else (False,)

    def disk_cache(self) -> LatentCache | None:
        if self.config.latent_cache != "disk":
            return None
        if self._disk_cache is None:
            self._disk_cache = LatentCache(vae_fingerprint(self.vae))
        return self._disk_cache
