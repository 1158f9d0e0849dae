"""kohya module names (`lora_unet_*`, `lora_te*_*`) for the host's modules.

SD1/SD2 UNet names follow the diffusers layout (kohya trains those through diffusers);
every other model (SDXL, SD3, Flux, ...) is named after its own module path, as kohya's
trainers for them do. Text encoders: `lora_te_` when there is one, else `lora_te1_`,
`lora_te2_`, ... in the order clip_l, clip_g, clip_h, t5xxl.
"""

from __future__ import annotations

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_ORDER = ("clip_l", "clip_g", "clip_h", "t5xxl", "t5xl", "t5base", "llama", "qwen25_7b", "gemma")
DIFFUSERS_NAMED = ("SD15", "SD20", "SD21UnclipL", "SD21UnclipH", "SD_X4Upscaler")


def underscored(path: str) -> str:
    return path.replace(".", "_")


def uses_diffusers_names(model_config) -> bool:
    """kohya names SD1/SD2 UNets after the diffusers layout; others after their own modules."""
    return type(model_config).__name__ in DIFFUSERS_NAMED


def unet_names(model_config, module_paths: list[str]) -> dict[str, str]:
    """{ComfyUI module path under diffusion_model: kohya name} for the given modules."""
    if not uses_diffusers_names(model_config):
        return {p: UNET_PREFIX + underscored(p) for p in module_paths}
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)
    to_diffusers = {v[: -len(".weight")]: k[: -len(".weight")] for k, v in to_ldm.items() if k.endswith(".weight")}
    names = {}
    for path in module_paths:
        diffusers = to_diffusers.get(path)
        if diffusers is None:
            raise KeyError(f"no diffusers name for UNet module {path!r}")
        names[path] = UNET_PREFIX + underscored(diffusers)
    return names


def text_encoder_prefixes(encoder_names: list[str]) -> dict[str, str]:
    """{encoder attribute (clip_l, clip_g, ...): kohya prefix}."""
    ordered = sorted(encoder_names, key=lambda n: TEXT_ENCODER_ORDER.index(n) if n in TEXT_ENCODER_ORDER else 99)
    if len(ordered) == 1:
        return {ordered[0]: "lora_te_"}
    return {name: f"lora_te{i}_" for i, name in enumerate(ordered, start=1)}


def text_encoder_name(prefix: str, module_path: str) -> str:
    """`clip_l.transformer.text_model.encoder.layers.0.mlp.fc1` -> `<prefix>text_model_encoder_layers_0_mlp_fc1`."""
    encoder, _, rest = module_path.partition(".")
    rest = rest[len("transformer."):] if rest.startswith("transformer.") else rest
    return prefix + underscored(rest)
