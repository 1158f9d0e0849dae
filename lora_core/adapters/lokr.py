"""LoKr (LyCORIS): dW = kron(w1, w2) * scale, with w2 optionally low rank (w2_a @ w2_b).

The weight [out, in, *k] is split as out = a * b, in = c * d (`factorization`, as LyCORIS
chooses it); w1 is [a, c] and w2 is [b, d * prod(k)]. Scale is alpha / rank when w2 is
low rank and 1 when both factors are full, which is how ComfyUI and LyCORIS read the file. Rank
FULL_MATRIX_RANK (NetworkConfig's largest) makes every layer's factors full, as a huge dim does in LyCORIS.
With a Tucker core (LyCORIS' use_tucker, kxk convolutions) the low-rank w2 is
tucker(t2 [r, r, k, k], w2_a [r, b], w2_b [r, d]) instead of w2_a [b, r] @ w2_b [r, d * k * k].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, flat_shape, tucker

FULL_MATRIX_RANK = 1024


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split dim = m * n with m <= n, m as close to sqrt(dim) as allowed (m <= factor when factor > 0)."""
    if factor > 0 and dim % factor == 0 and dim >= factor * factor:
        return factor, dim // factor
    limit = dim if factor <= 0 else factor
    best = (1, dim)
    for m in range(1, math.isqrt(dim) + 1):
        if dim % m == 0 and m <= limit:
            best = (m, dim // m)
    return best


class LoKr(Adapter):
    algorithm = "lokr"
    plus_params = ("lokr_w1",)

    def __init__(self, w1, w2=None, w2_a=None, w2_b=None, shape=None, alpha: float | None = None, t2=None,
                 **options):
        rank = w2_b.shape[0] if w2_b is not None else None
        super().__init__(shape, alpha if alpha is not None else (rank or 1.0), **options)
        self.lokr_w1 = nn.Parameter(w1)
        self.lokr_w2 = nn.Parameter(w2) if w2 is not None else None
        self.lokr_w2_a = nn.Parameter(w2_a) if w2_a is not None else None
        self.lokr_w2_b = nn.Parameter(w2_b) if w2_b is not None else None
        self.lokr_t2 = nn.Parameter(t2) if t2 is not None else None

    @classmethod
    def options_from(cls, config, index=0):
        if config.use_tucker:
            # ComfyUI's loader logs an error on lokr_t2 and leaves the layer unchanged (see without_tucker).
            raise ValueError("use_tucker: ComfyUI cannot apply LoKr Tucker factors (lokr_t2); use locon or loha")
        return {**super().options_from(config, index), "factor": config.lokr_factor}

    @classmethod
    def create(cls, weight, rank, alpha, factor: int = -1, full_matrix: bool = False, **options):
        out_dim, in_dim = weight.shape[:2]
        kernel = math.prod(weight.shape[2:])
        a, b = factorization(out_dim, factor)
        c, d = factorization(in_dim, factor)
        w1 = torch.zeros(a, c)  # dW = 0 at step 0; w2 carries the gradient signal into w1
        if full_matrix or rank >= FULL_MATRIX_RANK or rank >= max(b, d * kernel) / 2:
            w2 = torch.empty(b, d * kernel)
            nn.init.kaiming_uniform_(w2, a=math.sqrt(5))
            return cls(w1, w2=w2, shape=weight.shape, alpha=alpha, **options)
        w2_a = torch.empty(b, rank)
        w2_b = torch.empty(rank, d * kernel)
        nn.init.kaiming_uniform_(w2_a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(w2_b, a=math.sqrt(5))
        return cls(w1, w2_a=w2_a, w2_b=w2_b, shape=weight.shape, alpha=alpha, **options)

    @property
    def rank(self) -> int:
        return self.lokr_w2_b.shape[0] if self.lokr_w2_b is not None else min(self.lokr_w2.shape)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.lokr_w2 is None else 1.0

    def kron_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 * scale [a, c] and w2 [b, d * prod(k)]: dW = kron of the two."""
        if self.lokr_w2 is not None:
            w2 = self.lokr_w2
        else:
            w2_a = self.lokr_w2_a
            mask = self.rank_mask(self.rank, w2_a.device)
            if self.lokr_t2 is not None:
                w2_a = w2_a * mask[:, None] if mask is not None else w2_a
                w2 = tucker(self.lokr_t2, w2_a, self.lokr_w2_b).reshape(w2_a.shape[1], -1)
            else:
                w2 = (w2_a * mask if mask is not None else w2_a) @ self.lokr_w2_b
        return self.lokr_w1 * self.scale, w2  # the scale on the small factor

    def delta(self):
        return torch.kron(*self.kron_factors()).reshape(self.shape)

    def delta_output(self, x, layer):
        if not isinstance(layer, nn.Linear):
            return super().delta_output(x, layer)
        # kron(w1, w2) @ x is w1 @ X @ w2^T with x seen as X [c, d]: no [out, in] matrix.
        w1, w2 = (w.to(x.dtype) for w in self.kron_factors())
        grid = self.drop(x).reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        return (w1 @ grid @ w2.T).reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0])

    def factors(self):
        names = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return {n: getattr(self, n).detach() for n in names if getattr(self, n) is not None}

    @classmethod
    def from_factors(cls, tensors, shape=None):
        if "lokr_w1" not in tensors and "lokr_w1_a" not in tensors:
            return None
        alpha = tensors.get("alpha")
        w2, w2_a, w2_b, t2 = (tensors.get(n) for n in ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
        if t2 is not None and (w2 is not None or w2_a is None or w2_b is None):
            raise ValueError("lokr_t2 (Tucker core) needs lokr_w2_a and lokr_w2_b and no lokr_w2")
        if w2 is not None:
            w2 = w2.reshape(w2.shape[0], -1)  # a 4-D conv factor is the same product flattened
        w1 = tensors.get("lokr_w1")
        if w1 is None:
            w1 = tensors["lokr_w1_a"].float() @ tensors["lokr_w1_b"].float()
            if w2 is not None and alpha is not None:  # only w1 is low rank: its alpha / rank is folded in
                w1 = w1 * (float(alpha) / tensors["lokr_w1_b"].shape[0])
                alpha = None
        if t2 is not None:
            natural = (w1.shape[0] * w2_a.shape[1], w1.shape[1] * w2_b.shape[1], *t2.shape[2:])
        else:
            right = w2.shape if w2 is not None else (w2_a.shape[0], w2_b.shape[1])
            natural = (w1.shape[0] * right[0], w1.shape[1] * right[1])
        shape = tuple(shape) if shape is not None and flat_shape(tuple(shape)) == flat_shape(natural) else natural
        w2, w2_a, w2_b, t2 = (t.float() if t is not None else None for t in (w2, w2_a, w2_b, t2))
        adapter = cls(w1.float(), w2, w2_a, w2_b, shape=shape, alpha=float(alpha) if alpha is not None else None,
                      t2=t2)
        if "dora_scale" in tensors:
            adapter.dora_scale = nn.Parameter(tensors["dora_scale"].float())
        return adapter


def without_tucker(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's LoKr tensors with lokr_t2 contracted into a full lokr_w2 (the scale folded into lokr_w1).

    Same dW; the form ComfyUI applies. Its loader builds w2 from lokr_t2 with an einsum whose result
    is not contiguous, which torch.kron rejects: it logs an error and leaves the weight unchanged.
    Tensors without lokr_t2 are returned as they are.
    """
    if "lokr_t2" not in tensors:
        return tensors
    adapter = LoKr.from_factors(tensors)
    with torch.no_grad():
        w2 = tucker(adapter.lokr_t2, adapter.lokr_w2_a, adapter.lokr_w2_b).contiguous()
        out = {"lokr_w1": adapter.lokr_w1 * adapter.scale, "lokr_w2": w2}
    if "dora_scale" in tensors:
        out["dora_scale"] = tensors["dora_scale"]
    return out
