"""OFT and BOFT (LyCORIS diag-oft / boft): the weight's output rows turned by a learned orthogonal matrix.

R is block-diagonal (OFT) or a product of butterfly-permuted block-diagonal stages (BOFT); each block is the
Cayley transform (I + Q)(I - Q)^-1 of a skew-symmetric Q = B - B^T, so R = I when the blocks B start at 0.
The changed weight is R^T W (OFT) or the stages applied to W's rows (BOFT), times an optional `rescale` per row.
It depends on W: there is no dW without the base weight, so these adapters are merged into a model, never into
or out of a LoRA. alpha is the constraint ||Q|| <= alpha (0: none), as ComfyUI's loader reads it.

Strength is ComfyUI's (what LoraLoader applies): OFT at s is W + s^2 (R^T W - W); BOFT interpolates each stage
(s R + (1 - s) I) and adds s times the change.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter
from .lokr import factorization


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """(I + Q)(I - Q)^-1 for Q = B - B^T over the last two dims, Q scaled down to ||Q|| = constraint if above."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv((eye - q).float()).to(q.dtype)


def butterfly_splits(dim: int) -> list[tuple[int, int]]:
    """Every (block size b, block count n) with b * n = dim, b even and n a power of two, smallest b first."""
    return [(b, dim // b) for b in range(2, dim + 1, 2) if dim % b == 0 and (dim // b) & (dim // b - 1) == 0]


class OrthogonalAdapter(Adapter):
    """What OFT and BOFT share: Cayley blocks, an optional row rescale, output rotation in bypass."""

    base_dependent = True  # the change is a rotation of W: merging it into or out of a LoRA needs the base weight
    linear_in_strength = False  # ComfyUI: OFT's change times s^2, BOFT's stages interpolated

    def __init__(self, blocks: torch.Tensor, shape, alpha: float = 0.0, rescale: torch.Tensor | None = None,
                 **options):
        super().__init__(shape, alpha, **options)
        self.oft_blocks = nn.Parameter(blocks)
        self.rescale = nn.Parameter(rescale) if rescale is not None else None

    @classmethod
    def options_from(cls, config, index=0):
        refused = [(config.dora, "dora", "ComfyUI applies no DoRA form of OFT / BOFT"),
                   (config.rank_dropout, "rank_dropout", "OFT / BOFT have no ranks to drop"),
                   (config.network_dropout, "network_dropout", "OFT / BOFT turn the output, there is no "
                                                               "adapter activation to drop"),
                   (config.use_tucker, "use_tucker", "OFT / BOFT have no Tucker form")]
        for value, name, why in refused:
            if value:
                raise ValueError(f"{name}: {why}; turn it off for algorithm {cls.algorithm}")
        return {"module_dropout": config.module_dropout}

    def enable_dora(self, weight):
        raise ValueError(f"dora: ComfyUI applies no DoRA form of {self.algorithm.upper()}")

    @property
    def rank(self) -> int:
        """The block size (what LyCORIS' and ComfyUI's trainers take as the rank)."""
        return self.oft_blocks.shape[-1]

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def turn(self, rows: torch.Tensor, strength: float) -> torch.Tensor:
        """`rows` [out, ...] turned by the rotation at `strength` (ComfyUI's form)."""
        raise NotImplementedError

    def rotate_rows(self, rows: torch.Tensor, strength: float) -> torch.Tensor:
        """`rows` turned, then each scaled by its `rescale` where the file has one."""
        turned = self.turn(rows, strength)
        if self.rescale is None:
            return turned
        return turned * self.rescale.reshape(-1, *[1] * (rows.dim() - 1)).to(rows)

    def delta(self):
        raise ValueError(f"{self.algorithm.upper()} has no change without its base weight (it turns the weight's "
                         "rows); merge it into a model instead")

    def add_delta(self, weight, strength):
        """ComfyUI's weight at `strength`: OFT W + s^2 (R^T W - W), BOFT W + s (stages_s(W) - W)."""
        turned = self.rotate_rows(weight.float(), strength)
        return weight + (self.outer(strength) * (turned - weight.float())).to(weight.dtype)

    def outer(self, strength: float) -> float:
        """The factor ComfyUI puts on the change after turning the rows at `strength`."""
        return strength

    def add_output(self, out, x, layer, strength):
        """The layer's output with its rows turned: the rotation acts on the output features (bias excluded)."""
        channels_last = isinstance(layer, nn.Linear)
        bias = getattr(layer, "bias", None)
        plain = out if bias is None else out - _broadcast(bias.to(out), out, channels_last)
        rows = plain if channels_last else plain.movedim(1, -1)
        turned = self.rotate_rows(rows.movedim(-1, 0), strength).movedim(0, -1)
        change = self.outer(strength) * (turned - rows)
        return out + (change if channels_last else change.movedim(-1, 1))

    def factors(self):
        out = {"oft_blocks": self.oft_blocks.detach()}
        if self.rescale is not None:
            out["rescale"] = self.rescale.detach()
        return out

    def shape_error(self, shape):
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or shape[0] != self.out_dim:
            return f"turns {self.out_dim} output rows, the layer is {list(shape)}"
        if self.rescale is not None and self.rescale.numel() != shape[0]:
            return f"rescale has {self.rescale.numel()} values for {shape[0]} output rows"
        return None

    @classmethod
    def read(cls, tensors, shape, ndim: int) -> OrthogonalAdapter | None:
        blocks = tensors.get("oft_blocks")
        if blocks is None or blocks.dim() != ndim:
            return None
        if blocks.shape[-1] != blocks.shape[-2]:
            raise ValueError(f"oft_blocks {list(blocks.shape)}: each block must be square")
        alpha = tensors.get("alpha")
        rescale = tensors.get("rescale")
        adapter = cls(blocks.float(), (0,), float(alpha) if alpha is not None else 0.0,
                      rescale=rescale.float() if rescale is not None else None)
        adapter.shape = tuple(shape) if shape is not None else (adapter.out_dim, 1)
        return adapter


def _broadcast(bias: torch.Tensor, out: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return bias if channels_last else bias.reshape(1, -1, *[1] * (out.dim() - 2))


class OFT(OrthogonalAdapter):
    """oft_blocks [n, b, b]: R = blockdiag of n Cayley blocks, the changed weight R^T W (ComfyUI's einsum)."""

    algorithm = "oft"

    @classmethod
    def create(cls, weight, rank, alpha, **options):
        block_size, blocks = factorization(weight.shape[0], rank)
        return cls(torch.zeros(blocks, block_size, block_size), weight.shape, alpha, **options)

    @property
    def out_dim(self) -> int:
        return self.oft_blocks.shape[0] * self.oft_blocks.shape[1]

    def outer(self, strength):
        return strength * strength  # ComfyUI scales R - I by s, then the change by s again

    def turn(self, rows, strength):
        r = cayley(self.oft_blocks, self.alpha).to(rows.dtype)
        n, b, _ = self.oft_blocks.shape
        return torch.einsum("k n m, k n ... -> k m ...", r, rows.unflatten(0, (n, b))).flatten(0, 1)

    @classmethod
    def from_factors(cls, tensors, shape=None):
        return cls.read(tensors, shape, 3)


class BOFT(OrthogonalAdapter):
    """oft_blocks [m, n, b, b]: m butterfly stages of n Cayley blocks each (m = log2(n) + 1)."""

    algorithm = "boft"

    @classmethod
    def create(cls, weight, rank, alpha, **options):
        dim = weight.shape[0]
        splits = butterfly_splits(dim)
        fitting = [split for split in splits if split[0] <= max(rank, 2)]
        if not fitting:
            raise ValueError(
                f"BOFT splits the {dim} outputs into blocks of an even size <= rank whose count is a power of two; "
                + (f"this layer needs rank {splits[0][0]} or more" if splits else "an odd width cannot be split")
                + " (or use OFT, or exclude the layer)")
        b, n = fitting[-1]  # the largest block the rank allows
        stages = n.bit_length()  # log2(n) + 1
        return cls(torch.zeros(stages, n, b, b), weight.shape, alpha, **options)

    @property
    def out_dim(self) -> int:
        return self.oft_blocks.shape[1] * self.oft_blocks.shape[2]

    def turn(self, rows, strength):
        r = cayley(self.oft_blocks, self.alpha).to(rows.dtype)
        b = self.oft_blocks.shape[-1]
        eye = torch.eye(b, device=rows.device, dtype=rows.dtype)
        turned = rows
        for i, stage in enumerate(r):
            if strength != 1:
                stage = stage * strength + (1 - strength) * eye
            k = 2**i * (b // 2)
            # the butterfly permutation: pairs of rows k apart into one block, then back
            grouped = turned.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            grouped = torch.einsum("b i j, b j ... -> b i ...", stage, grouped)
            turned = grouped.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        return turned

    @classmethod
    def from_factors(cls, tensors, shape=None):
        adapter = cls.read(tensors, shape, 4)
        if adapter is not None and adapter.oft_blocks.shape[0] > adapter.oft_blocks.shape[1].bit_length():
            raise ValueError(f"oft_blocks {list(adapter.oft_blocks.shape)}: more butterfly stages than "
                             f"log2({adapter.oft_blocks.shape[1]}) + 1")
        return adapter
