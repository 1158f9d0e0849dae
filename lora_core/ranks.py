"""How many ranks a truncated change keeps: a fixed rank, or one chosen from the singular values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")


@dataclass(frozen=True)
class RankRule:
    """How many ranks to keep: `rank` (fixed), or chosen by `method` with `param`, capped at `rank`.

    sv_ratio keeps S > S[0] / param; sv_cumulative keeps the fewest S whose sum reaches param of
    sum(S); sv_fro keeps the fewest S with sqrt(sum S^2) >= param * ||dW||_F.
    """

    rank: int
    method: str = "fixed"
    param: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank: must be at least 1, got {self.rank}")
        if self.method not in ("fixed", *DYNAMIC_METHODS):
            raise ValueError(f"dynamic rank method {self.method!r}: choose fixed, {', '.join(DYNAMIC_METHODS)}")
        if self.method == "sv_ratio" and self.param <= 1:
            raise ValueError(f"sv_ratio: param is the largest ratio S[0] / S[i] kept, must be > 1, got {self.param}")
        if self.method in ("sv_cumulative", "sv_fro") and not 0 < self.param <= 1:
            raise ValueError(f"{self.method}: param is a fraction in (0, 1], got {self.param}")

    @property
    def needs_full_spectrum(self) -> bool:
        """sv_cumulative compares with the sum of all singular values, which only a full SVD gives."""
        return self.method == "sv_cumulative"

    def choose(self, s: torch.Tensor, total: float, nuclear: float | None = None) -> int:
        """The rank to keep, given leading singular values `s`, ||dW||_F^2 and (sv_cumulative) sum of all S."""
        limit = min(self.rank, s.numel())
        if limit == 0 or total <= 0:
            return min(1, limit)
        s = s.double()
        if self.method == "fixed":
            r = limit
        elif self.method == "sv_ratio":
            r = int((s > s[0] / self.param).sum())
        elif self.method == "sv_cumulative":
            if nuclear is None:
                raise ValueError("sv_cumulative needs the sum of all singular values (a full SVD)")
            r = _first_reaching(torch.cumsum(s, 0) / nuclear, self.param)
        else:
            r = _first_reaching(torch.cumsum(s * s, 0) / total, self.param**2)
        return max(1, min(r, limit))

    def describe(self) -> str:
        return f"rank {self.rank}" if self.method == "fixed" else f"{self.method} {self.param:g} (max rank {self.rank})"


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    """How many leading terms reach `target` (all of them when none does); rounding slack 1e-9."""
    hits = (fractions >= target - 1e-9).nonzero()
    return int(hits[0]) + 1 if hits.numel() else fractions.numel()
