"""LoRA (and LoCon on convolutions): dW = up @ down * alpha / rank."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, flat_shape

CONV_OPS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRA(Adapter):
    """Linear: down [r, in], up [out, r]. Conv kxk (LoCon): down [r, in, k, k], up [out, r, 1, 1].

    LoCon with a Tucker core (LyCORIS' use_tucker): down [r, in, 1, 1], mid [r, r, k, k] and
    up [out, r, 1, 1], the chain of convs 1x1 -> kxk -> 1x1; dW = up @ (mid . down).
    """

    algorithm = "lora"
    plus_params = ("lora_up", "lora_B")  # lora_B: PEFT's name for lora_up

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None,
                 mid: torch.Tensor | None = None, **options):
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} have different ranks")
        if mid is not None and (tuple(mid.shape[:2]) != (down.shape[0],) * 2 or math.prod(down.shape[2:]) != 1):
            raise ValueError(f"lora_mid {list(mid.shape)} does not fit lora_down {list(down.shape)} "
                             f"(Tucker LoCon: down [r, in, 1, 1], mid [r, r, k, k])")
        kernel = down.shape[2:] if mid is None else mid.shape[2:]
        super().__init__((up.shape[0], down.shape[1], *kernel), alpha if alpha is not None else down.shape[0], **options)
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(up)
        self.lora_mid = nn.Parameter(mid) if mid is not None else None

    @classmethod
    def create(cls, weight, rank, alpha, use_tucker: bool = False, **options):
        """`use_tucker` gives kxk convolutions a Tucker core (1x1 down, kxk mid); other layers ignore it."""
        out_dim, in_dim = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        rank = min(rank, out_dim, math.prod(weight.shape[1:]))
        mid = None
        if use_tucker and math.prod(kernel) > 1:
            down = torch.empty(rank, in_dim, *[1] * len(kernel), dtype=torch.float32)
            mid = torch.empty(rank, rank, *kernel, dtype=torch.float32)
            nn.init.kaiming_uniform_(mid, a=math.sqrt(5))
        else:
            down = torch.empty(rank, in_dim, *kernel, dtype=torch.float32)
        nn.init.kaiming_uniform_(down.view(rank, -1), a=math.sqrt(5))
        up = torch.zeros(out_dim, rank, *[1] * len(kernel), dtype=torch.float32)
        return cls(down, up, alpha, mid=mid, **options)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    def step_rank(self) -> int:
        """How many leading ranks this step uses (all of them; DyLoRA samples one)."""
        return self.rank

    def matrices(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """up [out, rank] and down [rank, in * k * k] (rank dropout applied when training)."""
        if rank == self.rank and self.lora_down.dim() == 2 and not (self.training and self.rank_dropout):
            return self.lora_up, self.lora_down  # a Linear's whole factors: nothing to slice, reshape or mask
        down = self.lora_down[:rank].reshape(rank, -1)
        if self.lora_mid is not None:  # the core makes the 1x1 down a kxk one
            down = torch.einsum("m n ..., n i -> m i ...", self.lora_mid[:rank, :rank], down).reshape(rank, -1)
        up = self.lora_up[:, :rank].reshape(self.shape[0], rank)
        mask = self.rank_mask(rank, down.device)
        if mask is not None:
            down = down * mask[:, None]
        return up, down

    def delta_at_rank(self, rank: int, scale: float) -> torch.Tensor:
        up, down = self.matrices(rank)
        return (up @ down).reshape(self.shape) * scale

    def delta(self):
        return self.delta_at_rank(self.step_rank(), self.alpha / self.rank)

    def add_delta(self, weight, strength):
        # One fused W + s * up @ down (addmm): no full-size dW or scaling pass, forward or backward.
        up, down = self.matrices(self.step_rank())
        flat = weight.reshape(self.shape[0], -1)
        merged = torch.addmm(flat, up.to(weight.dtype), down.to(weight.dtype), alpha=strength * self.alpha / self.rank)
        return merged.reshape(weight.shape)

    def add_output(self, out, x, layer, strength):
        # Linear: out + s * (x down^T) up^T as one addmm (scale and sum fused): per layer and step, two
        # operators fewer forward and backward than scaling up and adding the change apart.
        if not isinstance(layer, nn.Linear):
            return super().add_output(out, x, layer, strength)
        rank = self.step_rank()
        up, down = self.matrices(rank)
        hidden = self.drop(F.linear(x, down.to(x.dtype)))
        summed = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, rank).to(out.dtype),
                             up.to(out.dtype).t(), alpha=strength * self.alpha / self.rank)
        return summed.view(out.shape)

    def delta_output(self, x, layer):
        # x -> down -> (network dropout, as kohya) -> up: no [out, in] matrix, forward or backward.
        rank = self.step_rank()
        up, down = self.matrices(rank)
        up = up * (self.alpha / self.rank)
        if isinstance(layer, nn.Linear):
            return F.linear(self.drop(F.linear(x, down.to(x.dtype))), up.to(x.dtype))
        if layer.groups != 1:
            return super().delta_output(x, layer)
        kernel = self.shape[2:]
        hidden = layer._conv_forward(x, down.reshape(rank, self.shape[1], *kernel).to(x.dtype), None)
        return CONV_OPS[len(kernel)](self.drop(hidden), up.reshape(*up.shape, *[1] * len(kernel)).to(x.dtype))

    def factors(self):
        out = {"lora_down.weight": self.lora_down.detach(), "lora_up.weight": self.lora_up.detach()}
        if self.lora_mid is not None:
            out["lora_mid.weight"] = self.lora_mid.detach()
        return out

    @classmethod
    def from_factors(cls, tensors, shape=None):
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is None:  # PEFT / diffusers naming
            down, up = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if down is None or up is None:
            return None
        mid = tensors.get("lora_mid.weight")
        rank = down.shape[0]
        if mid is None and shape is not None and flat_shape(tuple(shape)) == (up.shape[0], down[0].numel()) and up.numel() == shape[0] * rank:
            # Flattened factors (PEFT, ComfyUI's trainer) for a convolution: the kohya layout.
            down = down.reshape(rank, *shape[1:])
            up = up.reshape(shape[0], rank, *[1] * (len(shape) - 2))
        alpha = tensors.get("alpha")
        adapter = cls(down.float(), up.float(), float(alpha) if alpha is not None else None,
                      mid=mid.float() if mid is not None else None)
        if "dora_scale" in tensors:
            adapter.dora_scale = nn.Parameter(tensors["dora_scale"].float())
        return adapter

    @classmethod
    def from_matrices(cls, up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], scale: float = 1.0) -> LoRA:
        """The LoRA with dW = up @ down [out, r] @ [r, in * k * k] for a weight of `shape`, whose scale
        alpha / r is `scale` (folded out of up): kohya's layout, down [r, in(, k, k)] and up [out, r(, 1, 1)]."""
        rank = up.shape[1]
        up = up.reshape(shape[0], rank, *[1] * (len(shape) - 2))
        down = down.reshape(rank, *shape[1:])
        return cls(down.contiguous(), (up / scale if scale != 1 else up).contiguous(), scale * rank)


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
        self._rank = self.rank

    @classmethod
    def options_from(cls, config, index=0):
        if config.use_tucker:
            raise ValueError("use_tucker: DyLoRA has no Tucker form; use locon or loha")
        # Each layer draws its ranks from its own generator, seeded by its place in the network.
        return {**super().options_from(config, index), "unit": config.dylora_unit, "seed": config.seed + index}

    @classmethod
    def create(cls, weight, rank, alpha, unit: int = 1, seed: int | None = None, **options):
        base = LoRA.create(weight, rank, alpha)
        return cls(base.lora_down.data, base.lora_up.data, alpha, unit=unit, seed=seed, **options)

    def new_step(self) -> None:
        super().new_step()
        self._rank = self.rng.randrange(self.unit, self.rank + 1, self.unit)

    def step_rank(self) -> int:
        """The leading rank drawn for this step (the same in a recomputed forward); all of them in eval."""
        return self._rank if self.training else self.rank

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

