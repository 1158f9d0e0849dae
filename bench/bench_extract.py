"""LoRA extraction benchmark (a script, not a test): our randomized SVD vs a plain full SVD per layer.

    .venv/bin/python bench/bench_extract.py                  # SDXL widths, 1280-level depth 2, ranks 16/32/64
    .venv/bin/python bench/bench_extract.py --depth 10       # full SDXL depth (needs ~2 x 5 GB of fp16 weights)
    .venv/bin/python bench/bench_extract.py --smoke          # a narrow SDXL layout: the CI check that it runs

Two SDXL-shaped UNets (config from comfy.supported_models.SDXL + model_detection's SDXL entry): a
random base (N(0, 0.02), fp16 like a real checkpoint) and a tuned copy with a planted low-rank change
in every targeted layer (rank 48, singular values falling linearly 1 -> 0.1, 5 % of the weights'
size; fp16 rounding adds a small full-rank floor). By default the transformer depth of the 1280-wide
level is reduced from 10 to 2 (SDXL's layer widths, fewer blocks) so that the full-SVD baseline fits
a 2-core machine's time; every speed ratio is per layer shape, so depth only scales both totals.

In one process, on the same layers:
  speed      per layer, the difference through torch.linalg.svd (what kohya's extract_lora_from_models
             does; its time does not depend on the rank, its spectrum gives the optimal energy at every
             rank) and through ours (svd.decompose: randomized subspace iteration, accuracy check,
             full SVD fallback) at each rank, back to back, so that load from other processes hits both
  memory     extract_lora end to end, ours at each rank and svd="full" at the largest
  merge      merge_exact of two extracted LoRAs to a rank (factored SVD), and merge_concat
Working memory is the largest rise of the process RSS (sampled every millisecond) within one layer above
the level at that layer's start, so the LoRA that earlier layers produced and keep is not counted (after
the speed runs glibc is told to return large blocks to the system at once: `map_large_blocks`). An earlier
version subtracted the level after the whole run, which holds the entire LoRA, from a peak reached while
part of it existed: it under-counted, the more the larger the rank.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from harness import fixtures  # noqa: E402
from harness.comfy import import_pack, setup_inprocess  # noqa: E402

# comfy/model_detection.py, unet_config_from_diffusers_unet: the SDXL entry, less what
# comfy.supported_models.SDXL.unet_config sets (merged in below).
SDXL_DETECTION = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "in_channels": 4, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_resblock": False,
}
PLANTED_RANK = 48


def sdxl_config(depth: int, smoke: bool = False) -> dict:
    """SDXL's UNet config with the 1280-wide level's transformer depth set to `depth` (SDXL: 10); `smoke`: a fifth
    of its width (64-wide levels, one head of 64 at the first)."""
    import comfy.supported_models

    config = {**SDXL_DETECTION, **comfy.supported_models.SDXL.unet_config}
    if smoke:
        config["model_channels"] = 64
    config["transformer_depth"] = [d if d != 10 else depth for d in config["transformer_depth"]]
    config["transformer_depth_output"] = [d if d != 10 else depth for d in config["transformer_depth_output"]]
    config["transformer_depth_middle"] = depth
    return config


def make_patcher(config: dict, seed: int):
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    model_config = comfy.supported_models.SDXL(dict(config))
    model_config.set_inference_dtype(torch.float16, None)
    base = model_config.get_model({})
    fixtures.init_weights_(base.diffusion_model, seed)
    base.requires_grad_(False)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def plant(model, keys: list[str], seed: int) -> None:
    """Add a rank-48 change (singular values 1 -> 0.1, 5 % of the weight's std) to each weight, in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = dict(model.model.named_parameters())
    for key in keys:
        w = weights[key]
        out_dim, flat_in = w.shape[0], math.prod(w.shape[1:])
        rank = min(PLANTED_RANK, out_dim, flat_in)
        u = torch.linalg.qr(torch.randn(out_dim, rank, generator=gen)).Q
        v = torch.linalg.qr(torch.randn(flat_in, rank, generator=gen)).Q
        delta = (u * torch.linspace(1.0, 0.1, rank)) @ v.T
        delta *= 0.05 * 0.02 / delta.std()
        w.data += delta.reshape(w.shape).to(w.dtype)


class PeakRss:
    """Working memory of a layer-by-layer run: the largest rise of resident memory within one step above the
    level at that step's start (`mark` ends a step), sampled by a thread every millisecond. Measured per step,
    the LoRA that earlier layers produced and keep is never counted as working memory."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.lock = threading.Lock()
        self.base = self.peak = self._rss()
        self.rise = 0
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while self.running:
            with self.lock:
                self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def mark(self, *_) -> None:
        """End a step (usable as extract_lora's progress callback)."""
        with self.lock:
            now = self._rss()
            self.rise = max(self.rise, max(self.peak, now) - self.base)
            self.base = self.peak = now

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mark()

    @property
    def working_mb(self) -> float:
        return self.rise / 2**20


def map_large_blocks() -> None:
    """glibc from here on: each block of 1 MiB or more is a mapping of its own, returned to the system when it is
    freed, so that RSS follows what a layer holds. Set for the memory runs only: the speed runs keep glibc's default,
    as ComfyUI's process has (with the setting each large temporary is fresh pages, and the SVDs of 5120x640 layers
    took 1.3-2x as long, the full SVD's 1.35x)."""
    import ctypes

    m_mmap_threshold = -3  # malloc.h
    if not ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: the working-memory figures would be wrong")


def interleaved(extract, svd, base, tuned, layers, ranks) -> dict:
    """Per layer, the same difference through a plain full SVD and through ours at each rank, back to back,
    so that a busy machine slows both alike; seconds count the SVD work only."""
    import torch

    base_weights, tuned_weights = extract.PatchedWeights(base), extract.PatchedWeights(tuned)
    full_seconds, ours_seconds = [0.0, 0.0], {r: [0.0, 0.0] for r in ranks}  # [wall, cpu]
    by_shape: dict[tuple, list] = {}  # shape: [layers, full wall, {rank: ours wall}]
    total, kept_full, kept_ours = 0.0, {r: 0.0 for r in ranks}, {r: 0.0 for r in ranks}
    gap, fallbacks = {r: 0.0 for r in ranks}, {r: 0 for r in ranks}
    with torch.no_grad():
        for i, (_, key, _) in enumerate(layers):
            diff = tuned_weights(key)
            base_weights.subtract_from(diff, key)
            diff = diff.reshape(diff.shape[0], -1)
            start = time.perf_counter(), time.process_time()
            _, s, _ = torch.linalg.svd(diff, full_matrices=False)
            full_seconds[0] += time.perf_counter() - start[0]
            full_seconds[1] += time.process_time() - start[1]
            shape = by_shape.setdefault(tuple(diff.shape), [0, 0.0, {r: 0.0 for r in ranks}])
            shape[0] += 1
            shape[1] += time.perf_counter() - start[0]
            s2 = s.double() ** 2
            total += float(s2.sum())
            for r in ranks:
                start = time.perf_counter(), time.process_time()
                dec, rank, note = svd.decompose(diff, svd.RankRule(r), svd.SvdOptions(), seed=i)
                ours_seconds[r][0] += time.perf_counter() - start[0]
                ours_seconds[r][1] += time.process_time() - start[1]
                shape[2][r] += time.perf_counter() - start[0]
                optimal = float(s2[:r].sum())
                kept_full[r] += optimal
                kept_ours[r] += dec.energy(rank) * dec.total
                gap[r] = max(gap[r], optimal / float(s2.sum()) - dec.energy(rank))
                fallbacks[r] += bool(note)
    return {"full_seconds": full_seconds, "ours_seconds": ours_seconds, "gap": gap, "fallbacks": fallbacks,
            "by_shape": by_shape,
            "energy_full": {r: kept_full[r] / total for r in ranks},
            "energy_ours": {r: kept_ours[r] / total for r in ranks}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2, help="transformer depth of the 1280-wide level (SDXL: 10)")
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--preset", default="kohya", help="layers: attention | kohya | locon | all")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run through every part of the script, for CI (seconds; its figures mean "
                             "nothing): SDXL's layout at a fifth of its width, depth 1")
    args = parser.parse_args()
    if args.smoke:
        args.depth, args.ranks = 1, "4,8"
    sys.stdout.reconfigure(line_buffering=True)  # each table line as it comes, also into a file
    ranks = [int(r) for r in args.ranks.split(",")]

    setup_inprocess()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    pack = import_pack().__name__
    extract = importlib.import_module(f"{pack}.lora_core.extract")
    merge = importlib.import_module(f"{pack}.lora_core.merge")
    network_module = importlib.import_module(f"{pack}.lora_core.network")
    svd = importlib.import_module(f"{pack}.lora_core.svd")

    config = sdxl_config(args.depth, args.smoke)
    t0 = time.perf_counter()
    base = make_patcher(config, seed=0)
    tuned = make_patcher(config, seed=0)
    layers = network_module._unet_layers(base, network_module.NetworkConfig(preset=args.preset))
    plant(tuned, [key for _, key, _ in layers], seed=1)
    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    shapes = sorted({tuple(m.weight.shape) for _, _, m in layers})
    print(f"SDXL-shaped UNet, 1280-level depth {args.depth} (SDXL: 10): {params / 1e6:.0f} M parameters, fp16; "
          f"preset {args.preset}: {len(layers)} layers, {len(shapes)} shapes "
          f"({', '.join('x'.join(map(str, s)) for s in shapes[:6])}{', ...' if len(shapes) > 6 else ''}); "
          f"built in {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads")

    speed = interleaved(extract, svd, base, tuned, layers, ranks)
    print()
    print(f"SVD work per method, layer by layer back to back ({len(layers)} layers): wall and CPU seconds (all "
          "threads); energy: fraction of sum ||dW||_F^2 kept; max layer gap: largest per-layer energy ours lacks "
          "vs full; fallbacks: layers redone with a full SVD")
    full_wall, full_cpu = speed["full_seconds"]
    print(f"{'rank':>4} | {'full wall':>9} | {'ours wall':>9} | {'speed-up':>8} | {'full CPU':>8} | {'ours CPU':>8} | "
          f"{'speed-up':>8} | {'energy full':>11} | {'energy ours':>11} | {'max layer gap':>13} | fallbacks")
    for r in ranks:
        wall, cpu = speed["ours_seconds"][r]
        print(f"{r:>4} | {full_wall:>9.1f} | {wall:>9.1f} | {full_wall / wall:>7.1f}x | {full_cpu:>8.1f} | "
              f"{cpu:>8.1f} | {full_cpu / cpu:>7.1f}x | {speed['energy_full'][r]:>11.6f} | "
              f"{speed['energy_ours'][r]:>11.6f} | {speed['gap'][r]:>13.2e} | {speed['fallbacks'][r]}/{len(layers)}")

    print()
    print("by layer shape (D flattened to out x in): full SVD seconds per layer and speed-up of ours at each rank")
    print(f"{'shape':>11} | {'layers':>6} | {'full s/layer':>12} | " + " | ".join(f"{f'rank {r}':>8}" for r in ranks))
    for shape, (count, full_s, ours) in sorted(speed["by_shape"].items()):
        print(f"{'x'.join(map(str, shape)):>11} | {count:>6} | {full_s / count:>12.3f} | "
              + " | ".join(f"{full_s / ours[r]:>7.1f}x" for r in ranks))

    runs, networks = [], {}
    map_large_blocks()
    for label, rank, method in [*((f"ours, rank {r}", r, "randomized") for r in ranks),
                                (f"full SVD, rank {ranks[-1]}", ranks[-1], "full")]:
        with PeakRss() as mem:
            network, report = extract.extract_lora(base, tuned, rule=svd.RankRule(rank), preset=args.preset,
                                                   clamp_quantile=1.0, min_diff=0.0,
                                                   options=svd.SvdOptions(method=method), progress=mem.mark)
        if method == "randomized":
            networks[rank] = network
        runs.append((label, report.seconds, mem.working_mb, report.energy))
    print()
    print("extract_lora end to end (weights fetched and diffed layer by layer, LoRA built); working memory: "
          "largest per-layer rise of RSS (the LoRA kept so far not counted)")
    print(f"{'run':<22} | {'seconds':>7} | {'working MB':>10} | {'vs full SVD':>11} | energy kept")
    full_mb = runs[-1][2]
    for label, seconds, mb, energy in runs:
        print(f"{label:<22} | {seconds:>7.1f} | {mb:>10.0f} | {full_mb / max(mb, 1e-9):>10.1f}x | {energy:.6f}")

    # Merge: two extracted LoRAs of this model, every layer.
    first, second = networks[ranks[-1]], networks[ranks[0]]
    merge_rank = ranks[len(ranks) // 2]
    timings = []
    for label, run in (
        (f"exact, ranks {ranks[-1]}+{ranks[0]} -> {merge_rank}",
         lambda: merge.merge_exact([(first, 0.7), (second, 0.5)], svd.RankRule(merge_rank))),
        (f"exact, ranks {ranks[-1]}+{ranks[0]} -> sv_fro 0.99 (<= {ranks[-1] + ranks[0]})",
         lambda: merge.merge_exact([(first, 0.7), (second, 0.5)], svd.RankRule(ranks[-1] + ranks[0], "sv_fro", 0.99))),
        (f"concat, ranks {ranks[-1]}+{ranks[0]}", lambda: merge.merge_concat([(first, 0.7), (second, 0.5)])),
    ):
        start = time.perf_counter()
        _, report = run()
        timings.append((label, time.perf_counter() - start, report.energy))
    print()
    print(f"{'merge (' + str(len(layers)) + ' layers)':<44} | {'seconds':>7} | energy kept")
    for label, seconds, energy in timings:
        print(f"{label:<44} | {seconds:>7.2f} | {energy:.6f}")


if __name__ == "__main__":
    main()
