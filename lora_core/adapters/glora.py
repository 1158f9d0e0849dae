"""GLoRA (LyCORIS): dW = (W A + B) * alpha / rank, A = a1 @ a2 acting on the weight's input side, B = b1 @ b2.

The W A term depends on the base weight, so a GLoRA is merged into a model, never into or out of a LoRA.
Files hold the layout ComfyUI reads as current: a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in * k * k]; LyCORIS'
older layout (a1 / a2 and b1 / b2 the other way round) is read as ComfyUI reads it.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, flat_shape, host_weight, layer_op

NAMES = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


class GLoRA(Adapter):
    algorithm = "glora"
    plus_params = ("a2", "b2")  # zero at the start
    base_dependent = True

    def __init__(self, a1, a2, b1, b2, shape, alpha: float | None = None, **options):
        super().__init__(shape, alpha if alpha is not None else a2.shape[0], **options)
        self.a1, self.a2 = nn.Parameter(a1), nn.Parameter(a2)
        self.b1, self.b2 = nn.Parameter(b1), nn.Parameter(b2)

    @classmethod
    def options_from(cls, config, index=0):
        for value, name, why in ((config.dora, "dora", "not offered for GLoRA, whose change already scales the base "
                                                       "weight"),
                                 (config.use_tucker, "use_tucker", "GLoRA has no Tucker form")):
            if value:
                raise ValueError(f"{name}: {why}; turn it off for algorithm glora")
        return super().options_from(config, index)

    @classmethod
    def create(cls, weight, rank, alpha, **options):
        out_dim, flat_in = flat_shape(tuple(weight.shape))
        channels = weight.shape[1]
        rank = min(rank, out_dim, channels)
        if rank == out_dim == channels and rank > 1:
            rank -= 1  # a rank as wide as a square layer reads as LyCORIS' old layout in ComfyUI
        a1 = torch.randn(channels, rank) / channels**0.5
        b1 = torch.randn(out_dim, rank) / out_dim**0.5
        return cls(a1, torch.zeros(rank, channels), b1, torch.zeros(rank, flat_in), weight.shape, alpha, **options)

    @property
    def rank(self) -> int:
        return self.a2.shape[0]

    def enable_dora(self, weight):
        raise ValueError("dora: not offered for GLoRA, whose change already scales the base weight")

    def delta(self):
        raise ValueError("GLoRA has no change without its base weight (W A); merge it into a model instead")

    def scaled(self, strength: float) -> float:
        return strength * self.alpha / self.rank

    def add_delta(self, weight, strength):
        """ComfyUI's weight at `strength`: W + s * alpha / r * (W a1 a2 + b1 b2)."""
        w = weight.float()
        turned = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", w, self.a1),
                              self.a2)
        change = turned + (self.b1 @ self.b2).reshape(w.shape)
        return weight + (self.scaled(strength) * change).to(weight.dtype)

    def add_output(self, out, x, layer, strength):
        """(W A) x = W (A x): the input's channels mixed by A, then the layer's own op with the base weight."""
        channels_last = isinstance(layer, nn.Linear)
        a = (self.a1 @ self.a2).to(x.dtype)  # [in, in]: row i of W A is sum_j W[:, j] A[j, i]
        mixed = x @ a.T if channels_last else torch.einsum("b i ..., j i -> b j ...", x, a)
        change = layer_op(layer, mixed, host_weight(layer, x))
        change = change + layer_op(layer, x, (self.b1 @ self.b2).reshape(self.shape).to(x.dtype))
        return out + self.scaled(strength) * change

    def factors(self):
        return {"a1.weight": self.a1.detach(), "a2.weight": self.a2.detach(),
                "b1.weight": self.b1.detach(), "b2.weight": self.b2.detach()}

    @classmethod
    def from_factors(cls, tensors, shape=None):
        if not all(n in tensors for n in NAMES):
            return None
        a1, a2, b1, b2 = (tensors[n].float() for n in NAMES)
        # ComfyUI's reading of the two layouts, on the stored shapes: old where only the old one fits, or both
        # fit and the layer is square with a rank as wide as it
        old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
        new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
        if old and (not new or (shape is not None and a2.shape[0] == shape[0] == shape[1])):
            a1, a2, b1, b2 = a2, a1, b2, b1  # old: W a2 a1 + b2 b1
        a1, a2, b1, b2 = (t.flatten(1) for t in (a1, a2, b1, b2))
        if not (a1.shape[1] == a2.shape[0] == b1.shape[1] == b2.shape[0] and a1.shape[0] == a2.shape[1]):
            raise ValueError(f"GLoRA factors do not fit together (a1 {list(a1.shape)}, a2 {list(a2.shape)}, "
                             f"b1 {list(b1.shape)}, b2 {list(b2.shape)})")
        natural = (b1.shape[0], b2.shape[1])
        shape = tuple(shape) if shape is not None and flat_shape(tuple(shape)) == natural else natural
        alpha = tensors.get("alpha")
        return cls(a1, a2, b1, b2, shape, float(alpha) if alpha is not None else None)

    def shape_error(self, shape):
        shape = tuple(int(s) for s in shape)
        if flat_shape(self.shape) != flat_shape(shape) or len(shape) < 2 or shape[1] != self.a1.shape[0]:
            return f"changes a {list(self.shape)} weight (a1 over {self.a1.shape[0]} inputs), the layer is {list(shape)}"
        return None
