"""Pretrain the flow-matching toy-world base: one checkpoint that CheckpointLoaderSimple detects as SD3.

Usage (from scripts/): ../.venv/bin/python -m toyworld.flow [--seed 0] [--steps N] [--force]

The diffusion model is the host's MMDiT (SD3's layout, reduced: `depth` joint blocks of width 64 * depth)
trained on the rectified-flow objective SD3 samples with (x_t = (1 - s) x0 + s noise, velocity target
noise - x0, s drawn logit-normal), 10% caption dropout (for CFG) and an EMA of its weights. The text
encoder is the SD1.5 toy's seeded CLIP-L stored as SD3's clip_l, frozen; its outputs for every caption are
computed once by ComfyUI's own SD3 text-encoder code (CLIP-L penultimate layer padded to 4096 wide, pooled
output padded to 2048), exactly as CLIPTextEncode computes them. The VAE is the toy's hand-set TAESD at
16 latent channels (taesd3's shape) with SD3's latent scale and shift.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import fixtures
from harness.comfy import setup_inprocess

from . import VERSION, world
from .pretrain import base_parts, cache_dir, fixed_threads, optimise, save_base, training_images

CHANNELS = 16
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609  # comfy.latent_formats.SD3
GRID = 16  # pos_embed covers latents up to 32x32 (256 px)


@dataclass(frozen=True)
class FlowConfig:
    depth: int = 4
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.99
    caption_dropout: float = 0.1
    pool: int = 8192  # distinct training images


DEFAULT = FlowConfig()
# Bumped with DEFAULT, so a base cached under an older default is not taken for this one. 2: 600 steps (was 1200;
# the base follows prompts 1.00 / 1.00 / 1.00 either way, and CI pretrains it in half the time).
REVISION = 2


def checkpoint_path(seed: int = 0, config: FlowConfig = DEFAULT) -> Path:
    tag = "" if config == DEFAULT else f"-{abs(hash(config)) % 10**8:08d}"
    return cache_dir() / f"toyworld-sd3-v{VERSION}r{REVISION}-s{seed}{tag}.safetensors"


def mmdit_config(depth: int) -> dict:
    hidden = 64 * depth
    return {"in_channels": CHANNELS, "out_channels": CHANNELS, "patch_size": 2, "depth": depth, "input_size": None,
            "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": hidden}},
            "num_patches": GRID * GRID, "pos_embed_max_size": GRID, "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": []}


def build_mmdit(depth: int, seed: int):
    """The host's SD3 diffusion model at `depth`, seeded; its sin-cos position table filled as checkpoints hold it."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.supported_models
    import torch
    from harness.families import _new_model

    model = _new_model(comfy.supported_models.SD3, mmdit_config(depth), seed).diffusion_model
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(mmdit.get_2d_sincos_pos_embed(64 * depth, GRID)).float()[None])
    return model


def checkpoint_dict(unet_sd: dict, clip_sd: dict, vae_sd: dict) -> dict:
    sd = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    sd.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip_sd.items()})
    sd.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    return sd


def encode_captions(sd: dict, captions: list[str], seed: int, log=print) -> dict:
    """{caption: (cond [77, 4096], pooled [2048])} through the host's checkpoint loader and SD3 text encoder.

    Cached per CLIP seed without the zero padding the host adds (checked here), which is put back on load.
    """
    import comfy.sd
    import torch
    from safetensors.torch import load_file

    path = cache_dir() / f"captions-sd3-v{VERSION}-s{seed}.safetensors"
    cached = load_file(str(path)) if path.exists() else {}
    missing = [c for c in captions if f"cond:{c}" not in cached]
    if missing:
        # A copy: the host's loader takes the keys it loads out of the dict it is given.
        _, clip, _, _ = comfy.sd.load_state_dict_guess_config(dict(sd), output_vae=False, output_model=False,
                                                              te_model_options={"dtype": torch.float32})
        with torch.no_grad():
            for i, c in enumerate(missing):
                cond, pooled = clip.encode_from_tokens(clip.tokenize(c), return_pooled=True)
                cond, pooled = cond.float()[0], pooled.float()[0]
                if cond.shape != (77, 4096) or cond[:, 768:].abs().max() > 0 or pooled[768:].abs().max() > 0:
                    raise RuntimeError(f"unexpected SD3 CLIP-L conditioning for {c!r}: {tuple(cond.shape)}")
                cached[f"cond:{c}"], cached[f"pooled:{c}"] = cond[:, :768].clone(), pooled[:768].clone()
                if (i + 1) % 40 == 0:
                    log(f"  {i + 1}/{len(missing)} captions encoded")
        fixtures._save_atomic(cached, path)
    pad = torch.nn.functional.pad
    return {c: (pad(cached[f"cond:{c}"], (0, 4096 - 768)), pad(cached[f"pooled:{c}"], (0, 2048 - 768)))
            for c in captions}


