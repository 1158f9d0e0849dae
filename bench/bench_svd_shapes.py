"""Per-shape micro-benchmark (a script, not a test): svd.decompose vs torch.linalg.svd on SDXL layer shapes.

    .venv/bin/python bench/bench_svd_shapes.py [--ranks 16,32,64] [--repeats 2] [--threads 2] [--smoke]

Each matrix is a layer difference as bench_extract.py makes it: a random fp16 base (N(0, 0.02)) and a
tuned copy with a planted rank-48 change (singular values 1 -> 0.1, 5 % of the weights' std), so fp16
rounding adds a full-rank floor. Per matrix, the full SVD and ours at each rank run back to back, so
load from other processes hits both alike; each
runs --tries times and the fastest run counts. Gap: the largest energy ours lacks vs the optimal truncation. Overall: per-shape times weighted by
SDXL's layer counts (depth 2), as bench_extract.py's totals are.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_core.ranks import RankRule  # noqa: E402
from lora_core.svd import SvdOptions, decompose  # noqa: E402

# SDXL's kohya-preset layer shapes (out x in) and how many layers have each at bench_extract.py's default
# depth 2 of the 1280-wide level: the weights of the overall speed-up.
SDXL_DEPTH2 = {(640, 640): 70, (640, 2048): 20, (5120, 640): 10, (640, 2560): 10,
               (1280, 1280): 84, (1280, 2048): 24, (10240, 1280): 12, (1280, 5120): 12}
PLANTED_RANK = 48


def layer_difference(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(m, n, generator=gen)).half()
    rank = min(PLANTED_RANK, m, n)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q
    delta = (u * torch.linspace(1.0, 0.1, rank)) @ v.T
    delta *= 0.05 * 0.02 / delta.std()
    return (base.float() + delta).half().float() - base.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--repeats", type=int, default=2, help="matrices per shape")
    parser.add_argument("--tries", type=int, default=2, help="runs of each method per matrix; the fastest counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="", help="e.g. 5120x640,1280x1280 (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run through every part of the script, for CI (seconds; its figures mean "
                             "nothing)")
    args = parser.parse_args()
    if args.smoke:
        args.ranks, args.repeats, args.tries, args.shapes, args.threads = "8,16", 1, 1, "96x64,64x160", 1
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else list(SDXL_DEPTH2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds per matrix, speed-up = full / ours")
    print(f"{'shape':>11} | {'full s':>7} | " + " | ".join(f"{f'r{r} s':>6} {'x':>5}" for r in ranks)
          + " | max gap | fallbacks")
    totals = [0.0, {r: 0.0 for r in ranks}]
    with torch.no_grad():
        for m, n in shapes:
            full, ours, gap, falls = 0.0, {r: 0.0 for r in ranks}, 0.0, 0
            for i in range(args.repeats):
                d = layer_difference(m, n, seed=i)
                best = {r: math.inf for r in ["full", *ranks]}
                for _ in range(args.tries):
                    start = time.perf_counter()
                    _, s, _ = torch.linalg.svd(d, full_matrices=False)
                    best["full"] = min(best["full"], time.perf_counter() - start)
                    for r in ranks:
                        start = time.perf_counter()
                        dec, rank, note = decompose(d, RankRule(r), SvdOptions(), seed=i)
                        best[r] = min(best[r], time.perf_counter() - start)
                full += best["full"]
                s2 = s.double() ** 2
                for r in ranks:
                    dec, rank, note = decompose(d, RankRule(r), SvdOptions(), seed=i)
                    ours[r] += best[r]
                    gap = max(gap, float(s2[:r].sum() / s2.sum()) - dec.energy(rank))
                    falls += bool(note)
            k = args.repeats
            count = SDXL_DEPTH2.get((m, n), 1)
            totals[0] += count * full / k
            for r in ranks:
                totals[1][r] += count * ours[r] / k
            print(f"{f'{m}x{n}':>11} | {full / k:>7.3f} | "
                  + " | ".join(f"{ours[r] / k:>6.3f} {full / ours[r]:>4.1f}x" for r in ranks)
                  + f" | {gap:>7.1e} | {falls}")
    print(f"{'SDXL d2':>11} | {totals[0]:>7.2f} | "
          + " | ".join(f"{totals[1][r]:>6.2f} {totals[0] / totals[1][r]:>4.1f}x" for r in ranks))


if __name__ == "__main__":
    main()
