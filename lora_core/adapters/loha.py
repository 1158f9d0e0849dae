"""LoHa (LyCORIS): dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank, a Hadamard product of two low-rank terms."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, flat_shape


class LoHa(Adapter):
    """w1a, w2a [out, r]; w1b, w2b [r, in * k * k] (convolutions are flattened)."""

    algorithm = "loha"

    def __init__(self, w1a, w1b, w2a, w2b, shape, alpha: float | None = None, **options):
        super().__init__(shape, alpha if alpha is not None else w1b.shape[0], **options)
        self.hada_w1_a = nn.Parameter(w1a)
        self.hada_w1_b = nn.Parameter(w1b)
        self.hada_w2_a = nn.Parameter(w2a)
        self.hada_w2_b = nn.Parameter(w2b)

    @classmethod
    def create(cls, weight, rank, alpha, **options):
        out_dim, in_dim = flat_shape(tuple(weight.shape))
        rank = min(rank, out_dim, in_dim)
        # w2a = 0 makes dW = 0 while every factor still receives a gradient after one step.
        w1a = torch.randn(out_dim, rank) * 0.1
        w1b = torch.randn(rank, in_dim)
        w2a = torch.zeros(out_dim, rank)
        w2b = torch.randn(rank, in_dim)
        return cls(w1a, w1b, w2a, w2b, weight.shape, alpha, **options)

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    def delta(self):
        w1a, w2a = self.hada_w1_a, self.hada_w2_a
        mask = self.rank_mask(self.rank, w1a.device)
        if mask is not None:
            w1a, w2a = w1a * mask, w2a * mask
        # The scale goes on the small factor: one full-size product fewer, forward and backward.
        diff = ((w1a * (self.alpha / self.rank)) @ self.hada_w1_b) * (w2a @ self.hada_w2_b)
        return diff.reshape(self.shape)

    def factors(self):
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        return {n: getattr(self, n).detach() for n in names}

    @classmethod
    def from_factors(cls, tensors, shape=None):
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not all(n in tensors for n in names):
            return None
        if "hada_t1" in tensors:
            raise NotImplementedError("LoHa with Tucker factors (hada_t1/hada_t2) is not supported yet")
        w1a, w1b, w2a, w2b = (tensors[n].float() for n in names)
        natural = (w1a.shape[0], w1b.shape[1])
        shape = tuple(shape) if shape is not None and flat_shape(tuple(shape)) == natural else natural
        alpha = tensors.get("alpha")
        adapter = cls(w1a, w1b, w2a, w2b, shape, float(alpha) if alpha is not None else None)
        if "dora_scale" in tensors:
            adapter.dora_scale = nn.Parameter(tensors["dora_scale"].float())
        return adapter
