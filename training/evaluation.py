"""What a run shows while it trains: preview images sampled as KSampler would, and the held-out loss."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .conditioning import image_geometry

if TYPE_CHECKING:
    from .trainer import Trainer


def sample(trainer: Trainer, patched, step: int):
    """A preview grid (one image per sample prompt) from the model with the adapter as it is now.

    Exactly what KSampler (euler, normal, seed + i) on an empty latent of the first bucket's size,
    with CLIPTextEncode prompts and an empty negative, then VAEDecode would give.
    """
    import comfy.sample
    from PIL import Image

    cfg = trainer.config
    width, height = trainer.dataset.items[0].bucket
    empty = torch.zeros((1, *trainer.latents.shape()))
    trainer.network.eval()
    images = []
    try:
        with torch.no_grad():
            negative = trainer.conditioning([""], "cpu")[0]
            for i, prompt in enumerate(cfg.sample_prompts):
                positive = trainer.conditioning([prompt], "cpu")[0]
                latent = comfy.sample.fix_empty_latent_channels(patched, empty)
                noise = comfy.sample.prepare_noise(latent, cfg.seed + i)
                out = comfy.sample.sample(patched, noise, cfg.sample_steps, cfg.sample_cfg, "euler", "normal",
                                          positive, negative, latent, seed=cfg.seed + i, disable_pbar=True)
                pixels = trainer.vae.decode(out)  # sample() already returns latents in the VAE's space
                pixels = pixels.reshape(-1, *pixels.shape[-3:])[0].clamp(0, 1)
                images.append(Image.fromarray((pixels.float().cpu().numpy() * 255).round().astype("uint8")))
    finally:
        trainer.network.train()
    grid = Image.new("RGB", (width * len(images), height))
    for i, img in enumerate(images):
        grid.paste(img, (i * width, 0))
    return grid


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
            conditioning = trainer.conditioning([trainer.fixed_caption(item)], device)
            for level in levels:
                noise = torch.randn(x0.shape, generator=gen).to(device)
                loss = trainer.loss(patched, x0, noise, trainer.sigmas(patched, [level], x0), conditioning,
                                    [image_geometry(item)], torch.ones(1, device=device), None)
                total += loss.item()
                count += 1
    trainer.network.train(training)
    return total / count
