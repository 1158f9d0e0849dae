"""Randomized SVD paths that test_toolbox's wide, full-rank matrices do not reach: tall matrices (worked on
transposed), exactly low-rank ones (the sketch is rank-deficient, so its orthonormalization falls back
to Householder QR and Ritz directions without energy get zero rows), and the tolerance on a layer-like
difference (fp16 base + planted change)."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def tb(pack):
    return importlib.import_module(f"{pack.__name__}.lora_core.svd")


def planted(m: int, n: int, rank: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q
    return (u * torch.linspace(1.0, 0.1, rank)) @ v.T + noise * torch.randn(m, n, generator=gen) / (m * n) ** 0.25


def kept(d: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    d = d.double()
    return 1 - float((d - up.double() @ down.double()).norm() ** 2 / d.norm() ** 2)


@pytest.mark.parametrize("shape", [(1200, 300), (300, 1200)])
@pytest.mark.parametrize("rank", [8, 32])
def test_tall_and_wide_are_within_the_stated_tolerance(tb, shape, rank):
    d = planted(*shape, rank=48, seed=rank, noise=0.05)
    options = tb.SvdOptions()
    dec, got, note = tb.decompose(d, tb.RankRule(rank), options, seed=3)
    assert dec.method == "randomized" and not note and got == rank
    assert dec.u.shape == (shape[0], dec.s.numel()) and dec.vh.shape == (dec.s.numel(), shape[1])
    s2 = torch.linalg.svdvals(d.double()) ** 2
    optimal = float(s2[:rank].sum() / s2.sum())
    assert optimal - dec.energy(rank) <= min(options.tol, dec.shortfall / dec.total) + 1e-6
    up, down = tb.lora_factors(dec, rank, tuple(d.shape))
    assert abs(kept(d, up, down) - dec.energy(rank)) < 1e-5  # the energy reported is the real one
    assert torch.allclose(dec.vh[:rank] @ dec.vh[:rank].T, torch.eye(rank), atol=1e-4)


@pytest.mark.parametrize("shape", [(200, 500), (500, 200)])
def test_exactly_low_rank_changes_are_recovered_with_finite_factors(tb, shape):
    d = planted(*shape, rank=5, seed=1)  # rank 5 < the 32 columns of the sketch
    dec, rank, note = tb.decompose(d, tb.RankRule(16), tb.SvdOptions(), seed=0)
    assert dec.method == "randomized" and not note
    up, down = tb.lora_factors(dec, rank, tuple(d.shape))
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert kept(d, up, down) > 1 - 1e-6 and dec.energy(rank) > 1 - 1e-6


def test_orthonormalization_of_an_ill_conditioned_block(tb):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=gen)
    x[:, 12:] = x[:, :12] + 1e-7 * torch.randn(400, 12, generator=gen)  # numerically rank 12
    q = tb._orth(x)
    assert torch.allclose(q.T @ q, torch.eye(24), atol=1e-4)
    assert torch.allclose(q[:, :12] @ (q[:, :12].T @ x[:, :12]), x[:, :12], atol=1e-4)


def test_the_energy_every_bound_is_relative_to_is_the_float64_norm(tb):
    """||D||_F^2 of a layer-sized difference with a mean (where float32 running sums drift), in memory order and
    transposed, more than one 1M-element block: within 1e-7 of the float64 sum."""
    d = 1e-3 * torch.randn(2100, 640, generator=torch.Generator().manual_seed(0)) + 3e-4
    exact = float((d.double() ** 2).sum())
    for view in (d, d.T, d[:, :500]):
        assert abs(tb.squared_norm(view) - float((view.double() ** 2).sum())) <= 1e-7 * exact


class ProductsWith(torch.overrides.TorchFunctionMode):
    """Counts the matrix products that read `d` (or a view of it, such as d.T)."""

    def __init__(self, d: torch.Tensor):
        super().__init__()
        self.pointer, self.count = d.data_ptr(), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm") and any(
                isinstance(a, torch.Tensor) and a.data_ptr() == self.pointer for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(640, 640), (2560, 320)], ids=["640x640", "2560x320"])
def test_a_change_the_sketch_holds_is_certified_without_the_checks_products(tb, shape):
    """When the sketch's range keeps all but `tol` of ||D||_F^2, that residual bounds the shortfall (Ky Fan), so the
    range and B = Q^T D are the only products with D; a change with energy outside the range takes the check."""
    low = planted(*shape, rank=48, seed=0, noise=1e-3)  # a merged LoRA: rank 48 under fp16-like noise
    with ProductsWith(low) as products:
        dec, rank, note = tb.decompose(low, tb.RankRule(64), tb.SvdOptions(), seed=0)
    assert dec.method == "randomized" and not note and products.count == 2
    assert dec.shortfall == pytest.approx(dec.total - float((dec.s.double() ** 2).sum()), abs=1e-7 * dec.total)
    s2 = torch.linalg.svdvals(low.double()) ** 2
    assert float(s2[:rank].sum() / s2.sum()) - dec.energy(rank) <= dec.shortfall / dec.total + 1e-7 <= 1e-3

    spread = planted(*shape, rank=48, seed=0, noise=0.05)  # 6-8 % of its energy outside any 80 directions
    with ProductsWith(spread) as products:
        dec, rank, note = tb.decompose(spread, tb.RankRule(32), tb.SvdOptions(), seed=0)
    assert dec.method == "randomized" and not note and products.count >= 4
