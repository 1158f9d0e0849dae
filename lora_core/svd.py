"""SVDs of a layer's change D: full, randomized (subspace iteration with an accuracy check, a full SVD
when the check fails) and exact from LoRA factors; and the top-rank part as kohya factors.

Retained energy is ||approx||_F^2 / ||D||_F^2 (= 1 - relative error^2): the fraction of the change's
squared Frobenius norm that the kept part has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ranks import RankRule

SVD_METHODS = ("randomized", "full")
# Columns of the random block, at least. The products with D read all of it whatever the block's width (they are
# bound by memory, not arithmetic), and a wider block needs fewer passes to pass the accuracy check: measured on
# SDXL-shaped layers (bench_svd_shapes.py), 64 columns and no pass before the first check were the fastest at rank
# 16 (640x640 4.1 ms vs 7.4 with 32 columns and two passes) and 80 (rank 64 + 16) at rank 64.
MIN_BLOCK = 64
MKL_MIN_COLUMNS = 16  # products with fewer columns take a slow path in MKL (3-15x slower than 16 columns)


@dataclass(frozen=True)
class SvdOptions:
    """Randomized SVD: subspace iteration with `oversample` extra columns and `power_iters` passes.

    After it, a cheap bound on how much of ||dW||_F^2 the kept part may lack compared with an
    exact SVD (see `_shortfall`). While the bound exceeds `tol` * ||dW||_F^2, one more pass is
    made, up to `max_power_iters`; then that layer is redone with a full SVD.
    """

    method: str = "randomized"
    oversample: int = 16  # 8 takes up to twice the passes on slowly decaying spectra, for less than half the cost
    power_iters: int = 0  # passes before the first check; the check asks for more where the spectrum needs them
    max_power_iters: int = 8
    tol: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.method not in SVD_METHODS:
            raise ValueError(f"svd method {self.method!r}: choose {' or '.join(SVD_METHODS)}")
        if not 0 <= self.power_iters <= self.max_power_iters:
            raise ValueError("power_iters must be between 0 and max_power_iters")


@dataclass
class Decomposition:
    """Leading singular triplets of a matrix D [m, n], with what is known about the rest."""

    u: torch.Tensor  # [m, k]
    s: torch.Tensor  # [k], descending
    vh: torch.Tensor  # [k, n]
    total: float  # ||D||_F^2
    nuclear: float | None  # sum of all singular values, when every one was computed
    method: str  # full | randomized | factored
    shortfall: float = 0.0  # randomized: bound on how much less of ||D||_F^2 the kept part has than an exact SVD's
    fell_back: bool = False  # a full SVD made because a randomized one failed its accuracy check

    def energy(self, rank: int) -> float:
        """Fraction of ||D||_F^2 that the top-`rank` part keeps."""
        if self.total <= 0:
            return 1.0
        return min(1.0, float((self.s[:rank].double() ** 2).sum()) / self.total)


def squared_norm(d: torch.Tensor) -> float:
    """||D||_F^2: each 1M-element block's squares summed by torch's pairwise (cascade) sum (within 3e-8 of a
    float64 sum on SDXL layer shapes); the blocks' sums in float64. (A float64 copy of each block, as before, took
    2.5x as long: at 5120x640 a quarter of a randomized SVD's time.)"""
    if d.dim() == 2 and not d.is_contiguous() and d.T.is_contiguous():
        d = d.T  # the same norm, read in memory order: flattening the transposed view copied D (47 ms at 10240x1280)
    total = 0.0
    for block in d.reshape(-1).split(1 << 20):
        total += float((block * block).sum())
    return total


def full_svd(d: torch.Tensor) -> Decomposition:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    s64 = s.double()
    return Decomposition(u, s, vh, squared_norm(d), float(s64.sum()), "full")


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> Decomposition:
    """Exact SVD of up @ down ([m, R] @ [R, n]) from QRs of the thin factors: O((m + n) R^2), never m x n."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    s64 = s.double()
    return Decomposition(qu @ uc, s, vch @ qd.T, float((s64**2).sum()), float(s64.sum()), "factored")


def block_size(rule: RankRule, options: SvdOptions) -> int:
    return max(rule.rank + options.oversample, MIN_BLOCK)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X in float64 (exact enough for a Cholesky factor or a spectral norm of a float32 X)."""
    x = x.double()
    return x.T @ x


