"""Training on full-size models with random weights: our Train LoRA vs ComfyUI's native TrainLoraNode.

Usage (a GPU machine with ComfyUI and this pack):
    python bench/bench_gpu.py [--models sd15,sdxl,flux,wan21] [--steps 12] [--out out/bench_gpu.json]
On a CPU machine `--smoke` runs the same code on the tiny models of the tests (a CI check of the code path).

Each model is built by the host's own classes (comfy.supported_models) at its real size with random
weights (nothing is downloaded): SD1.5 at 512 px, SDXL at 1024 px, Flux.1-dev at 1024 px with fp8
weights, Wan 2.1 1.3B at 480x832 x 17 frames. Images and captions are random tensors of the model's
latent and text shapes (the VAE and text encoders are not what is measured). For each variant: peak
device memory (torch.cuda.max_memory_allocated, and the allocator's reserved peak), seconds per step
(wall time of the run / steps, and the steady step: our median step after the first; native's
time for twice the steps minus its time for the steps), images per second, the FLOPs of
one step (counted by torch's FLOP counter in our planner's simulated step) and MFU against the GPU's
dense bf16 peak. Variants: ours and native at rank 16, batch 1 and 4, with and without gradient
checkpointing, and ours with the weights streamed under a budget of half the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L40": 181, "RTX 6000 Ada": 364, "4090": 165,
               "3090": 71, "A6000": 155, "A10": 125, "L4": 121, "T4": 65}

# Full-size configs (the host's own unet_config keys) and the training geometry of each benchmark.
FULL = {
    "sd15": {"config": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "context_dim": 768,
                        "num_heads": 8, "use_linear_in_transformer": False, "use_spatial_transformer": True,
                        "legacy": False, "adm_in_channels": None, "use_temporal_attention": False,
                        "use_temporal_resblock": False},
             "size": 512, "frames": 1},
    "sdxl": {"config": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 2048,
                        "num_head_channels": 64, "use_linear_in_transformer": True, "use_spatial_transformer": True,
                        "legacy": False, "adm_in_channels": 2816, "num_classes": "sequential",
                        "use_temporal_attention": False,
                        "use_temporal_resblock": False},
             "size": 1024, "frames": 1},
    "flux": {"config": {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
                        "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                        "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
                        "qkv_bias": True, "guidance_embed": True},
             "size": 1024, "frames": 1, "weight_dtype": "float8_e4m3fn"},
    "wan21": {"config": {"image_model": "wan2.1", "model_type": "t2v", "dim": 1536, "out_dim": 16, "num_heads": 12,
                         "ffn_dim": 8960, "num_layers": 30, "patch_size": (1, 2, 2), "freq_dim": 256,
                         "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
                         "in_dim": 16, "text_dim": 4096},
              "size": (832, 480), "frames": 17},
}
MODEL_CLASSES = {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux", "wan21": "WAN21_T2V"}
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "flux": 512, "wan21": 512}


def full_size_config(name: str):
    """The host's model config of the full-size model `name`, with its weight and compute dtypes."""
    import comfy.supported_models
    import torch

    spec = FULL[name]
    model_config = getattr(comfy.supported_models, MODEL_CLASSES[name])(dict(spec["config"]))
    weight_dtype = getattr(torch, spec.get("weight_dtype", "bfloat16"))
    model_config.set_inference_dtype(weight_dtype, torch.bfloat16 if weight_dtype != torch.bfloat16 else None)
    return model_config


