"""What an adapter is: a trainable change to one weight, independent of where it is attached."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input column of a weight (over output and kernel dims), shaped [1, in, 1, ...]."""
    w = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return w.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: W' = m * (W + dW) / ||W + dW||, per input column (LyCORIS' layout, as ComfyUI loads it)."""
    merged = weight + delta
    norm = column_norm(merged) + torch.finfo(weight.dtype).eps
    return merged * (magnitude.to(weight.dtype) / norm)


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker form: core [r1, r2, *k] times a [r1, out] and b [r2, in] is [out, in, *k]."""
    return torch.einsum("m n ..., m o, n i -> o i ...", core, a, b)


def layer_op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's own operation (linear, or convolution with its stride, padding, ...) with `weight`, no bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    return layer._conv_forward(x, weight, None)


def host_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's weight as its forward uses it for `x`: cast by the host (fp8, offloaded, patched) when it casts,
    dequantized where a patched forward holds it in another form (a 4-bit base: its `base.weight_for`)."""
    base = getattr(vars(layer).get("forward"), "base", None)
    if base is not None and hasattr(base, "weight_for"):
        return base.weight_for(x)
    if hasattr(layer, "comfy_cast_weights"):
        import comfy.ops

        weight = comfy.ops.cast_bias_weight(layer, x)[0]
        scale = getattr(layer, "scale_weight", None)  # scaled-fp8 layers apply their scale in the forward
        return weight * scale.to(weight) if scale is not None else weight
    return layer.weight.to(x.dtype)


def stored_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as it computes with it, in fp32, read from storage: scaled-fp8 layers times their scale."""
    weight = layer.weight.detach().float()
    scale = getattr(layer, "scale_weight", None)
    return weight * scale.float() if scale is not None else weight


def flat_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """[out, in, *kernel] as a matrix: (out, in * prod(kernel))."""
    return shape[0], math.prod(shape[1:])


