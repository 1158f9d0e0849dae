"""Adapter engine benchmarks (a script, not a test).

    .venv/bin/python bench/bench_engine.py            # ours vs ComfyUI's native trainer LoRA: time and memory
    .venv/bin/python bench/bench_engine.py --counts   # adapter parameters and fp16 file sizes, full SD1.5 UNet

Speed: the same UNet (the fixture's SD1.5-width UNet by default), the same layers (a preset of
ours), the same rank and alpha, fp32 on the CPU. The variants take turns within each repeat
(ours, ComfyUI's native LoRA, and no adapters as the baseline), and each repeat times
  attach   creating the adapters and putting them on a ModelPatcher clone as weight wrappers
           (ours: LoraNetwork.create + attach; native: LoRAAdapter.create_train + add_weight_wrapper,
           as comfy_extras/nodes_train.py does),
  load     loading the clone the way ComfyUI does before sampling or training (load_models_gpu),
  step     one forward + backward of the UNet (latent --size, 77-token context),
  wrappers the weight wrappers alone: every adapted weight computed and back-propagated once.
Memory: the peak RSS increase over attach + load + one step, each variant in a fresh process.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from harness import fixtures  # noqa: E402
from harness.comfy import import_pack, setup_inprocess  # noqa: E402

UNETS = {
    "fixture": fixtures.SD15_TINY_UNET,
    "narrow": {**fixtures.SD15_TINY_UNET, "model_channels": 32, "context_dim": 64, "channel_mult": [1, 2],
               "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]},
}
# comfy/model_detection.py, unet_config_from_diffusers_unet: SD15.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def engine():
    """lora_core's network module, from the pack imported the way ComfyUI imports it."""
    return importlib.import_module(f"{import_pack().__name__}.lora_core.network")


