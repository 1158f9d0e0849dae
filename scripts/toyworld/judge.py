"""The judge: a small CNN that reads colour, shape and background off a toy-world image.

Trained on toy-world images (all four shapes, the concept's plus included) and on the same kind of
images decoded by the base checkpoint's VAE from their latents, with noise added to the latents so
that imperfect samples still read as their nearest scene. Cached next to the checkpoint it was trained for.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from torch import nn

from . import VERSION, world
from .pretrain import fixed_threads

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


def vae_decoded(vae, pixels: torch.Tensor, stats: tuple[float, float], latent_noise: float, seed: int,
                latent_format=None, batch: int = 64) -> torch.Tensor:
    """Pixels [B, 3, H, W] as the host VAE decodes their latents, with noise added in the model's latent scale.

    The toy VAE's encoder is an exact average pool (toyworld.vae.model_latents computes it, and a test checks
    they agree), so only the decoder, the part every sample goes through, runs here. `latent_format` is the
    host's for the checkpoint's family (default SD1.5's).
    """
    import comfy.latent_formats

    from .vae import model_latents

    latent_format = latent_format or comfy.latent_formats.SD15()
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            latent = model_latents(pixels[start:start + batch], stats, latent_format.latent_channels)
            latent = latent + torch.randn(latent.shape, generator=gen) * latent_noise
            raw = latent_format.process_out(latent)
            out.append(vae.decode(raw).clamp(0, 1).permute(0, 3, 1, 2).float())
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


def toyworld_info(checkpoint: Path) -> dict:
    """What the toy base was built with (its metadata): latent stats, family, config."""
    import json

    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        meta = f.metadata() or {}
    if "toyworld" not in meta:
        raise ValueError(f"{checkpoint} is not a toy-world checkpoint (no toyworld metadata)")
    return json.loads(meta["toyworld"])


def stored_latent_stats(checkpoint: Path) -> tuple[float, float]:
    """The raw-latent mean and std the toy base was built with."""
    return tuple(toyworld_info(checkpoint)["latent_stats"])


def latent_format_of(checkpoint: Path):
    """The host's latent format for the toy base's family."""
    import comfy.latent_formats

    return comfy.latent_formats.SD3() if toyworld_info(checkpoint).get("family") == "sd3" else comfy.latent_formats.SD15()


@fixed_threads()
def train_judge(checkpoint: Path, seed: int = 0, steps: int = 400, count: int = 1024, decoded: int = 768,
                held_out: int = 256, log=print) -> Judge:
    """Train a judge for the VAE of `checkpoint` on `count` clean and `decoded` VAE-decoded images.

    Cached beside the checkpoint; a cached one is loaded. Its held-out accuracy is in `Judge.accuracy`.
    """
    from harness import fixtures
    from harness.comfy import setup_inprocess
    from safetensors.torch import load_file

    from .pretrain import to_pixels

    path = judge_path(checkpoint, seed)
    torch.manual_seed(seed)  # the same judge in every process, whatever ran before
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
    stats = stored_latent_stats(checkpoint)
    scenes = _scenes(seed, count + decoded + held_out)
    clean = to_pixels(world.images(scenes, seed))
    through_vae = vae_decoded(vae, clean[count:], stats, 0.15, seed, latent_format_of(checkpoint))
    train_x = torch.cat([clean[:count], through_vae[:decoded]])
    train_y = {k: v[:count + decoded] for k, v in _labels(scenes).items()}
    log(f"  judge: {len(train_x)} training images ready ({time.monotonic() - started:.0f}s)")
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
    rest = scenes[count + decoded:]
    accuracy = {f"clean_{k}": v for k, v in judge.score(clean[count + decoded:], rest).items()}
    accuracy.update({f"vae_{k}": v for k, v in judge.score(through_vae[decoded:], rest).items()})
    judge.accuracy = accuracy
    fixtures._save_atomic(net.state_dict(), path, metadata={k: str(v) for k, v in accuracy.items()})
    log(f"  judge trained in {time.monotonic() - started:.0f}s; held-out accuracy {accuracy}")
    return judge