class Adapter(nn.Module):
    """A change dW to one weight of shape `shape`. Subclasses define the factors and `delta()`.

    Called on a weight (ComfyUI's weight-wrapper protocol) it returns W + multiplier * dW, or
    the DoRA composition when a magnitude `dora_scale` is present. `bypass` gives the same layer
    output from the layer's input, leaving the weight untouched (what fp8 and offloaded bases need).
    """

    algorithm = "base"
    plus_params: tuple[str, ...] = ()  # the zero-initialised ("B") side, whose learning rate LoRA+ raises
    base_dependent = False  # True where the change is a function of the base weight (no dW without it)
    linear_in_strength = True  # ComfyUI applies W + s * change: -s reverses +s (what a slider needs)

    def __init__(self, shape, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.alpha = float(alpha)
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.dropout = dropout  # kohya's network_dropout; only the bypass form has activations to drop
        self.multiplier = 1.0
        self.dora_scale: nn.Parameter | None = None
        self._skip = False  # this step's module-dropout draw
        self._masks: dict[int, torch.Tensor] = {}  # this step's rank-dropout masks, by rank

    # --- the things every algorithm defines ----------------------------------------------
    @classmethod
    def create(cls, weight: torch.Tensor, rank: int, alpha: float, **options) -> Adapter:
        """New trainable factors for `weight`, initialised so that dW = 0."""
        raise NotImplementedError

    @classmethod
    def options_from(cls, config, index: int = 0) -> dict:
        """`create`'s options for the `index`-th layer of a network made from `config` (a NetworkConfig).

        Raises ValueError for a setting the algorithm cannot honour; algorithms with options of their
        own add them.
        """
        options = {"rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
                   "dropout": config.network_dropout}
        if config.use_tucker:
            options["use_tucker"] = True
        return options

    def delta(self) -> torch.Tensor:
        """The scaled weight change dW, shaped like the target weight (differentiable)."""
        raise NotImplementedError

    def factors(self) -> dict[str, torch.Tensor]:
        """The tensors saved in a file under `<module name>.<key>` (kohya / LyCORIS key names)."""
        raise NotImplementedError

    @classmethod
    def from_factors(cls, tensors: dict[str, torch.Tensor], shape=None) -> Adapter | None:
        """Rebuild from a file's tensors of one module (keys without the module prefix), or None."""
        raise NotImplementedError

    # --- shared behaviour ------------------------------------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    def at_rank(self, rank: int) -> Adapter:
        """The adapter cut to its leading `rank` ranks where it was trained on nested ranks (DyLoRA); others
        are whole at any rank and are returned as they are."""
        return self

    def enable_dora(self, weight: torch.Tensor) -> None:
        self.dora_scale = nn.Parameter(column_norm(weight.detach().float()))

    def add_delta(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """W + strength * dW; algorithms with a cheaper fused form override it."""
        delta = self.delta().to(weight.dtype)
        return weight + (delta if strength == 1 else delta * strength)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight ComfyUI's loader computes for this adapter's file at strength `multiplier`.

        DoRA at strength s is W + s * (DoRA(W, dW) - W), as ComfyUI's `weight_decompose` applies it.
        """
        if (self.training and self._skip) or self.multiplier == 0:
            return weight
        if self.dora_scale is None:
            return self.add_delta(weight, self.multiplier)
        merged = dora_weight(weight, self.delta().to(weight.dtype), self.dora_scale)
        return merged if self.multiplier == 1 else weight + self.multiplier * (merged - weight)

    def delta_output(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """dW applied to the layer input `x` by the layer's operation; algorithms with a factored form override it."""
        return layer_op(layer, self.drop(x), self.delta().to(x.dtype))

    def bypass(self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output `out` for input `x` with this adapter added, the base weight untouched.

        Equals the output of the layer with the weight `forward` gives. DoRA scales each input column
        by m / ||W + dW||: out + s * (op(x * (c - 1), W) + op(x * c, dW)), by the linearity of the op.
        """
        if (self.training and self._skip) or self.multiplier == 0:
            return out
        if self.dora_scale is None:
            return self.add_output(out, x, layer, self.multiplier)
        weight = host_weight(layer, x)
        merged = weight + self.delta().to(weight.dtype)
        c = self.dora_scale.to(weight.dtype) / (column_norm(merged) + torch.finfo(weight.dtype).eps)
        change = layer_op(layer, x * (c - 1), weight) + self.delta_output(x * c, layer)
        return out + (change if self.multiplier == 1 else change * self.multiplier)

    def add_output(self, out: torch.Tensor, x: torch.Tensor, layer: nn.Module, strength: float) -> torch.Tensor:
        """out + strength * delta_output(x, layer); algorithms with a cheaper fused form override it."""
        change = self.delta_output(x, layer)
        return out + (change if strength == 1 else change * strength)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the adapter's activations while training (kohya's network_dropout)."""
        return F.dropout(x, self.dropout) if self.training and self.dropout else x

    def shape_error(self, shape) -> str | None:
        """Why these factors cannot change a weight of `shape` (they do not fit it, or each other), or None.

        Runs `forward` on the meta device, so it costs nothing and checks exactly what applying does.
        """
        shape = tuple(int(s) for s in shape)
        if flat_shape(self.shape) != flat_shape(shape):
            return f"changes a {list(self.shape)} weight, the layer is {list(shape)}"
        fake = {n: torch.empty(p.shape, device="meta") for n, p in self.named_parameters()}
        try:
            torch.func.functional_call(self, fake, (torch.empty(shape, device="meta"),))
        except RuntimeError:
            sizes = ", ".join(f"{n} {list(p.shape)}" for n, p in self.named_parameters())
            return f"factors do not fit together ({sizes})"
        return None

    def new_step(self) -> None:
        """Draw this step's random choices (module and rank dropout) once.

        A forward recomputed under gradient checkpointing must see the same adapter as the first one.
        """
        self._skip = bool(self.training and self.module_dropout and torch.rand(()) < self.module_dropout)
        self._masks = {}

    def rank_mask(self, rank: int, device) -> torch.Tensor | None:
        """This step's keep-mask over rank dimensions (scaled), when training with rank dropout."""
        if not (self.training and self.rank_dropout):
            return None
        if rank not in self._masks:
            keep = (torch.rand(rank) >= self.rank_dropout).float()
            self._masks[rank] = keep / (1.0 - self.rank_dropout)
        return self._masks[rank].to(device)

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        out = dict(self.factors())
        out["alpha"] = torch.tensor(self.alpha)
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach()
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ComfyUI's ModelPatcher moves weight wrappers with the model and counts their memory.
    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        self.to(device)
        return self.passive_memory_usage()
