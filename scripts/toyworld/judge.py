"""The judge: a small CNN that reads colour, shape and background off a toy-world image.

Trained on toy-world images (all four shapes, the concept's plus included) and on the same kind of
images after a round trip through the base checkpoint's VAE, with noise added to the latents so that
imperfect samples still read as their nearest scene. Cached next to the checkpoint it was trained for.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from torch import nn

from . import VERSION, world

HEADS = {"colour": world.COLOUR_NAMES, "shape": world.SHAPES, "background": world.COLOUR_NAMES}


class JudgeNet(nn.Module):
    """32 px input (the images carry 8x8-cell detail after the VAE), three classification heads."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 64):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(nn.AvgPool2d(2), *layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(pixels)
        return {name: head(h) for name, head in self.heads.items()}


def _labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([labels.index(getattr(s, name)) for s in scenes]) for name, labels in HEADS.items()}


def _scenes(seed: int, count: int) -> list[world.Scene]:
    rng = random.Random(f"judge-{seed}")
    return [world.random_scene(rng, world.SHAPES) for _ in range(count)]


def round_trip(vae, pixels: torch.Tensor, latent_noise: float, seed: int, batch: int = 64) -> torch.Tensor:
    """Pixels [B, 3, H, W] through the host VAE (encode, noise in the model's latent scale, decode)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            chunk = pixels[start:start + batch].permute(0, 2, 3, 1)
            latent = vae.encode(chunk)
            noise = torch.randn(latent.shape, generator=gen) * latent_noise / 0.18215
            out.append(vae.decode(latent + noise).clamp(0, 1).permute(0, 3, 1, 2).float())
    return torch.cat(out)


class Judge:
    """Reads scenes off images; `accuracy` holds its held-out accuracy per head (clean and via the VAE)."""

    def __init__(self, net: JudgeNet, accuracy: dict | None = None):
        self.net = net.eval()
        self.accuracy = accuracy or {}

    def predict(self, pixels: torch.Tensor) -> list[world.Scene]:
        """Pixels [B, 3, H, W] in [0, 1] (64 px) -> the scene read off each image."""
        with torch.no_grad():
            logits = self.net(pixels.float())
        picks = {name: logits[name].argmax(1).tolist() for name in HEADS}
        return [world.Scene(*(HEADS[name][picks[name][i]] for name in HEADS)) for i in range(len(pixels))]

    def score(self, pixels: torch.Tensor, scenes: list[world.Scene]) -> dict[str, float]:
        got = self.predict(pixels)
        return {name: sum(getattr(g, name) == getattr(s, name) for g, s in zip(got, scenes, strict=True)) / len(scenes)
                for name in HEADS}


def judge_path(checkpoint: Path, seed: int) -> Path:
    return checkpoint.with_name(f"judge-v{VERSION}-s{seed}-{checkpoint.stem}.safetensors")


def train_judge(checkpoint: Path, seed: int = 0, steps: int = 400, count: int = 1536, log=print) -> Judge:
    """Train a judge for the VAE of `checkpoint` (cached beside it; a cached one is loaded)."""
    from harness.comfy import setup_inprocess
    from safetensors.torch import load_file, save_file

    from .pretrain import to_pixels

    path = judge_path(checkpoint, seed)
    net = JudgeNet()
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            accuracy = {k: float(v) for k, v in f.metadata().items()}
        net.load_state_dict(load_file(str(path)))
        return Judge(net, accuracy)
    setup_inprocess()
    import comfy.sd

    started = time.monotonic()
    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_model=False, output_clip=False)
    scenes = _scenes(seed, count + 256)
    clean = to_pixels(world.images(scenes, seed))
    trip = round_trip(vae, clean, 0.15, seed)
    train_x = torch.cat([clean[:count], trip[:count]])
    train_y = {k: torch.cat([v[:count], v[:count]]) for k, v in _labels(scenes).items()}
    log(f"  judge: {len(train_x)} training images ready ({time.monotonic() - started:.0f}s)")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (64,), generator=gen)
        logits = net(train_x[idx])
        loss = sum(nn.functional.cross_entropy(logits[k], train_y[k][idx]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    judge = Judge(net)
    held_out = scenes[count:]
    accuracy = {f"clean_{k}": v for k, v in judge.score(clean[count:], held_out).items()}
    accuracy.update({f"vae_{k}": v for k, v in judge.score(trip[count:], held_out).items()})
    judge.accuracy = accuracy
    save_file(net.state_dict(), str(path), metadata={k: str(v) for k, v in accuracy.items()})
    log(f"  judge trained in {time.monotonic() - started:.0f}s; held-out accuracy {accuracy}")
    return judge