def make_patcher(unet_config: dict, meta: bool = False):
    """A ComfyUI MODEL around an SD1.5-type UNet built in-process (norm scales 1, weights N(0, 0.02))."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.set_inference_dtype(torch.float16 if meta else torch.float32, None)
    with torch.device("meta" if meta else "cpu"):
        base = model_config.get_model({})
    if not meta:
        fixtures.init_weights_(base.diffusion_model, 0)
        with torch.no_grad():
            for m in base.diffusion_model.modules():
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    m.weight.fill_(1.0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


# --- counts ----------------------------------------------------------------------------------

def adapter_sizes(ranks=(4, 8, 16), presets=("attention", "kohya", "locon", "all")) -> list[dict]:
    """Modules, parameters and fp16 safetensors bytes of a LoRA on the full SD1.5 UNet (built on meta)."""
    import torch
    from safetensors.torch import save

    network_module = engine()
    sd15 = make_patcher(SD15_UNET, meta=True)
    rows = []
    for preset in presets:
        for rank in ranks:
            config = network_module.NetworkConfig(preset=preset, rank=rank, alpha=rank)
            network = network_module.LoraNetwork.create(config, sd15)
            size = len(save(network.state_dict_kohya(torch.float16)))
            rows.append({"preset": preset, "rank": rank, "modules": len(network.adapters),
                         "params": network.num_params(), "fp16_bytes": size})
    return rows


def print_counts() -> None:
    rows = adapter_sizes()
    print("LoRA on the full SD1.5 UNet (no text encoder); fp16 safetensors file, header included")
    print(f"{'preset':<10} {'rank':>4} {'modules':>7} {'params':>12} {'fp16 file':>10}")
    for r in rows:
        print(f"{r['preset']:<10} {r['rank']:>4} {r['modules']:>7} {r['params']:>12,} {r['fp16_bytes'] / 1e6:>8.2f} MB")


# --- speed ----------------------------------------------------------------------------------

class Bench:
    """One UNet, the layers a preset picks, and a timed training step with each kind of adapter."""

    def __init__(self, unet: str, preset: str, rank: int, size: int):
        import torch

        torch.manual_seed(0)
        self.network_module = engine()
        self.model = make_patcher(UNETS[unet])
        self.config = self.network_module.NetworkConfig(preset=preset, rank=rank, alpha=rank)
        self.keys = list(self.network_module.LoraNetwork.create(self.config, self.model).weight_keys.values())
        self.weights = self.model.model.state_dict()
        context_dim = UNETS[unet]["context_dim"]
        self.inputs = (torch.randn(1, 4, size, size), torch.tensor([3.0]), torch.randn(1, 77, context_dim))
        self.rank = rank

    def attach(self, variant: str):
        """(patched clone, weight wrappers) for "ours", "native" or "none"."""
        from comfy.weight_adapter import LoRAAdapter

        if variant == "ours":
            network = self.network_module.LoraNetwork.create(self.config, self.model)
            patched, _ = network.attach(self.model, None)
            return patched, list(network.adapters.values())
        patched = self.model.clone()
        patched.model.requires_grad_(False)
        wrappers = []
        for key in self.keys if variant == "native" else []:
            wrappers.append(LoRAAdapter.create_train(self.weights[key], self.rank, float(self.rank)))
            patched.add_weight_wrapper(key, wrappers[-1])
        return patched, wrappers

    def run(self, variant: str) -> dict[str, float]:
        import comfy.model_management
        import torch

        t0 = time.perf_counter()
        patched, wrappers = self.attach(variant)
        t1 = time.perf_counter()
        with torch.no_grad():  # both inits start at dW = 0 with one factor zero: make every factor live
            for p in (p for w in wrappers for p in w.parameters() if p.requires_grad):
                p.normal_(0, 0.02)
        x, sigma, context = self.inputs
        t2 = time.perf_counter()
        comfy.model_management.load_models_gpu([patched])
        t3 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().requires_grad_(variant == "none")  # something to differentiate without adapters
            patched.model.apply_model(x, sigma, c_crossattn=context).pow(2).mean().backward()
        t4 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            if wrappers:
                sum(w(self.weights[k]).square().sum() for w, k in zip(wrappers, self.keys, strict=True)).backward()
        t5 = time.perf_counter()
        return {"attach": t1 - t0, "load": t3 - t2, "step": t4 - t3, "wrappers": t5 - t4}


def compare(args) -> None:
    bench = Bench(args.unet, args.preset, args.rank, args.size)
    variants = ("ours", "native", "none")
    times: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.repeats + 1):  # the first round warms up
        for variant in variants:
            result = bench.run(variant)
            if i:
                times[variant].append(result)
    peak = {}
    for variant in variants:
        command = [sys.executable, __file__, "--memory", variant, "--unet", args.unet, "--preset", args.preset,
                   "--rank", str(args.rank), "--size", str(args.size)]
        peak[variant] = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])

    def med(variant, key):
        return statistics.median(r[key] for r in times[variant])

    print(f"UNet {args.unet!r}, preset {args.preset!r} ({len(bench.keys)} layers), rank {args.rank}, latent "
          f"{args.size}x{args.size}, fp32 CPU, {args.repeats} interleaved repeats (medians)")
    print(f"{'':<24} {'ours':>9} {'native':>9} {'no adapter':>11} {'ours/native':>12}")
    for key, label in (("attach", "attach (s)"), ("load", "load (s)"), ("step", "fwd + bwd (s)"),
                       ("wrappers", "wrappers only (s)")):
        row = [med(v, key) for v in variants]
        print(f"{label:<24} {row[0]:>9.4f} {row[1]:>9.4f} {row[2]:>11.4f} {row[0] / row[1]:>12.3f}")
    total = {v: sum(med(v, k) for k in ("attach", "load", "step")) for v in variants}
    print(f"{'attach + load + step (s)':<24} {total['ours']:>9.4f} {total['native']:>9.4f} {total['none']:>11.4f} "
          f"{total['ours'] / total['native']:>12.3f}")
    over = {v: total[v] - total["none"] for v in ("ours", "native")}
    print(f"{'adapter cost (s)':<24} {over['ours']:>9.4f} {over['native']:>9.4f} {'':>11} {over['ours'] / over['native']:>12.3f}")
    print(f"{'step peak RSS (MB)':<24} {peak['ours']:>9.1f} {peak['native']:>9.1f} {peak['none']:>11.1f} "
          f"{peak['ours'] / peak['native']:>12.3f}")


def peak_memory(args) -> float:
    """MB by which attach + load + one training step raise this fresh process's RSS at the peak."""
    import threading

    import psutil

    bench = Bench(args.unet, args.preset, args.rank, args.size)
    process = psutil.Process()
    base = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    bench.run(args.memory)
    done.set()
    sampler.join()
    return (peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", action="store_true", help="print adapter sizes on the full SD1.5 UNet")
    parser.add_argument("--unet", choices=sorted(UNETS), default="fixture")
    parser.add_argument("--preset", default="kohya")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--memory", choices=["ours", "native", "none"], help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run through every part of the script, for CI (seconds; its figures mean "
                             "nothing)")
    args = parser.parse_args()
    if args.smoke:
        args.unet, args.size, args.repeats, args.rank = "narrow", 8, 1, 4
    setup_inprocess()
    if args.counts:
        print_counts()
    elif args.memory:
        print(peak_memory(args))
    else:
        compare(args)


if __name__ == "__main__":
    main()
