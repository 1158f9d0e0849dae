"""What a run shows while it trains: sample images as KSampler would make them (files and the node's preview), and
the held-out loss."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..lora_core.files import write_bytes_atomic
from .conditioning import image_geometry
from .sample_prompts import SampleDefaults, SamplePrompt, parse_sample_prompts

if TYPE_CHECKING:
    from .trainer import Trainer


def sample_prompts(trainer: Trainer) -> list[SamplePrompt]:
    """The run's sample prompts with their options; unset ones from the settings and the first bucket's size."""
    cfg = trainer.config
    if not cfg.sample_prompts:
        return []
    width, height = trainer.dataset.items[0].bucket
    defaults = SampleDefaults(width, height, cfg.sample_steps, cfg.sample_cfg, cfg.seed, _downscale(trainer.vae))
    return parse_sample_prompts(cfg.sample_prompts, defaults)


def sample(trainer: Trainer, patched) -> list:
    """One image per sample prompt (Pillow) from the model with the adapter as it is now.

    Exactly what KSampler (euler, normal, the prompt's seed, steps and CFG) on an empty latent of the prompt's size,
    with CLIPTextEncode prompt and negative, then VAEDecode would give. The global random state is left as it was.
    """
    import comfy.sample
    from PIL import Image

    shape, ratio = trainer.latents.shape(), _downscale(trainer.vae)  # (channels, [frames,] height, width)
    device = patched.load_device
    trainer.network.eval()
    images = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for p in trainer.samples:
                positive, negative = trainer.conditioning([p.prompt, p.negative], "cpu")
                empty = torch.zeros((1, *shape[:-2], p.height // ratio, p.width // ratio))
                latent = comfy.sample.fix_empty_latent_channels(patched, empty)
                noise = comfy.sample.prepare_noise(latent, p.seed)
                out = comfy.sample.sample(patched, noise, p.steps, p.cfg, "euler", "normal", positive, negative,
                                          latent, seed=p.seed, disable_pbar=True)
                pixels = trainer.vae.decode(out)  # sample() already returns latents in the VAE's space
                pixels = pixels.reshape(-1, *pixels.shape[-3:])[0].clamp(0, 1)
                images.append(Image.fromarray((pixels.float().cpu().numpy() * 255).round().astype("uint8")))
    finally:
        trainer.network.train()
    return images


def preview_grid(images: list):
    """The images side by side on one row, top-aligned on black (sizes may differ)."""
    from PIL import Image

    grid = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        grid.paste(image, (x, 0))
        x += image.width
    return grid


def save_samples(images: list, folder: Path, name: str, step: int) -> list[Path]:
    """Each image as `folder/samples/<name>-step000100-00.png`, written atomically."""
    paths = []
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = Path(folder) / "samples" / f"{name}-step{step:06d}-{index:02d}.png"
        paths.append(write_bytes_atomic(buffer.getvalue(), path))
    return paths


def sample_step(trainer: Trainer, patched, patchers, step: int):
    """Sample the prompts at `step`: PNGs in the run's state folder, and the preview grid when a node shows it."""
    if not trainer.samples or (trainer.on_step is None and trainer.state_dir is None):
        return None
    images = sample(trainer, patched)
    trainer.after_preview(patched, patchers)
    if trainer.state_dir is not None:
        save_samples(images, trainer.state_dir, trainer.name, step)
    return preview_grid(images) if trainer.on_step is not None else None


def _downscale(vae) -> int:
    """Pixels per latent cell, as the VAE encodes."""
    return int(vae.spacial_compression_encode()) if hasattr(vae, "spacial_compression_encode") else 8


def held_out_loss(trainer: Trainer, patched, device, levels=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 1234) -> float:
    """Mean native-space MSE over the validation images at fixed noise levels and noise seeds."""
    items = trainer.dataset.validation
    if not items:
        return math.nan
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    training = trainer.network.training
    trainer.network.eval()  # the whole adapter: no dropout, DyLoRA at full rank
    with torch.no_grad():
        for index, item in enumerate(items):
            x0 = trainer.latents.get(index, validation=True)[None].to(device)
            conditioning = trainer.conditioning([trainer.fixed_caption(item)], device,
                                                trainer.sample_values([index], [False], validation=True))
            low, high = trainer.expert_levels(patched, x0)  # an expert is judged on the levels it denoises
            for level in levels:
                noise = torch.randn(x0.shape, generator=gen).to(device)
                weights = trainer.masks.weights([item], [index], [False], True, trainer.latents, device)
                sigma = trainer.sigmas(patched, [low + (high - low) * level], x0)
                loss = trainer.loss(patched, x0, noise, sigma, conditioning,
                                    [image_geometry(item)], weights, None)
                total += loss.item()
                count += 1
    trainer.network.train(training)
    return total / count
