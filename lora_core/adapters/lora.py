"""LoRA (and LoCon on convolutions): dW = up @ down * alpha / rank."""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from .base import Adapter, flat_shape


class LoRA(Adapter):
    """Linear: down [r, in], up [out, r]. Conv kxk (LoCon): down [r, in, k, k], up [out, r, 1, 1]."""

    algorithm = "lora"

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None, **options):
        shape = (up.shape[0], *down.shape[1:])
        super().__init__(shape, alpha if alpha is not None else down.shape[0], **options)
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(up)

    @classmethod
    def create(cls, weight, rank, alpha, **options):
        out_dim, in_dim = weight.shape[:2]
        rank = min(rank, out_dim, math.prod(weight.shape[1:]))
        down = torch.empty(rank, in_dim, *weight.shape[2:], dtype=torch.float32)
        nn.init.kaiming_uniform_(down.view(rank, -1), a=math.sqrt(5))
        up = torch.zeros(out_dim, rank, *[1] * (weight.dim() - 2), dtype=torch.float32)
        return cls(down, up, alpha, **options)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    def delta_at_rank(self, rank: int, scale: float) -> torch.Tensor:
        down = self.lora_down[:rank].reshape(rank, -1)
        up = self.lora_up[:, :rank].reshape(self.shape[0], rank)
        mask = self.rank_mask(rank, down.device)
        if mask is not None:
            down = down * mask[:, None]
        return (up @ down).reshape(self.shape) * scale

    def delta(self):
        return self.delta_at_rank(self.rank, self.alpha / self.rank)

    def factors(self):
        return {"lora_down.weight": self.lora_down.detach(), "lora_up.weight": self.lora_up.detach()}

    @classmethod
    def from_factors(cls, tensors, shape=None):
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is None:  # PEFT / diffusers naming
            down, up = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if down is None or up is None:
            return None
        alpha = tensors.get("alpha")
        adapter = cls(down.float(), up.float(), float(alpha) if alpha is not None else None)
        if "dora_scale" in tensors:
            adapter.dora_scale = nn.Parameter(tensors["dora_scale"].float())
        return adapter


class DyLoRA(LoRA):
    """LoRA trained on nested ranks: each training step uses a random leading rank b <= rank.

    The scale stays alpha / rank for every b, so any leading slice is a usable LoRA on its own;
    `at_rank(r)` exports it with alpha rescaled to keep that scale.
    """

    algorithm = "dylora"

    def __init__(self, down, up, alpha=None, unit: int = 1, seed: int | None = None, **options):
        super().__init__(down, up, alpha, **options)
        self.unit = unit
        self.rng = random.Random(seed)

    @classmethod
    def create(cls, weight, rank, alpha, unit: int = 1, seed: int | None = None, **options):
        base = LoRA.create(weight, rank, alpha)
        return cls(base.lora_down.data, base.lora_up.data, alpha, unit=unit, seed=seed, **options)

    def delta(self):
        rank = self.rank
        if self.training:
            rank = self.rng.randrange(self.unit, self.rank + 1, self.unit)
        return self.delta_at_rank(rank, self.alpha / self.rank)

    def at_rank(self, rank: int) -> LoRA:
        """A plain LoRA made of the leading `rank` rows/columns, with the same effective scale."""
        rank = min(rank, self.rank)
        lora = LoRA(
            self.lora_down.detach()[:rank].clone(),
            self.lora_up.detach()[:, :rank].clone(),
            self.alpha * rank / self.rank,
        )
        if self.dora_scale is not None:
            lora.dora_scale = nn.Parameter(self.dora_scale.detach().clone())
        return lora


def lora_from_delta(delta: torch.Tensor, rank: int) -> LoRA:
    """Best rank-`rank` LoRA of a given weight change (truncated SVD), alpha = rank."""
    out_dim, flat_in = flat_shape(tuple(delta.shape))
    u, s, vh = torch.linalg.svd(delta.reshape(out_dim, flat_in).float(), full_matrices=False)
    rank = min(rank, s.numel())
    up = (u[:, :rank] * s[:rank]).reshape(out_dim, rank, *[1] * (delta.dim() - 2))
    down = vh[:rank].reshape(rank, *delta.shape[1:])
    return LoRA(down.contiguous(), up.contiguous(), float(rank))
