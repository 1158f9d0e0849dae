"""A 4-bit base (QLoRA, OneTrainer's NF4): the diffusion model's Linear weights held in NF4 while a run trains.

On the training clone only, through ModelPatcher object patches: each Linear layer's `weight` becomes its NF4 form
(bitsandbytes' packed 4-bit tensor: what the host moves to the device, a quarter of bf16's bytes) and its `forward`
dequantizes that at each call into the input's dtype. The model's own weights are never changed and never moved to
the device by the run; adapters attached in bypass mode take the 4-bit forward as their layer's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...lora_core.adapters.base import stored_weight
from ...lora_core.network import BypassForward

QUANTIZATIONS = ("none", "nf4")
BLOCK_SIZE = 64  # values per absmax scale: bitsandbytes' and QLoRA's default


class NF4Forward:
    """A Linear layer's forward from its weight in NF4 (the layer's `weight` while patched), dequantized per call."""

    def __init__(self, layer: nn.Module, state):
        self.layer, self.state = layer, state

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's weight dequantized on `x`'s device in its dtype (what adapters reading the weight get)."""
        from bitsandbytes.functional import dequantize_4bit

        packed = self.layer.weight
        if packed.device != x.device:  # left in RAM by a partial load: the 4-bit form streams in
            packed = packed.to(x.device)
        if self.state.absmax.device != x.device:
            self.state.to(x.device)  # its scales follow it once
        return dequantize_4bit(packed, self.state).to(x.dtype)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        bias = self.layer.bias
        return F.linear(x, self.weight_for(x), bias.to(x) if bias is not None else None)


def check_device(device: torch.device) -> None:
    """Refuse a device bitsandbytes has no 4-bit kernel for, naming it, before anything is quantized."""
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        packed, state = quantize_4bit(torch.ones(BLOCK_SIZE, dtype=torch.bfloat16, device=device),
                                      blocksize=BLOCK_SIZE, quant_type="nf4")
        dequantize_4bit(packed, state)
    except (ImportError, NotImplementedError, RuntimeError) as error:
        raise ValueError(f"base_quantization nf4: bitsandbytes has no 4-bit kernel for {device} ({error}); set "
                         "base_quantization none (an fp8 weight_dtype in Load Diffusion Model also saves memory)"
                         ) from error


def quantize_base(patcher, device: torch.device) -> int:
    """Hold every Linear layer of `patcher`'s diffusion model (a training clone) in NF4 through object patches, the
    quantizing done on `device`; a bypass adapter already on a layer computes from the 4-bit forward. Returns the
    bytes the device no longer needs for those weights."""
    from bitsandbytes.functional import quantize_4bit

    check_device(device)
    saved = 0
    for path, layer in patcher.model.diffusion_model.named_modules():
        if not isinstance(layer, nn.Linear) or layer.weight.numel() % BLOCK_SIZE:
            continue
        weight = stored_weight(layer).to(device, torch.bfloat16)
        packed, state = quantize_4bit(weight, blocksize=BLOCK_SIZE, quant_type="nf4")
        key = f"diffusion_model.{path}"
        patcher.add_object_patch(f"{key}.weight", nn.Parameter(packed.cpu(), requires_grad=False))
        forward = NF4Forward(layer, state)
        bypass = patcher.object_patches.get(f"{key}.forward")
        if isinstance(bypass, BypassForward):
            bypass.base = forward
        else:
            patcher.add_object_patch(f"{key}.forward", forward)
        saved += layer.weight.numel() * layer.weight.element_size() - packed.numel() - 4 * state.absmax.numel()
    return saved
