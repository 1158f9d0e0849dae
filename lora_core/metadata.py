"""Metadata written into adapter files: kohya `ss_*` keys, `modelspec.*`, and our own config."""

from __future__ import annotations

import json
import time

# (modelspec.architecture, ss_base_model_version) by the host's model config class, the names kohya
# sd-scripts and musubi-tuner write; subclasses (KOALA, Vega, SSD-1B are SDXL) take their base's.
FAMILIES = {
    "SD15": ("stable-diffusion-v1", "sd_v1"), "SD20": ("stable-diffusion-v2-768-v", "sd_v2"),
    "SDXL": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"), "SD3": ("stable-diffusion-3-medium", "sd3"),
    "FluxSchnell": ("flux-1-schnell", "flux1"), "Flux": ("flux-1-dev", "flux1"), "Chroma": ("chroma", "chroma"),
    "QwenImage": ("qwen-image", "qwen_image"), "ZImage": ("z-image", "z_image"), "Lumina2": ("lumina-2", "lumina2"),
    "WAN22_T2V": ("wan2.2-t2v", "wan22"), "WAN21_I2V": ("wan2.1-i2v", "wan21"), "WAN21_T2V": ("wan2.1-t2v", "wan21"),
    "HunyuanVideo": ("hunyuan-video", "hunyuan_video"), "LTXV": ("ltx-video", "ltxv"),
}
NETWORK_MODULES = {"lora": "networks.lora", "locon": "networks.lora", "loha": "lycoris.kohya",
                   "lokr": "lycoris.kohya", "dylora": "networks.dylora"}


def model_family(model_config) -> tuple[str, str]:
    """(modelspec.architecture, ss_base_model_version) of a host model config; its class name if unknown."""
    for cls in type(model_config).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    name = type(model_config).__name__
    return name.lower(), name.lower()


def base_model_version(model_config) -> str:
    return model_family(model_config)[1]


def kohya_metadata(network_config, model_config=None, title: str = "", training: dict | None = None,
                   tag_frequency: dict | None = None) -> dict[str, str]:
    """String-valued metadata other tools read: `ss_*` (kohya), `modelspec.*`, and our full config."""
    training = dict(training or {})
    architecture = model_family(model_config)[0] if model_config is not None else ""
    algo = network_config.algorithm
    args = {}
    if algo in ("loha", "lokr"):
        args["algo"] = algo
    if network_config.conv_rank or network_config.preset == "locon":
        args["conv_dim"] = str(network_config.conv_rank or network_config.rank)
        args["conv_alpha"] = str(network_config.conv_alpha if network_config.conv_alpha is not None else network_config.alpha)
    if network_config.dora:
        args["dora_wd"] = "True"
    if network_config.use_tucker:
        args["use_tucker"] = "True"
    meta = {
        "ss_network_module": NETWORK_MODULES[algo],
        "ss_network_dim": str(network_config.rank),
        "ss_network_alpha": str(network_config.alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_model_version(model_config) if model_config is not None else "",
        "ss_output_name": title,
        "ss_training_started_at": str(training.pop("started_at", time.time())),
        "ss_seed": str(network_config.seed),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{'lycoris-' + algo if algo in ('loha', 'lokr') else 'lora'}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if architecture.startswith("stable-diffusion") else "",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "lora_foundry_config": network_config.to_json(),
    }
    if tag_frequency:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency)
    for key, value in training.items():
        meta[key if key.startswith(("ss_", "modelspec.", "lora_foundry")) else f"ss_{key}"] = (
            value if isinstance(value, str) else json.dumps(value))
    return meta
