"""What merge, extract and resize report: per-layer rank and retained energy, skipped layers, notes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

Progress = Callable[[int, int], None]  # (layers done, layers in all)


@dataclass
class LayerStat:
    name: str
    rank: int
    energy: float  # retained fraction of ||dW||_F^2
    norm_sq: float  # ||dW||_F^2
    method: str  # full | randomized | factored | concat
    note: str = ""
    fell_back: bool = False  # the randomized SVD failed its accuracy check; a full SVD was made instead

    @property
    def error(self) -> float:
        """Relative Frobenius error ||dW - approx|| / ||dW||."""
        return math.sqrt(max(0.0, 1.0 - self.energy))


@dataclass
class ToolReport:
    """Per-layer ranks and retained energy, skipped layers and notes, printable for a node's STRING output."""

    title: str
    layers: list[LayerStat] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def energy(self) -> float:
        """Overall retained fraction of sum ||dW||_F^2 over all layers."""
        total = sum(layer.norm_sq for layer in self.layers)
        if total <= 0:
            return 1.0
        return sum(layer.energy * layer.norm_sq for layer in self.layers) / total

    @property
    def fell_back(self) -> list[str]:
        """Layers whose randomized SVD failed its accuracy check and were redone with a full SVD."""
        return [layer.name for layer in self.layers if layer.fell_back]

    def layer(self, name: str) -> LayerStat:
        return next(layer for layer in self.layers if layer.name == name)

    def summary(self, max_layers: int = 400) -> str:
        ranks = [layer.rank for layer in self.layers]
        methods = sorted({layer.method for layer in self.layers})
        lines = [
            f"{self.title}: {len(self.layers)} layers, ranks {min(ranks, default=0)}-{max(ranks, default=0)}, "
            f"retained energy {self.energy:.6f} (Frobenius {math.sqrt(self.energy):.6f}), "
            f"SVD {'/'.join(methods) or '-'}, {self.seconds:.1f} s",
        ]
        if self.fell_back:
            lines.append(f"{len(self.fell_back)} layers fell back to a full SVD: " + ", ".join(self.fell_back))
        if self.skipped:
            lines.append(f"{len(self.skipped)} layers skipped: " + ", ".join(self.skipped))
        lines += self.notes
        lines.append("layer  rank  energy  rel.error  method")
        for layer in self.layers[:max_layers]:
            lines.append(f"{layer.name}  {layer.rank}  {layer.energy:.6f}  {layer.error:.2e}  {layer.method}"
                         + (f"  ({layer.note})" if layer.note else ""))
        if len(self.layers) > max_layers:
            lines.append(f"... {len(self.layers) - max_layers} more layers")
        return "\n".join(lines)
