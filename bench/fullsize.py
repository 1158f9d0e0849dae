"""Full-size models with random weights, and both trainers run on them with a clock at every optimizer step.

Shared by bench/gpu_check.py (the GPU check) and bench/bench_dispatch.py (operators and host time per step).
Models are built by the host's own classes (comfy.supported_models) from the real configs; nothing is downloaded.
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path

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
# The same layer structure (every block, layer and operator of the full model) at widths that cost nothing:
# operators and host work per step are those of the full model; arithmetic is not.
NARROW = {
    "sdxl": {"model_channels": 32, "num_head_channels": 8, "context_dim": 32},
    "flux": {"hidden_size": 64, "num_heads": 2, "axes_dim": [4, 14, 14], "context_in_dim": 32, "vec_in_dim": 32},
    "sd15": {"model_channels": 32, "num_heads": 4, "context_dim": 32},
    "wan21": {"dim": 64, "num_heads": 2, "ffn_dim": 128, "text_dim": 32, "freq_dim": 32},
}
# Narrow and shallow, for a CI run of the benchmarks' code (`--smoke`): a few blocks of each kind.
SMOKE = {
    "sdxl": {**NARROW["sdxl"], "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
             "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1]},
    "flux": {**NARROW["flux"], "depth": 1, "depth_single_blocks": 1},
    "sd15": {**NARROW["sd15"], "num_res_blocks": [1, 1, 1, 1]},
    "wan21": {**NARROW["wan21"], "num_layers": 2},
}
SHAPES = {"full": {}, "narrow": NARROW, "smoke": SMOKE}
MODEL_CLASSES = {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux", "wan21": "WAN21_T2V"}
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "flux": 512, "wan21": 512}


def geometry(name: str, smoke: bool = False) -> tuple[tuple[int, int], int]:
    """(width, height) and frames a benchmark of `name` trains at (64 px, one frame when `smoke`)."""
    if smoke:
        return (64, 64), 1
    spec = FULL[name]
    size = spec["size"]
    return ((size, size) if isinstance(size, int) else tuple(size)), spec["frames"]


def model_config(name: str, shape: str = "full"):
    """The host's model config of `name` in `shape` (full, narrow or smoke), with its weight and compute dtypes."""
    import comfy.supported_models
    import torch

    spec = FULL[name]
    config = {**spec["config"], **SHAPES[shape].get(name, {})}
    model_config = getattr(comfy.supported_models, MODEL_CLASSES[name])(config)
    weight_dtype = getattr(torch, spec.get("weight_dtype", "bfloat16"))
    model_config.set_inference_dtype(weight_dtype, torch.bfloat16 if weight_dtype != torch.bfloat16 else None)
    return model_config


def random_init_(module, seed: int = 0, std: float = 0.02) -> None:
    """N(0, std) weights drawn where they live (a GPU draws a 12B model in seconds), zero biases, norm scales 1."""
    import torch

    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            is_norm = "norm" in type(owner).__name__.lower()
            for pname, p in owner.named_parameters(recurse=False):
                if is_norm and pname in ("weight", "scale", "gamma"):
                    p.fill_(1.0)
                elif p.ndim >= 2 and not is_norm:
                    draw = torch.empty(p.shape, device=p.device, dtype=torch.bfloat16)
                    p.copy_(draw.normal_(0.0, std, generator=gen))
                else:
                    p.zero_()


