"""What a run shows while it trains: sample images as KSampler would make them (files and the node's preview), and
the held-out loss."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ...lora_core.files import write_bytes_atomic
from ...lora_core.network import LoraNetwork
from ..data.dataset import Dataset
from .conditioning import image_geometry
from .config import TrainConfig
from .sample_prompts import SampleDefaults, SamplePrompt, parse_sample_prompts
from .step import TrainingStep


def sample_prompts(config: TrainConfig, dataset: Dataset, vae) -> list[SamplePrompt]:
    """The run's sample prompts with their options; unset ones from the settings and the first bucket's size."""
    if not config.sample_prompts:
        return []
    width, height = dataset.items[0].bucket
    defaults = SampleDefaults(width, height, config.sample_steps, config.sample_cfg, config.seed, _downscale(vae))
    return parse_sample_prompts(config.sample_prompts, defaults)


class Previews:
    """Samples of the run's prompts with the adapter as it is now: PNGs in `folder` and, when `shown`, a grid for
    the node. `after` runs once the sampler is done (it puts the device memory back as the run planned it)."""

    def __init__(self, prompts: list[SamplePrompt], step: TrainingStep, network: LoraNetwork, vae,
                 folder: Path | None, name: str, shown: bool, after: Callable[[], None]):
        self.prompts, self.step, self.network, self.vae = prompts, step, network, vae
        self.folder, self.name, self.shown, self.after = folder, name, shown, after

    def sample(self, patched) -> list:
        """One image per sample prompt (Pillow) from the model with the adapter as it is now.

        Exactly what KSampler (euler, normal, the prompt's seed, steps and CFG) on an empty latent of the prompt's
        size, with CLIPTextEncode prompt and negative, then VAEDecode would give. The global random state is left
        as it was.
        """
        import comfy.sample
        from PIL import Image

        shape, ratio = self.step.data.latents.shape(), _downscale(self.vae)  # (channels, [frames,] height, width)
        device = patched.load_device
        self.network.eval()
        images = []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for p in self.prompts:
                    positive, negative = self.step.text.conditioning([p.prompt, p.negative], "cpu")
                    empty = torch.zeros((1, *shape[:-2], p.height // ratio, p.width // ratio))
                    latent = comfy.sample.fix_empty_latent_channels(patched, empty)
                    noise = comfy.sample.prepare_noise(latent, p.seed)
                    out = comfy.sample.sample(patched, noise, p.steps, p.cfg, "euler", "normal", positive, negative,
                                              latent, seed=p.seed, disable_pbar=True)
                    pixels = self.vae.decode(out)  # sample() already returns latents in the VAE's space
                    pixels = pixels.reshape(-1, *pixels.shape[-3:])[0].clamp(0, 1)
                    images.append(Image.fromarray((pixels.float().cpu().numpy() * 255).round().astype("uint8")))
        finally:
            self.network.train()
        return images

    def at_step(self, patched, step: int):
        """Sample the prompts at `step`: PNGs in the folder, and the preview grid when a node shows it."""
        if not self.prompts or (not self.shown and self.folder is None):
            return None
        images = self.sample(patched)
        self.after()
        if self.folder is not None:
            save_samples(images, self.folder, self.name, step)
        return preview_grid(images) if self.shown else None


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


def _downscale(vae) -> int:
    """Pixels per latent cell, as the VAE encodes."""
    return int(vae.spacial_compression_encode()) if hasattr(vae, "spacial_compression_encode") else 8


def held_out_loss(step: TrainingStep, network: LoraNetwork, patched, device, levels=(0.1, 0.3, 0.5, 0.7, 0.9),
                  seed: int = 1234) -> float:
    """Mean native-space MSE over the validation images at fixed noise levels and noise seeds."""
    items, data = step.dataset.validation, step.data
    if not items:
        return math.nan
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    training = network.training
    network.eval()  # the whole adapter: no dropout, DyLoRA at full rank
    with torch.no_grad():
        for index, item in enumerate(items):
            x0 = data.latents.get(index, validation=True)[None].to(device)
            conditioning = step.text.conditioning([step.text.fixed_caption(item)], device,
                                                  data.sample_values([index], [False], validation=True))
            low, high = step.expert_levels(patched, x0)  # an expert is judged on the levels it denoises
            for level in levels:
                noise = torch.randn(x0.shape, generator=gen).to(device)
                weights = data.masks.weights([item], [index], [False], True, data.latents, device)
                sigma = step.sigmas(patched, [low + (high - low) * level], x0)
                loss = step.loss(patched, x0, noise, sigma, conditioning, [image_geometry(item)], weights, None)
                total += loss.item()
                count += 1
    network.train(training)
    return total / count
