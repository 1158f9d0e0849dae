"""LoHa (LyCORIS): dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank, a Hadamard product of two low-rank terms."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, flat_shape, tucker


class LoHa(Adapter):
    """w1a, w2a [out, r]; w1b, w2b [r, in * k * k] (convolutions are flattened).

    With Tucker cores (LyCORIS' use_tucker, kxk convolutions): t1, t2 [r, r, k, k], w1a, w2a
    [r, out], w1b, w2b [r, in]; each term is tucker(t, wa, wb) instead of wa @ wb.
    """

    algorithm = "loha"
    plus_params = ("hada_w1_a", "hada_w2_a")

    def __init__(self, w1a, w1b, w2a, w2b, shape, alpha: float | None = None, t1=None, t2=None, **options):
        super().__init__(shape, alpha if alpha is not None else w1b.shape[0], **options)
        self.hada_w1_a = nn.Parameter(w1a)
        self.hada_w1_b = nn.Parameter(w1b)
        self.hada_w2_a = nn.Parameter(w2a)
        self.hada_w2_b = nn.Parameter(w2b)
        self.hada_t1 = nn.Parameter(t1) if t1 is not None else None
        self.hada_t2 = nn.Parameter(t2) if t2 is not None else None

    @classmethod
    def create(cls, weight, rank, alpha, use_tucker: bool = False, **options):
        """`use_tucker` gives kxk convolutions Tucker cores; other layers ignore it."""
        out_dim, in_dim = flat_shape(tuple(weight.shape))
        kernel = tuple(weight.shape[2:])
        rank = min(rank, out_dim, in_dim)
        # w2a = 0 makes dW = 0 while every factor still receives a gradient after one step.
        if use_tucker and math.prod(kernel) > 1:
            in_dim = weight.shape[1]
            w1a, w2a = torch.randn(rank, out_dim) * 0.1, torch.zeros(rank, out_dim)
            t1, t2 = torch.randn(rank, rank, *kernel) * 0.1, torch.randn(rank, rank, *kernel) * 0.1
        else:
            w1a, w2a = torch.randn(out_dim, rank) * 0.1, torch.zeros(out_dim, rank)
            t1 = t2 = None
        w1b = torch.randn(rank, in_dim)
        w2b = torch.randn(rank, in_dim)
        return cls(w1a, w1b, w2a, w2b, weight.shape, alpha, t1=t1, t2=t2, **options)

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    def delta(self):
        w1a, w2a = self.hada_w1_a, self.hada_w2_a
        mask = self.rank_mask(self.rank, w1a.device)
        scale = self.alpha / self.rank
        if self.hada_t1 is not None:
            if mask is not None:
                w1a, w2a = w1a * mask[:, None], w2a * mask[:, None]
            diff = tucker(self.hada_t1 * scale, w1a, self.hada_w1_b) * tucker(self.hada_t2, w2a, self.hada_w2_b)
            return diff.reshape(self.shape)
        if mask is not None:
            w1a, w2a = w1a * mask, w2a * mask
        # The scale goes on the small factor: one full-size product fewer, forward and backward.
        diff = ((w1a * scale) @ self.hada_w1_b) * (w2a @ self.hada_w2_b)
        return diff.reshape(self.shape)

    def factors(self):
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
        return {n: getattr(self, n).detach() for n in names if getattr(self, n) is not None}

    @classmethod
    def from_factors(cls, tensors, shape=None):
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not all(n in tensors for n in names):
            return None
        w1a, w1b, w2a, w2b = (tensors[n].float() for n in names)
        t1, t2 = (tensors[n].float() if n in tensors else None for n in ("hada_t1", "hada_t2"))
        if (t1 is None) != (t2 is None):
            raise ValueError("LoHa Tucker factors come in pairs: hada_t1 and hada_t2")
        if t1 is None:
            natural = (w1a.shape[0], w1b.shape[1])
        else:
            natural = (w1a.shape[1], w1b.shape[1], *t1.shape[2:])
        shape = tuple(shape) if shape is not None and flat_shape(tuple(shape)) == flat_shape(natural) else natural
        alpha = tensors.get("alpha")
        adapter = cls(w1a, w1b, w2a, w2b, shape, float(alpha) if alpha is not None else None, t1=t1, t2=t2)
        if "dora_scale" in tensors:
            adapter.dora_scale = nn.Parameter(tensors["dora_scale"].float())
        return adapter
