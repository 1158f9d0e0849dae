"""A TAESD-shaped VAE set by hand: the encoder is an exact 8x8 average pool, the decoder a nearest upsample.

Training a TAESD from random weights is too slow on a CPU; the toy world's images are plain colours, so
an 8x8 average pool keeps what matters (colours, and shapes in the partial-coverage cells). Latent
channels: r, g, b and luma, each minus 0.5. vae_scale / vae_shift make the latents unit-variance after
SD1.5's 0.18215 factor, the way the host scales them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SD15_SCALE_FACTOR = 0.18215


def _zero_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def _center_(conv: torch.nn.Conv2d, mapping: dict[int, dict[int, float]], bias: dict[int, float] | None = None):
    """Set a conv to a per-pixel linear map: out channel o = sum(w * in channel i) + bias."""
    with torch.no_grad():
        conv.weight.zero_()
        k = conv.weight.shape[-1] // 2
        for o, row in mapping.items():
            for i, w in row.items():
                conv.weight[o, i, k, k] = w
        if conv.bias is not None:
            conv.bias.zero_()
            for o, b in (bias or {}).items():
                conv.bias[o] = b


def _pool2_(conv: torch.nn.Conv2d) -> None:
    """A 3x3 stride-2 padding-1 conv as a 2x2 average pool on channels 0-2 (taps at offsets 1 and 2)."""
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c, 1:, 1:] = 0.25


def build(latent_stats: tuple[float, float] | None = None, channels: int = 4, scale_factor: float = SD15_SCALE_FACTOR,
          shift_factor: float = 0.0):
    """The host's TAESD module with hand-set weights; `latent_stats` = (mean, std) of the raw latents.

    With 16 `channels` (the SD3 / Flux latent width, taesd3's shape) channels 4-15 stay zero; `scale_factor` and
    `shift_factor` are the latent format's, so the model sees unit-variance latents after process_latent_in.
    """
    import comfy.taesd.taesd as taesd_module

    vae = taesd_module.TAESD(latent_channels=channels)
    _zero_(vae)
    enc, dec = vae.taesd_encoder, vae.taesd_decoder
    # Encoder: conv(3, 64), Block, [stride-2 conv, 3 Blocks] x 3, conv(64, 4). Zeroed Blocks are ReLU,
    # the identity on the non-negative pixels the host feeds in ([0, 1]).
    _center_(enc[0], {c: {c: 1.0} for c in range(3)})
    for index in (2, 6, 10):
        _pool2_(enc[index])
    third = 1.0 / 3.0
    _center_(enc[14], {0: {0: 1.0}, 1: {1: 1.0}, 2: {2: 1.0}, 3: {0: third, 1: third, 2: third}},
             bias={0: -0.5, 1: -0.5, 2: -0.5, 3: -0.5})
    # Decoder: Clamp, conv(4, 64), ReLU, 3 Blocks, [Upsample, conv, 3 Blocks] x 3 (the last has 1), conv(64, 3).
    _center_(dec[1], {c: {c: 1.0} for c in range(3)}, bias={0: 0.5, 1: 0.5, 2: 0.5})
    # A blur here would look smoother, but the convs pad with zeros and would darken the borders.
    for index in (7, 12, 17):
        _center_(dec[index], {c: {c: 1.0} for c in range(3)})
    _center_(dec[19], {c: {c: 1.0} for c in range(3)})
    mean, std = latent_stats or (0.0, 1.0 / scale_factor)
    with torch.no_grad():
        vae.vae_scale.fill_(scale_factor * std)
        vae.vae_shift.fill_(shift_factor - mean / (scale_factor * std))
    return vae


def raw_latents(pixels: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """What the encoder computes, fast: pixels [B, 3, H, W] in [0, 1] -> [B, channels, H/8, W/8]."""
    rgb = F.avg_pool2d(pixels, 8) - 0.5
    latents = torch.cat([rgb, rgb.mean(1, keepdim=True)], dim=1)
    return F.pad(latents, (0, 0, 0, 0, 0, channels - 4))


def model_latents(pixels: torch.Tensor, stats: tuple[float, float], channels: int = 4) -> torch.Tensor:
    """The latents the diffusion model sees (after the host's process_latent_in); `stats` of the 4 live channels."""
    mean, std = stats
    return (raw_latents(pixels, channels) - mean) / std