def train_flow(model, latents, cond_index, conds, pooled, cfg: FlowConfig, seed: int, log=print) -> list[float]:
    """The rectified-flow loop (velocity target); leaves the EMA weights in `model`, returns the losses."""
    import torch

    empty = len(conds) - 1  # the last conditioning is the empty prompt

    def batch_loss(gen, rng):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[idx]
        ci = [empty if rng.random() < cfg.caption_dropout else int(cond_index[i]) for i in idx]
        s = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen)).view(-1, 1, 1, 1)  # logit-normal levels
        noise = torch.randn(x0.shape, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            velocity = model((1 - s) * x0 + s * noise, s.flatten() * 1000, y=pooled[ci], context=conds[ci])
        return ((velocity.float() - (noise - x0)) ** 2).mean()

    model.train()
    return optimise(list(model.parameters()), batch_loss, cfg, seed, log)


@fixed_threads()
def pretrain(seed: int = 0, config: FlowConfig = DEFAULT, force: bool = False, log=print) -> Path:
    """The cached flow base checkpoint for `seed`, pretrained now if it is not on disk."""
    path = checkpoint_path(seed, config)
    if path.exists() and not force:
        return path
    setup_inprocess()
    import torch

    started = time.monotonic()
    torch.manual_seed(seed)
    log(f"toy world (flow): pretraining the base model ({config.steps} steps of {config.batch_size}) -> {path}")
    stats, vae_sd, clip_sd = base_parts(seed, CHANNELS, SD3_SCALE, SD3_SHIFT)
    model = build_mmdit(config.depth, seed)
    captions = world.all_captions()
    encoded = encode_captions(checkpoint_dict(model.state_dict(), clip_sd, vae_sd), captions + [""], seed, log)
    conds = torch.stack([encoded[c][0] for c in captions + [""]])
    pooled = torch.stack([encoded[c][1] for c in captions + [""]])
    log(f"  {len(captions)} captions encoded ({time.monotonic() - started:.0f}s)")
    latents, cond_index = training_images(seed, config.pool, stats, captions, CHANNELS)
    log(f"  {len(latents)} images encoded ({time.monotonic() - started:.0f}s)")
    losses = train_flow(model, latents, cond_index, conds, pooled, config, seed, log)
    unet_sd = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    info = {"version": VERSION, "family": "sd3", "seed": seed, "config": asdict(config), "latent_stats": stats}
    return save_base(path, checkpoint_dict(unet_sd, clip_sd, vae_sd), info, losses, started, "toy world (flow)", log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT.steps)
    parser.add_argument("--depth", type=int, default=DEFAULT.depth)
    parser.add_argument("--lr", type=float, default=DEFAULT.learning_rate)
    parser.add_argument("--force", action="store_true", help="pretrain again even if it is cached")
    args = parser.parse_args()
    config = FlowConfig(depth=args.depth, steps=args.steps, learning_rate=args.lr)
    print(pretrain(args.seed, config, force=args.force, log=lambda m: print(m, flush=True)))


if __name__ == "__main__":
    main()
