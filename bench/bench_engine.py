"""Adapter engine benchmarks (a script, not a test).

    .venv/bin/python bench/bench_engine.py            # ours vs ComfyUI's native trainer LoRA: time and memory
    .venv/bin/python bench/bench_engine.py --counts   # adapter parameters and fp16 file sizes, full SD1.5 UNet

Speed: the same UNet (the fixture's SD1.5-width UNet by default), the same layers (a preset of
ours), the same rank and alpha, fp32 on the CPU. Each variant runs in its own process, in
alternating rounds, so that peak memory (ru_maxrss) is its own. Per repeat it times
  attach   creating the adapters and putting them on a ModelPatcher clone as weight wrappers
           (ours: LoraNetwork.create + attach; native: LoRAAdapter.create_train + add_weight_wrapper,
           as comfy_extras/nodes_train.py does),
  load     loading the clone the way ComfyUI does before sampling or training (load_models_gpu),
  step     one forward + backward of the UNet (latent --size, 77-token context),
  wrappers the weight wrappers alone: every adapted weight computed and back-propagated once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
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


# --- speed -----------------------------------------------------------------------------------

def run_variant(variant: str, unet: str, preset: str, rank: int, repeats: int, size: int) -> dict:
    """Time `variant` ("ours" or "native") in this process; returns medians and peak RSS."""
    import comfy.model_management
    import torch
    from comfy.weight_adapter import LoRAAdapter

    torch.manual_seed(0)
    network_module = engine()
    model = make_patcher(UNETS[unet])
    config = network_module.NetworkConfig(preset=preset, rank=rank, alpha=rank)
    keys = list(network_module.LoraNetwork.create(config, model).weight_keys.values())
    weights = model.model.state_dict()
    context_dim = UNETS[unet]["context_dim"]
    x, sigma, context = torch.randn(1, 4, size, size), torch.tensor([3.0]), torch.randn(1, 77, context_dim)

    def attach():
        if variant == "ours":
            network = network_module.LoraNetwork.create(config, model)
            patched, _ = network.attach(model, None)
            return patched, list(network.adapters.values())
        patched = model.clone()
        patched.model.requires_grad_(False)
        wrappers = []
        for key in keys:
            wrapper = LoRAAdapter.create_train(weights[key], rank, float(rank))
            patched.add_weight_wrapper(key, wrapper)
            wrappers.append(wrapper)
        return patched, wrappers

    def randomise(wrappers):  # both inits start at dW = 0 with one factor zero: make every factor live
        with torch.no_grad():
            for w in wrappers:
                for p in w.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.02)

    times = {"attach": [], "load": [], "step": [], "wrappers": []}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(repeats + 1):  # the first round warms up
        t0 = time.perf_counter()
        patched, wrappers = attach()
        t1 = time.perf_counter()
        randomise(wrappers)
        t2 = time.perf_counter()
        comfy.model_management.load_models_gpu([patched])
        t3 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            patched.model.apply_model(x, sigma, c_crossattn=context).pow(2).mean().backward()
        t4 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            sum(w(weights[k]).square().sum() for w, k in zip(wrappers, keys, strict=True)).backward()
        t5 = time.perf_counter()
        if i:
            for key, seconds in zip(times, (t1 - t0, t3 - t2, t4 - t3, t5 - t4), strict=True):
                times[key].append(seconds)
        comfy.model_management.unload_all_models()
        del patched, wrappers
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {k: statistics.median(v) for k, v in times.items()}
    result.update(peak_rss_mb=peak / 1024, model_rss_mb=rss_before / 1024, adapters=len(keys))
    return result


def compare(args) -> None:
    runs: dict[str, list[dict]] = {"ours": [], "native": []}
    for _ in range(args.rounds):
        for variant in ("ours", "native"):
            command = [sys.executable, __file__, "--variant", variant, "--unet", args.unet, "--preset", args.preset,
                       "--rank", str(args.rank), "--repeats", str(args.repeats), "--size", str(args.size)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))

    def med(variant, key):
        return statistics.median(r[key] for r in runs[variant])

    adapters = runs["ours"][0]["adapters"]
    print(f"UNet {args.unet!r}, preset {args.preset!r} ({adapters} layers), rank {args.rank}, latent {args.size}x{args.size}, "
          f"fp32 CPU, {args.rounds} rounds x {args.repeats} repeats (medians)")
    print(f"{'':<22} {'ours':>10} {'native':>10} {'ours/native':>12}")
    for key, label in (("attach", "attach (s)"), ("load", "load (s)"), ("step", "fwd + bwd (s)"),
                       ("wrappers", "wrappers only (s)")):
        ours, native = med("ours", key), med("native", key)
        print(f"{label:<22} {ours:>10.4f} {native:>10.4f} {ours / native:>12.3f}")
    total_ours = sum(med("ours", k) for k in ("attach", "load", "step"))
    total_native = sum(med("native", k) for k in ("attach", "load", "step"))
    print(f"{'attach + load + step':<22} {total_ours:>10.4f} {total_native:>10.4f} {total_ours / total_native:>12.3f}")
    print(f"{'peak RSS (MB)':<22} {med('ours', 'peak_rss_mb'):>10.0f} {med('native', 'peak_rss_mb'):>10.0f} "
          f"{med('ours', 'peak_rss_mb') / med('native', 'peak_rss_mb'):>12.3f}")
    print(f"{'RSS before steps (MB)':<22} {med('ours', 'model_rss_mb'):>10.0f} {med('native', 'model_rss_mb'):>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", action="store_true", help="print adapter sizes on the full SD1.5 UNet")
    parser.add_argument("--unet", choices=sorted(UNETS), default="fixture")
    parser.add_argument("--preset", default="kohya")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", choices=["ours", "native"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_inprocess()
    if args.counts:
        print_counts()
    elif args.variant:
        print(json.dumps(run_variant(args.variant, args.unet, args.preset, args.rank, args.repeats, args.size)))
    else:
        compare(args)


if __name__ == "__main__":
    main()