def _norm2_sq(x: torch.Tensor) -> float:
    """||X||_2^2 as the largest eigenvalue of X^T X (X has few columns): one product, no SVD of a long X."""
    return max(0.0, float(torch.linalg.eigvalsh(_gram(x))[-1]))


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of X's columns by CholeskyQR2 (float64 Gram, two passes), Householder QR when X is
    too ill-conditioned for it. Householder QR of a long, thin X makes many small threaded calls: on a busy
    2-core machine 250 ms for 10240 x 32, where this takes 80 ms (1-3 ms each on an idle core)."""
    q = x / x.norm(dim=0).clamp_min(1e-30)  # scaled columns: only their span counts, and cond(X) drops
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(_gram(q), upper=True)
        diag = r.diagonal()
        if info or not bool(diag.min() > 1e-6 * diag.max()):
            return torch.linalg.qr(x).Q
        q = torch.linalg.solve_triangular(r.to(x.dtype), q, upper=True, left=False)
    return q if bool((diag - 1).abs().max() < 1e-2) else torch.linalg.qr(x).Q


def _outside_norm_sq(d: torch.Tensor, kept: torch.Tensor, image: torch.Tensor) -> float:
    """Estimate of ||(I - K K^T) D||_2^2 (K = `kept`, orthonormal) by block power iteration: `image` is
    D D^T X for an orthonormal start X outside K (the caller had it from its own products), then one more
    step. A lower estimate, close when X holds the next singular vectors."""
    x = _orth(image - kept @ (kept.T @ image))
    return _norm2_sq(d.T @ x)


def _shortfall(d, q, b, z, zw, u, ub, s2, rank: int, residual: float, oversample: int) -> float:
    """Bound on sum_{i <= rank} (sigma_i^2 - S_i^2): how much less of ||D||_F^2 the top-`rank` Ritz
    part (Ritz vectors u = Q ub of the range of Q, b = Q^T D, z = D D^T Q) keeps than the exact top-`rank`
    SVD part. zw = D D^T W for a few random orthonormal columns W outside Q (they join the power estimate).

    Split M = D D^T on U_r (the top-r Ritz vectors) and the rest: the diagonal blocks are diag(S_i^2)
    and G with ||G|| = g = ||(I - U_r U_r^T) D||_2^2 >= S_{r+1}^2, the coupling is E = (I - P) D D^T U_r
    (P = Q Q^T; the rest of Q does not couple to Ritz vectors). Per i, with gap S_i^2 - g > 0, the
    quadratic residual bound of Li & Li (2005) gives 2 ||E||^2 / (gap + sqrt(gap^2 + 4 ||E||^2)), and
    Weyl ||E||; always, Weyl on the split at Q gives ||(I - P) D||_2^2 <= g. Ky Fan caps the sum at
    ||(I - P) D||_F^2 (`residual`). g is a power estimate with a 2 % margin: the one part that is not a proof.
    """
    if residual <= 0 or rank == 0:
        return 0.0
    top = ub[:, :rank]
    coupling = z @ top - q @ ((b @ b.T) @ top)  # (I - P) D D^T U_r
    e2 = _norm2_sq(coupling)
    next_value = float(s2[rank]) if rank < s2.numel() else 0.0
    image = torch.cat([z @ ub[:, rank:rank + oversample], zw], dim=1)  # D D^T [next Ritz vectors, W]
    g = max(next_value, 1.02 * _outside_norm_sq(d, u[:, :rank], image))
    gaps = s2[:rank] - g
    li = 2 * e2 / (gaps + torch.sqrt(gaps * gaps + 4 * e2)).clamp_min(1e-300)
    per_value = torch.where(gaps > 0, li.clamp_max(min(math.sqrt(e2), g)), torch.full_like(gaps, g))
    return min(float(per_value.sum()), residual)


def _ritz(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B = Q^T D [k, n] from the eigenvectors of B B^T in float64 (k x k): (b, ub, s^2, vh).

    S is the norm of each row ub_i^T B and vh its direction (zero for a zero row), so U S Vh is the
    projection Q ub ub^T B exactly and sum S^2 its energy, also for directions B barely has."""
    bd = b.double()
    _, ub = torch.linalg.eigh(bd @ bd.T)
    rows = ub.flip(1).T @ bd
    s2 = (rows * rows).sum(1)
    order = s2.argsort(descending=True)
    s2, rows, ub = s2[order], rows[order], ub.flip(1)[:, order]
    s = s2.sqrt()
    vh = torch.where(s[:, None] > 0, rows / s.clamp_min(1e-300)[:, None], 0.0)
    return b, ub.to(b.dtype), s2, vh.to(b.dtype)


