"""Which layers get adapters: presets people know, plus include/exclude patterns.

Works on any model ComfyUI loads by walking its modules and looking at layer types and the
class names of the blocks around them; nothing is hard-coded to one architecture.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

PRESETS = ("attention", "kohya", "locon", "all")

# Blocks kohya adapts by default: diffusion transformer blocks and text-encoder layers.
TRANSFORMER_BLOCKS = {
    "SpatialTransformer", "SpatialVideoTransformer", "BasicTransformerBlock",  # SD1/SD2/SDXL, LTX-Video
    "DoubleStreamBlock", "SingleStreamBlock",  # Flux, Chroma, HunyuanVideo
    "JointBlock", "DismantledBlock",  # SD3
    "QwenImageTransformerBlock",  # Qwen-Image
    "JointTransformerBlock",  # Lumina 2 / Z-Image
    "WanAttentionBlock",  # Wan 2.1 / 2.2 (and its VACE / audio subclasses)
    "CLIPAttention", "CLIPMLP",  # CLIP text encoders
}
# Blocks LoCon adds: residual blocks and resamplers.
CONV_BLOCKS = {"ResBlock", "Downsample", "Upsample", "VideoResBlock"}
ATTENTION_LAYER = re.compile(
    r"(^|\.)(attn\d?|attention|self_attn|cross_attn|img_attn|txt_attn|SelfAttention)\."
    r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|q_proj|k_proj|v_proj|out_proj"
    r"|qkv|proj|out|q|k|v|o)$"
)
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_kind(module: nn.Module) -> str:
    """'linear', 'conv1x1' or 'conv' (kxk); kohya gives kxk convs their own rank (conv_dim)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if all(k == 1 for k in module.kernel_size):
        return "conv1x1"
    return "conv"


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(path, p) for p in patterns)


def find_layers(
    root: nn.Module,
    preset: str = "kohya",
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[tuple[str, nn.Module]]:
    """(module path, layer) pairs under `root` chosen by `preset`, plus `include`, minus `exclude` globs."""
    if preset not in PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; choose one of {', '.join(PRESETS)}")
    include, exclude = list(include), list(exclude)
    modules = dict(root.named_modules())
    chosen = []
    for path, module in modules.items():
        if not isinstance(module, ADAPTABLE) or module.weight is None:
            continue
        parts = path.split(".")
        blocks = {cls.__name__ for i in range(1, len(parts)) for cls in type(modules[".".join(parts[:i])]).__mro__}
        kind = layer_kind(module)
        if preset == "attention":
            picked = kind == "linear" and ATTENTION_LAYER.search(path) is not None
        elif preset == "kohya":
            picked = kind != "conv" and bool(blocks & TRANSFORMER_BLOCKS)
        elif preset == "locon":
            picked = (kind != "conv" and bool(blocks & TRANSFORMER_BLOCKS)) or bool(blocks & CONV_BLOCKS)
        else:
            picked = True
        if (picked or _matches(path, include)) and not _matches(path, exclude):
            chosen.append((path, module))
    return chosen


def text_encoders(cond_stage_model: nn.Module) -> dict[str, nn.Module]:
    """The text encoders inside a ComfyUI CLIP's cond_stage_model, by attribute name (clip_l, clip_g, t5xxl...)."""
    found = {}
    for name, child in cond_stage_model.named_children():
        if hasattr(child, "transformer"):
            found[name] = child
    return found or {"": cond_stage_model}


def block_lists(diffusion_model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's own lists of blocks (Flux double_blocks / single_blocks, Wan blocks, UNet input_blocks...)."""
    return [(name, child) for name, child in diffusion_model.named_children()
            if isinstance(child, nn.ModuleList) and len(child) and any(True for _ in child.parameters())]