def build_model(name: str, smoke: bool):
    """The diffusion model as a ModelPatcher: the tests' tiny one (smoke) or the full size, random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch
    from harness.families import build_family, init_module_

    if smoke:
        return build_family(name).model
    device = mm.get_torch_device()
    with torch.device(device):
        base = full_size_config(name).get_model({})
    init_module_(base.diffusion_model, 0)  # N(0, 0.02) weights, norm scales 1 (the host leaves them unset)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=mm.unet_offload_device())


def meta_model(name: str):
    """The full-size diffusion model with weights on the meta device (shapes and dtypes, no storage) and a real
    sampling schedule: what the memory plan needs, on any machine."""
    import comfy.model_base
    import comfy.model_patcher
    import torch

    model_config = full_size_config(name)
    with torch.device("meta"):
        base = model_config.get_model({})
    base.model_sampling = comfy.model_base.model_sampling(model_config, base.model_type)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def plan_full_size(args) -> dict:
    """Our planner's peak for each full-size model (bf16 compute, rank 16 on the kohya targets, AdamW), computed
    on this machine with its CPU kernels (its attention is a flash kernel too, keeping no score matrix): estimates
    from the simulated step, not measurements. A CPU-only torch cannot make (fake) CUDA tensors everywhere the
    host's code moves them."""
    import torch
    from lora_foundry.training.blocks import BlockOptions, training_blocks
    from lora_foundry.training.planning import plan_memory
    from lora_foundry.training.trainer import TrainingError

    cases = [("sd15", 4, False, 0), ("sd15", 1, True, 0), ("sdxl", 1, False, 0), ("sdxl", 1, True, 0),
             ("sdxl", 1, True, 4), ("sdxl", 4, True, 0), ("flux", 1, True, 0), ("flux", 1, True, 10),
             ("wan21", 1, True, 0), ("wan21", 1, True, 6)]
    rows = []
    for name in args.models.split(","):
        model = meta_model(name)
        spec = FULL[name]
        size = (spec["size"],) * 2 if isinstance(spec["size"], int) else spec["size"]
        for case, batch, checkpointing, budget in cases:
            if case != name:
                continue
            settings = {"steps": 1, "batch_size": batch, "precision": "bf16", "gradient_checkpointing": checkpointing,
                        "vram_budget_gb": budget or 1024.0}
            trainer = bench_trainer(model, name, size, spec["frames"], settings,
                                    {"rank": 16, "alpha": 16, "preset": "kohya"})
            trainer.encode_images(trainer.dataset.items)
            with torch.inference_mode(False):
                patched, _ = trainer.network.attach(model, None, mode="bypass")
                blocks = BlockOptions(checkpointing=checkpointing)
                row = {"model": name, "batch": batch, "checkpointing": checkpointing, "budget_gb": budget or None}
                try:
                    with training_blocks(patched.model.diffusion_model, blocks):
                        plan = plan_memory(trainer, patched, blocks, torch.device("cpu"), torch.bfloat16)
                    row.update(weights_gb=plan.weights / 1024**3, resident_gb=plan.resident_weights / 1024**3,
                               activations_gb=plan.activations / 1024**3, adapter_gb=plan.adapter / 1024**3,
                               peak_gb=plan.peak / 1024**3, checkpointing=plan.checkpointing,
                               tflops_per_step=plan.flops / 1e12)
                except TrainingError as error:
                    row["error"] = str(error)
            rows.append(row)
            print(json.dumps(row))
    return {"planned_with": "cpu kernels", "rows": rows}


def random_conditioning(model, name: str, seed: int = 0) -> list:
    """A CONDITIONING of the model's text shapes (context width, pooled vector) with random values."""
    import torch

    config = model.model.model_config.unet_config
    width = config.get("context_dim") or config.get("context_in_dim") or config.get("text_dim")
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    if config.get("adm_in_channels"):  # SDXL's y: the pooled CLIP-G output, then six 256-wide size embeddings
        extra["pooled_output"] = torch.randn(1, config["adm_in_channels"] - 6 * 256, generator=gen)
    if config.get("vec_in_dim"):
        extra["pooled_output"] = torch.randn(1, config["vec_in_dim"], generator=gen)
    return [[torch.randn(1, TEXT_TOKENS[name], width, generator=gen), extra]]


def dataset_folder(size: tuple[int, int], count: int = 8) -> Path:
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bench_gpu_")) / "1_bench"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (i * 30 % 255, 80, 160)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder.parent