def randomized_svd(d: torch.Tensor, rule: RankRule, options: SvdOptions, seed: int = 0) -> tuple[Decomposition, int]:
    """Top rule.rank + oversample triplets of D by subspace iteration, iterated until the kept part is
    within options.tol of an exact SVD's energy or max_power_iters is reached: (decomposition, rank kept).

    Works on the orientation whose short side holds the basis (D^T when D is tall), so each pass is two
    products with D and one orthonormalization of a short block; the check's product D D^T Q is the
    next pass's, so a failed check costs little more than that pass."""
    if d.shape[0] > d.shape[1]:
        dec, rank = randomized_svd(d.T, rule, options, seed)
        return Decomposition(dec.vh.T, dec.s, dec.u.T, dec.total, None, dec.method, dec.shortfall), rank
    gen = torch.Generator().manual_seed(seed)
    total = squared_norm(d)
    q = _orth(d @ torch.randn(d.shape[1], block_size(rule, options), generator=gen).to(d))
    for _ in range(options.power_iters):
        q = _orth(d @ (d.T @ q))
    done = options.power_iters
    extra = max(2, MKL_MIN_COLUMNS - options.oversample)  # the probe W: a few columns riding along in each product
    while True:
        w = torch.randn(d.shape[0], extra, generator=gen).to(d)
        w = _orth(w - q @ (q.T @ w))
        bw = torch.cat([q, w], dim=1).T @ d  # [Q^T D; W^T D]: the random probe rides along the products
        b, ub, s2, vh = _ritz(bw[:-extra])
        s = s2.sqrt().to(d.dtype)
        u = q @ ub
        rank = rule.choose(s, total)
        residual = max(0.0, total - float(s2.sum()))  # ||(I - P) D||_F^2, exact: P D keeps sum S^2
        if residual <= options.tol * total:
            # Ky Fan: the top part lacks at most what Q misses, so this is the bound, without the check's products
            return Decomposition(u, s, vh, total, None, "randomized", residual), rank
        zw = d @ bw.T  # D D^T [Q, W]
        z = zw[:, :-extra]
        shortfall = _shortfall(d, q, b, z, zw[:, -extra:], u, ub, s2, rank, residual, options.oversample)
        if shortfall <= options.tol * total or done >= options.max_power_iters:
            return Decomposition(u, s, vh, total, None, "randomized", shortfall), rank
        q = _orth(z)
        done += 1


def decompose(d: torch.Tensor, rule: RankRule, options: SvdOptions, seed: int = 0) -> tuple[Decomposition, int, str]:
    """SVD of a dense change D [m, n] for `rule`: (decomposition, rank kept, note). Randomized when it
    pays and the rule allows it, with a full SVD (dec.fell_back, and a note saying why) when its accuracy
    bound stays above options.tol."""
    d = d.float()
    if options.method == "full" or rule.needs_full_spectrum or 3 * block_size(rule, options) > min(d.shape):
        dec = full_svd(d)
        return dec, rule.choose(dec.s, dec.total, dec.nuclear), ""
    dec, rank = randomized_svd(d, rule, options, seed)
    if dec.shortfall <= options.tol * dec.total:
        return dec, rank, ""
    bound = dec.shortfall / dec.total
    dec = full_svd(d)
    dec.fell_back = True
    return dec, rule.choose(dec.s, dec.total, dec.nuclear), f"randomized bound {bound:.1e} > tol, used full SVD"


def lora_factors(dec: Decomposition, rank: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya factors of the top-`rank` part: up = U * S [out, r(, 1, 1)], down = Vh [r, in(, k, k)]."""
    up = (dec.u[:, :rank] * dec.s[:rank]).reshape(shape[0], rank, *[1] * (len(shape) - 2))
    down = dec.vh[:rank].reshape(rank, *shape[1:])
    return up.contiguous(), down.contiguous()

