"""The latents a run trains and validates on, in the model's space, by dataset item and mirror."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class LatentStore:
    """Latents of the training images (`validation=False`) and the held-out ones, each by item index and flip."""

    def __init__(self):
        self._latents: dict[tuple[bool, int, bool], torch.Tensor] = {}

    def get(self, index: int, flip: bool = False, validation: bool = False) -> torch.Tensor:
        return self._latents[(validation, index, flip)]

    def has(self, index: int, flip: bool = False, validation: bool = False) -> bool:
        return (validation, index, flip) in self._latents

    def put(self, index: int, flip: bool, validation: bool, latent: torch.Tensor) -> None:
        self._latents[(validation, index, flip)] = latent

    def items(self) -> Iterator[tuple[tuple[bool, int, bool], torch.Tensor]]:
        """((validation, index, flip), latent) of every stored latent."""
        return iter(self._latents.items())

    def shape(self) -> torch.Size:
        """The shape of one latent (of the first training image)."""
        return self.get(0).shape

    def __len__(self) -> int:
        return len(self._latents)