def bench_trainer(model, name: str, size: tuple[int, int], frames: int, settings: dict, network: dict):
    """Our Trainer with random latents and conditioning of the model's shapes in place of the VAE and encoders."""
    import torch
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.dataset import load_dataset
    from lora_foundry.training.trainer import TrainConfig, Trainer

    conditioning = random_conditioning(model, name)
    latent_format = model.get_model_object("latent_format")

    class RandomData(Trainer):
        def encode_text(self, caption, cache=True):
            return conditioning

        def encode_images(self, items, validation=False, batch=16):
            for index, item in enumerate(items):
                width, height = item.bucket
                depth = [(frames - 1) // 4 + 1] if getattr(latent_format, "latent_dimensions", 2) == 3 else []
                shape = (latent_format.latent_channels, *depth, height // 8, width // 8)
                self.latents.put(index, False, validation, torch.randn(shape))

    dataset = load_dataset(dataset_folder(size), resolution=max(size), min_side=min(size), max_side=max(size),
                           bucket_step=64)
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(**network), model)
        return RandomData(model, _NotLoaded(), _NotLoaded(), dataset, net, TrainConfig(**settings))


class _NotLoaded:
    """Stands for the text encoder and VAE, which the bench never loads (their outputs are random tensors)."""

    patcher = None


def run_ours(model, name, size, frames, args, batch: int, checkpointing: bool, stream: dict | None = None,
             compiled: bool = False) -> dict:
    """Our Train LoRA; with `stream` (the plan of a checkpointed run) under a budget that holds half the weights."""
    import torch

    budget = (stream["adapter"] + stream["activations"] + model.model_size() / 2) / 1024**3 if stream else 0.0
    settings = {"steps": args.steps, "batch_size": batch, "learning_rate": 1e-4, "seed": 0,
                "gradient_checkpointing": checkpointing, "precision": "fp32" if args.smoke else "bf16",
                "vram_budget_gb": budget, "compile_blocks": compiled}
    trainer = bench_trainer(model, name, size, frames, settings, {"rank": 16, "alpha": 16, "preset": "kohya"})
    times = []
    trainer.on_step = lambda info: times.append(time.perf_counter())
    reset_peak()
    start = time.perf_counter()
    with torch.inference_mode(False):
        trainer.run()
    wall = time.perf_counter() - start
    steady = statistics.median(b - a for a, b in zip(times, times[1:], strict=False)) if len(times) > 2 else wall
    plan = trainer.plan
    return {"s_per_step": wall / args.steps, "steady_s_per_step": steady, "flops_per_step": plan.flops,
            "planned_peak_gb": plan.peak / 1024**3, "checkpointing": plan.checkpointing,
            "resident_weights_gb": plan.resident_weights / 1024**3,
            "plan": {"adapter": plan.adapter, "activations": plan.activations}, **peak_memory()}


def run_native(model, name, size, frames, args, batch: int, checkpointing: bool) -> dict:
    """Native TrainLoraNode for `steps` and for twice as many: the difference is its steady step time."""
    first = native_once(model, name, size, frames, args, batch, checkpointing, args.steps)
    second = native_once(model, name, size, frames, args, batch, checkpointing, 2 * args.steps)
    return {**first, "steady_s_per_step": (second["wall"] - first["wall"]) / args.steps,
            "peak_allocated_gb": max(first["peak_allocated_gb"] or 0, second["peak_allocated_gb"] or 0) or None,
            "peak_reserved_gb": max(first["peak_reserved_gb"] or 0, second["peak_reserved_gb"] or 0) or None}


def native_once(model, name, size, frames, args, batch: int, checkpointing: bool, steps: int) -> dict:
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    trainer = bench_trainer(model, name, size, frames, {"steps": 1}, {"rank": 16})
    trainer.encode_images(trainer.dataset.items)
    latents = [{"samples": trainer.latents.get(i)[None]} for i in range(len(trainer.dataset.items))]
    positive = [random_conditioning(model, name, i) for i in range(len(latents))]
    dtype = "fp32" if args.smoke else "bf16"
    reset_peak()
    start = time.perf_counter()
    with torch.inference_mode(False):
        TrainLoraNode.execute(
            model=[model], latents=latents, positive=positive, batch_size=[batch], steps=[steps],
            grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[16], optimizer=["AdamW"], loss_function=["MSE"],
            seed=[0], training_dtype=[dtype], lora_dtype=[dtype], algorithm=["LoRA"],
            gradient_checkpointing=[checkpointing], existing_lora=["[None]"])
    wall = time.perf_counter() - start
    return {"wall": wall, "s_per_step": wall / steps, **peak_memory()}


def reset_peak() -> None:
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / 1024**3,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1024**3}


