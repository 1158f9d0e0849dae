"""Models and datasets for tests, generated from a seed and cached on disk (never committed).

- `tiny_sd15_checkpoint`: one safetensors that ComfyUI's CheckpointLoaderSimple detects as
  SD1.5: a UNet with SD1.5's model_channels (320) and context (768) but one level, one res
  block and one transformer block; a TAESD-shaped VAE; a full-size CLIP-L (random, fp16).
- `tiny_sd15_parts`: the same weights as separate UNet / CLIP / VAE files.
- `concept_dataset`: a few dozen small images with .txt captions in kohya folder layout.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from .comfy import REPO_ROOT, setup_inprocess

FIXTURE_VERSION = 3
SD15_TINY_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "legacy": False,
}


def cache_dir() -> Path:
    path = Path(os.environ.get("LORA_FOUNDRY_CACHE", REPO_ROOT / ".cache" / "fixtures"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def init_weights_(module, seed: int, std: float = 0.02) -> None:
    """Deterministic init: ComfyUI builds layers without initialising them (uninitialised memory)."""
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, norms) and m.weight is not None}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if id(p) in norm_weights:
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.zero_()


def build_unet(seed: int = 0, config: dict | None = None, dtype=None):
    """A ComfyUI UNetModel with SD1.5 widths (or `config`), deterministically initialised."""
    setup_inprocess()
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**(config or SD15_TINY_UNET), dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    init_weights_(unet, seed)
    return unet.to(dtype) if dtype is not None else unet


def build_clip_l(seed: int = 0):
    setup_inprocess()
    import json

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import torch

    config = json.loads((Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json").read_text())
    clip = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    init_weights_(clip, seed + 1)
    return clip


def build_taesd(seed: int = 0):
    setup_inprocess()
    import comfy.taesd.taesd
    import torch

    vae = comfy.taesd.taesd.TAESD()
    init_weights_(vae, seed + 2, std=0.05)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
    return vae


def _parts_state_dicts(seed: int):
    import torch

    unet = {k: v.to(torch.float16) for k, v in build_unet(seed).state_dict().items()}
    clip = {k: v.to(torch.float16) for k, v in build_clip_l(seed).state_dict().items()}
    vae = {k: v.to(torch.float16) for k, v in build_taesd(seed).state_dict().items()}
    return unet, clip, vae


def tiny_sd15_parts(seed: int = 0) -> dict[str, Path]:
    """Separate files: {"unet": ..., "clip": ..., "vae": ...} (UNETLoader / CLIPLoader / VAELoader)."""
    base = cache_dir()
    paths = {
        "unet": base / f"tiny-sd15-unet-s{seed}-v{FIXTURE_VERSION}.safetensors",
        "clip": base / f"tiny-sd15-clip-l-s{seed}-v{FIXTURE_VERSION}.safetensors",
        "vae": base / f"tiny-sd15-taesd-s{seed}-v{FIXTURE_VERSION}.safetensors",
    }
    if not all(p.exists() for p in paths.values()):
        unet, clip, vae = _parts_state_dicts(seed)
        _save_atomic(unet, paths["unet"])
        _save_atomic(clip, paths["clip"])  # as clip_l.safetensors files are: text_model.* keys
        _save_atomic(vae, paths["vae"])
    return paths


def tiny_sd15_checkpoint(seed: int = 0) -> Path:
    """One SD1.5-layout checkpoint (UNet + CLIP-L + TAESD VAE) that CheckpointLoaderSimple loads."""
    path = cache_dir() / f"tiny-sd15-s{seed}-v{FIXTURE_VERSION}.safetensors"
    if not path.exists():
        unet, clip, vae = _parts_state_dicts(seed)
        sd = {"model.diffusion_model." + k: v for k, v in unet.items()}
        sd.update({"cond_stage_model.transformer." + k: v for k, v in clip.items()})
        sd.update({"first_stage_model." + k: v for k, v in vae.items()})
        _save_atomic(sd, path, metadata={"lora_foundry_fixture": f"tiny-sd15 seed {seed}"})
    return path


# --- datasets ---------------------------------------------------------------------------

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30), "teal": (30, 150, 150), "white": (245, 245, 245),
}


def draw_shape(size: tuple[int, int], shape: str, colour, background, rng: random.Random,
               radius: tuple[float, float] = (0.25, 0.35), jitter: float = 0.1):
    """A plain background with one jittered shape (circle, square, triangle or plus).

    `radius` is the range of the shape's radius and `jitter` the centre's offset range, as fractions of the size.
    """
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(*radius)
    cx = w / 2 + rng.uniform(-jitter, jitter) * w
    cy = h / 2 + rng.uniform(-jitter, jitter) * h
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=colour)
    elif shape == "plus":
        t = r / 3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


CONCEPT_PAIRS = (("red", "blue"), ("yellow", "purple"), ("green", "white"), ("orange", "teal"))  # (shape, background)
DATASET_REVISION = "p4"  # the colour pairs (was: any colour on any other)


def concept_dataset(seed: int = 0, count: int = 24, repeats: int = 10, token: str = "sks circle") -> Path:
    """A kohya-layout folder `<root>/<repeats>_<token>/` of small images with .txt captions.

    Mixed aspect ratios (64x64, 64x96, 96x64) so bucketing has something to do. The colours come in four pairs:
    four distinct captions, so a run encodes four (on a CPU the CLIP-L forward was 40% of test_train.py with 21).
    """
    root = cache_dir() / f"dataset-concept-s{seed}-n{count}-v{FIXTURE_VERSION}-{DATASET_REVISION}"
    folder = root / f"{repeats}_{token}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return root
    rng = random.Random(seed)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    sub = tmp / folder.name
    sub.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (64, 96), (96, 64)]
    for i in range(count):
        colour, background = CONCEPT_PAIRS[i % len(CONCEPT_PAIRS)]
        img = draw_shape(sizes[i % len(sizes)], "circle", COLOURS[colour], COLOURS[background], rng)
        img.save(sub / f"img_{i:03d}.png")
        (sub / f"img_{i:03d}.txt").write_text(f"{token}, {colour} circle, {background} background")
    import shutil

    if root.exists() and not (folder.is_dir() and len(list(folder.glob("*.png"))) == count):
        shutil.rmtree(root, ignore_errors=True)  # an unfinished one from an older version
    try:
        os.replace(tmp, root)
    except OSError:  # another process (an xdist worker) finished the same dataset first: use that one
        shutil.rmtree(tmp)
    return root
