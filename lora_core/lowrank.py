"""From a layer's change to a LoRA, the one way merge, extract and resize do it: the change as a dense
matrix or as stacked factors (`change_of`), cut to a rank rule by SVD (`truncate`), made a LoRA with
`LoRA.from_matrices`.

Every result is a kohya LoRA: up = U * S, down = Vh, alpha = rank, so scale = 1 (resize keeps an
input LoRA's scale instead).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .adapters import Adapter, LoRA
from .adapters.base import flat_shape
from .ranks import RankRule
from .reports import LayerStat
from .svd import Decomposition, SvdOptions, decompose, factored_svd, lora_factors

Change = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # D [m, n], or factors up [m, R] and down [R, n] of D


@dataclass
class Truncation:
    """The kept part of a change D [m, n]: up [m, rank] (U * S, clamped when asked) and down [rank, n] (Vh)."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    energy: float  # retained fraction of ||D||_F^2, of the clamped factors when any value was clamped
    dec: Decomposition
    note: str = ""

    def stat(self, name: str) -> LayerStat:
        dec = self.dec
        return LayerStat(name, self.rank, self.energy, dec.total, dec.method, self.note, dec.fell_back)


def truncate(change: Change, rule: RankRule, options: SvdOptions = SvdOptions(), seed: int = 0,
             clamp_quantile: float = 1.0) -> Truncation:
    """The top part of `change` that `rule` keeps, by SVD: exact from factors (never forming D), else
    `decompose` (randomized when it pays, seeded by `seed`). A `clamp_quantile` below 1 clamps up and
    down as kohya's extract does (`clamp_factors`); that needs the dense D, to measure what is kept."""
    if isinstance(change, torch.Tensor):
        dec, rank, note = decompose(change, rule, options, seed)
    else:
        dec = factored_svd(*change)
        rank, note = rule.choose(dec.s, dec.total, dec.nuclear), ""
    up, down = lora_factors(dec, rank, (dec.u.shape[0], dec.vh.shape[1]))
    if clamp_quantile >= 1:
        return Truncation(up, down, rank, dec.energy(rank), dec, note)
    if not isinstance(change, torch.Tensor):
        raise ValueError("truncate: clamping needs the dense change, to measure what the clamped factors keep")
    up, down, clamped = clamp_factors(up, down, clamp_quantile)
    energy = kept_energy(change, up, down, dec.total) if clamped else dec.energy(rank)
    return Truncation(up, down, rank, energy, dec, note)


def change_of(parts: list[tuple[Adapter, float]], shape: tuple[int, ...], device=None) -> Change:
    """sum_i ratio_i * dW_i of adapters of one weight of `shape`, as `truncate` takes it: stacked factors
    (up [out, R] with each scale and ratio folded in, down [R, in * k * k]) when every adapter is a LoRA,
    else the dense float32 sum [out, in * k * k]."""
    if all(isinstance(adapter, LoRA) for adapter, _ in parts):
        factors = [(*scaled_matrices(adapter), ratio) for adapter, ratio in parts]
        up = torch.cat([u * ratio for u, _, ratio in factors], dim=1).to(device)
        down = torch.cat([d for _, d, _ in factors], dim=0).to(device)
        return up, down
    total = torch.zeros(flat_shape(shape), device=device)
    for adapter, ratio in parts:
        with inference(adapter):
            total += ratio * adapter.delta().float().to(device).reshape(total.shape)
    return total


def stacked_lora(pieces: list[tuple[int, str, Adapter]], shape: tuple[int, ...]) -> LoRA:
    """One LoRA of a weight of `shape` from LoRAs of row ranges of it [(first row, name, adapter)] (a diffusers Flux
    LoRA's q, k and v of ComfyUI's fused qkv): up block-diagonal, down stacked, so its dW is exactly each piece's in
    its rows (rank: the sum of theirs). Raises ValueError naming a piece that is no plain LoRA / LoCon."""
    total = 0
    for _, name, adapter in pieces:
        if not isinstance(adapter, LoRA) or adapter.dora_scale is not None:
            kind = "DoRA" if adapter.dora_scale is not None else adapter.algorithm
            raise ValueError(f"{name} is {kind}: only LoRA / LoCon parts of a fused weight are joined exactly")
        total += adapter.rank
    up = torch.zeros(shape[0], total)
    downs, column = [], 0
    for first, _, adapter in sorted(pieces, key=lambda piece: piece[0]):
        piece_up, piece_down = scaled_matrices(adapter)
        up[first:first + piece_up.shape[0], column:column + adapter.rank] = piece_up
        downs.append(piece_down)
        column += adapter.rank
    return LoRA.from_matrices(up, torch.cat(downs), shape)


def scaled_matrices(adapter: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """up [out, r] with the scale alpha / r folded in, down [r, in * k * k] (a Tucker core folded in), float32."""
    with inference(adapter):
        up, down = adapter.matrices(adapter.rank)
    return up.float() * (adapter.alpha / adapter.rank), down.float()


@contextmanager
def inference(adapter: Adapter) -> Iterator[Adapter]:
    """The adapter in eval mode without gradients (every rank, no dropout), its mode restored after."""
    was_training = adapter.training
    adapter.eval()
    try:
        with torch.no_grad():
            yield adapter
    finally:
        adapter.train(was_training)


def refuse_base_dependent(adapter: Adapter, name: str, what: str) -> None:
    """Refuse a module whose change is a function of the base weight (DoRA, OFT, BOFT): `what` cannot keep it."""
    if adapter.dora_scale is not None:
        raise ValueError(
            f"{name}: DoRA module (dora_scale); {what} cannot keep it exact, as DoRA renormalises W + dW "
            "with the base weights. Apply or bake it into the model instead (Merge LoRA, mode 'into model')."
        )
    if adapter.base_dependent:
        raise ValueError(
            f"{name}: {adapter.algorithm.upper()} module; its change is made from the base weight (OFT / BOFT turn "
            f"its rows, GLoRA multiplies it), so it exists only with that weight and {what} cannot take it. Apply "
            "or bake it into the model instead (Merge LoRA, mode 'into model')."
        )


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """kohya's clamp: up and down values limited to the `quantile` of all their absolute values."""
    if quantile >= 1:
        return up, down, 0
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    limit = values.kthvalue(max(1, math.ceil(quantile * values.numel()))).values
    clamped = int((values > limit).sum())
    return up.clamp(-limit, limit), down.clamp(-limit, limit), clamped


def kept_energy(d: torch.Tensor, up: torch.Tensor, down: torch.Tensor, total: float) -> float:
    """1 - ||D - up @ down||_F^2 / ||D||_F^2 without forming up @ down (for factors that are no projection)."""
    if total <= 0:
        return 1.0
    cross = float(((up.T @ d).double() * down.double()).sum())
    own = float(((up.T @ up).double() * (down @ down.T).double()).sum())
    return 1.0 - (total - 2 * cross + own) / total