def peak_tflops(args) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    gpu = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl,flux,wan21")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--smoke", action="store_true", help="the tests' tiny models at 64 px (runs on a CPU)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--compile", action="store_true", help="also ours with compile_blocks (inductor)")
    parser.add_argument("--plan", action="store_true",
                        help="only our memory plan for the full-size models (runs anywhere, no GPU needed)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "out" / "bench_gpu.json")
    args = parser.parse_args()

    from harness.comfy import import_pack, setup_inprocess

    setup_inprocess()
    import_pack()
    import torch

    if args.plan:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(plan_full_size(args), indent=1))
        print(f"written {args.out}")
        return
    peak = peak_tflops(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    results = {"device": device, "peak_tflops": peak, "steps": args.steps, "smoke": args.smoke, "models": {}}
    for name in args.models.split(","):
        spec = FULL[name]
        size = (64, 64) if args.smoke else (spec["size"],) * 2 if isinstance(spec["size"], int) else spec["size"]
        frames = 1 if args.smoke else spec["frames"]
        model = build_model(name, args.smoke)
        rows = []
        common = (model, name, size, frames, args)
        for batch in (int(b) for b in args.batches.split(",")):
            for ckpt in (False, True):
                row = {"batch": batch, "checkpointing": ckpt, "streamed": False}
                rows.append(measure({"variant": "ours", **row}, peak, run_ours, *common, batch, ckpt))
                rows.append(measure({"variant": "native", **row}, peak, run_native, *common, batch, ckpt))
            checkpointed = rows[-2]
            if "plan" in checkpointed:
                rows.append(measure({"variant": "ours", "batch": batch, "checkpointing": True, "streamed": True},
                                    peak, run_ours, *common, batch, True, stream=checkpointed["plan"]))
            if args.compile:
                rows.append(measure({"variant": "ours+compile", "batch": batch, "checkpointing": False,
                                     "streamed": False}, peak, run_ours, *common, batch, False, compiled=True))
        results["models"][name] = {"size": size, "frames": frames, "params": sum(
            p.numel() for p in model.model.diffusion_model.parameters()), "rows": rows}
        del model
        reset_peak()
        print_table(name, results["models"][name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written {args.out}")


def measure(row: dict, peak: float | None, run, *args, **kwargs) -> dict:
    """`row` (the variant's labels) with what run(*args, **kwargs) measured, images/s and MFU."""
    row = dict(row)
    try:
        row.update(run(*args, **kwargs))
    except Exception as error:  # one variant that cannot run (OOM, unsupported) is a result, not the end
        row["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        return row
    row["images_per_s"] = row["batch"] / row["steady_s_per_step"]
    flops = row.get("flops_per_step")
    if flops and peak:
        row["mfu"] = flops / row["steady_s_per_step"] / (peak * 1e12)
    return row


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: {result['params'] / 1e6:.0f}M parameters, {result['size']} x {result['frames']} frames")
    print(f"{'variant':8} {'batch':>5} {'ckpt':>5} {'stream':>6} {'s/step':>8} {'steady':>8} {'img/s':>7} "
          f"{'peak GB':>8} {'plan GB':>8} {'MFU':>6}")
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['variant']:8} {row['batch']:5} {row['checkpointing']!s:>5} {row['streamed']!s:>6}  "
                  f"error: {row['error'][:80]}")
            continue

        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        print(f"{row['variant']:8} {row['batch']:5} {row['checkpointing']!s:>5} {row['streamed']!s:>6} "
              f"{row['s_per_step']:8.3f} {row['steady_s_per_step']:8.3f} {row['images_per_s']:7.2f} {fmt(row.get('peak_allocated_gb'), '8.2f'):>8} "
              f"{fmt(row.get('planned_peak_gb'), '8.2f'):>8} {fmt(row.get('mfu'), '6.1%'):>6}")


if __name__ == "__main__":
    main()