def build_model(name: str, shape: str = "full", device=None):
    """The diffusion model `name` in `shape` as a ModelPatcher with random weights, built on `device` (the host's)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    device = device or mm.get_torch_device()
    with torch.device(device):
        base = model_config(name, shape).get_model({})
    random_init_(base.diffusion_model)
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=mm.unet_offload_device())


def meta_model(name: str):
    """The full-size diffusion model with weights on the meta device (shapes and dtypes, no storage) and a real
    sampling schedule: what the memory plan needs, on any machine."""
    import comfy.model_base
    import comfy.model_patcher
    import torch

    config = model_config(name)
    with torch.device("meta"):
        base = config.get_model({})
    base.model_sampling = comfy.model_base.model_sampling(config, base.model_type)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


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
    return [[torch.randn(1, TEXT_TOKENS.get(name, 77), width, generator=gen), extra]]


def dataset_folder(size: tuple[int, int], count: int = 8) -> Path:
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="lora_foundry_bench_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # read while the process trains; gone when it ends
    folder = root / "1_bench"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (i * 30 % 255, 80, 160)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder.parent


class _NotLoaded:
    """Stands for the text encoder and VAE, which the bench never loads (their outputs are random tensors)."""

    patcher = None


def bench_trainer(model, name: str, size: tuple[int, int], frames: int, settings: dict, network: dict):
    """Our Trainer with random latents and conditioning of the model's shapes in place of the VAE and encoders."""
    import torch
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.preparation import EncodedData
    from lora_foundry.training.engine.text import TextConditioning
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    conditioning = random_conditioning(model, name)
    latent_format = model.get_model_object("latent_format")

    class RandomText(TextConditioning):
        def encode(self, caption, cache=True):
            return conditioning

    class RandomLatents(EncodedData):
        def encode_images(self, items, validation=False, batch=16):
            for index, item in enumerate(items):
                width, height = item.bucket
                depth = [(frames - 1) // 4 + 1] if getattr(latent_format, "latent_dimensions", 2) == 3 else []
                shape = (latent_format.latent_channels, *depth, height // 8, width // 8)
                self.latents.put(index, False, validation, torch.randn(shape))

    class RandomData(Trainer):
        text_conditioning, encoded_data = RandomText, RandomLatents

    dataset = load_dataset(dataset_folder(size), resolution=max(size), min_side=min(size), max_side=max(size),
                           bucket_step=64)
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(**network), model)
        return RandomData(model, _NotLoaded(), _NotLoaded(), dataset, net, TrainConfig(**settings))


class StepClock:
    """Wall time, process CPU time and (with a counter) operators dispatched at every optimizer step of whatever
    trains inside it, ours or native's: a global optimizer-step hook, synchronised with the GPU."""

    def __init__(self, counter=None):
        self.counter = counter
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.ops: list[int] = []
        self.on_step = None  # called with the step's index after it is recorded (the profiler's window)

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._record)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def _record(self, optimizer, args, kwargs) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.counter is not None:
            self.ops.append(self.counter.ops)
        if self.on_step is not None:
            self.on_step(len(self.wall))

    @staticmethod
    def _steady(marks: list, skip: int) -> float | None:
        gaps = [b - a for a, b in zip(marks[skip:], marks[skip + 1:], strict=False)]
        return statistics.median(gaps) if gaps else None

    def steady(self, skip: int = 1) -> dict:
        """Median per-step figures after the first `skip` steps (allocation, autotuning, the first plan)."""
        return {"steady_s_per_step": self._steady(self.wall, skip), "cpu_s_per_step": self._steady(self.cpu, skip),
                "ops_per_step": self._steady(self.ops, skip), "steps_timed": max(0, len(self.wall) - skip - 1)}


def train_ours(model, name: str, size, frames: int, steps: int, batch: int = 1, checkpointing: bool = False,
               precision: str = "bf16", clock: StepClock | None = None, **settings):
    """Our Train LoRA at rank 16 (kohya targets) for `steps`; the trainer (its plan) after the run."""
    import torch

    settings = {"steps": steps, "batch_size": batch, "learning_rate": 1e-4, "seed": 0,
                "gradient_checkpointing": checkpointing, "precision": precision, **settings}
    trainer = bench_trainer(model, name, size, frames, settings, {"rank": 16, "alpha": 16, "preset": "kohya"})
    with torch.inference_mode(False), clock or StepClock():
        trainer.run()
    return trainer


def train_native(model, name: str, size, frames: int, steps: int, batch: int = 1, checkpointing: bool = False,
                 precision: str = "bf16", clock: StepClock | None = None) -> None:
    """ComfyUI's native TrainLoraNode at rank 16 on the same random data."""
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    trainer = bench_trainer(model, name, size, frames, {"steps": 1}, {"rank": 16})
    trainer.data.encode_images(trainer.dataset.items)
    latents = [{"samples": trainer.data.latents.get(i)[None]} for i in range(len(trainer.dataset.items))]
    positive = [random_conditioning(model, name, i) for i in range(len(latents))]
    with torch.inference_mode(False), clock or StepClock():
        TrainLoraNode.execute(
            model=[model], latents=latents, positive=positive, batch_size=[batch], steps=[steps],
            grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[16], optimizer=["AdamW"], loss_function=["MSE"],
            seed=[0], training_dtype=[precision], lora_dtype=[precision], algorithm=["LoRA"],
            gradient_checkpointing=[checkpointing], existing_lora=["[None]"])


def release() -> None:
    """Every model off the device and the peak counters reset."""
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


def device_peak_tflops(override: float | None = None) -> float | None:
    import torch

    if override:
        return override
    if not torch.cuda.is_available():
        return None
    gpu = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
