"""Metadata written into adapter files: kohya `ss_*` keys, `modelspec.*`, and our own config (of a trained
adapter) or source (of a merged, extracted or resized one)."""

from __future__ import annotations

import json
import time

from .adapters import LoRA
from .network import NetworkConfig

# (modelspec.architecture, ss_base_model_version) by the host's model config class, the names kohya
# sd-scripts and musubi-tuner write; subclasses (KOALA, Vega, SSD-1B are SDXL) take their base's.
FAMILIES = {
    "SD15": ("stable-diffusion-v1", "sd_v1"), "SD20": ("stable-diffusion-v2-768-v", "sd_v2"),
    "SDXL": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"), "SD3": ("stable-diffusion-3-medium", "sd3"),
    "FluxSchnell": ("flux-1-schnell", "flux1"), "Flux": ("flux-1-dev", "flux1"), "Chroma": ("chroma", "chroma"),
    "Flux2": ("Flux.2-dev", "flux2"),  # musubi-tuner's names (kohya has none)
    "QwenImage": ("qwen-image", "qwen_image"), "ZImage": ("z-image", "z_image"), "Lumina2": ("lumina-2", "lumina2"),
    "WAN22_T2V": ("wan2.2-t2v", "wan22"), "WAN21_I2V": ("wan2.1-i2v", "wan21"), "WAN21_T2V": ("wan2.1-t2v", "wan21"),
    "HunyuanVideo": ("hunyuan-video", "hunyuan_video"), "LTXV": ("ltx-video", "ltxv"),
    "PixArtSigma": ("pixart-sigma", "pixart_sigma"), "PixArtAlpha": ("pixart-alpha", "pixart_alpha"),
    "AuraFlow": ("auraflow", "auraflow"), "HiDream": ("hidream-i1", "hidream"),  # kohya and modelspec have none
    "CosmosT2IPredict2": ("cosmos-predict2", "cosmos_predict2"),
    "HunyuanImage21": ("hunyuan-image-2.1", "hunyuan_image"),  # these two before HunyuanVideo, their base class here
    "HunyuanVideo15": ("hunyuan-video-1.5", "hunyuan_video_1_5"),
}
NETWORK_MODULES = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya",
                   "dylora": "networks.dylora", "oft": "lycoris.kohya", "boft": "lycoris.kohya",
                   "glora": "lycoris.kohya"}
LYCORIS_ALGOS = {"loha": "loha", "lokr": "lokr", "oft": "diag-oft", "boft": "boft", "glora": "glora"}  # our name: LyCORIS' algo


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
    if algo in LYCORIS_ALGOS:
        args["algo"] = LYCORIS_ALGOS[algo]
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
        "modelspec.architecture": f"{architecture}/{'lycoris-' + LYCORIS_ALGOS[algo] if algo in LYCORIS_ALGOS else 'lora'}",
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


def result_metadata(adapters: dict[str, LoRA], title: str, source: dict, template: dict | None = None,
                    model_config=None) -> dict[str, str]:
    """kohya metadata of a produced LoRA (ranks "Dynamic" when they vary), plus `lora_foundry_source`.

    Base-model keys come from `model_config`, else from an input file's metadata `template`.
    """
    def uniform(values: set) -> str | None:
        return f"{values.pop():g}" if len(values) == 1 else ("Dynamic" if values else None)

    convs = {n: a for n, a in adapters.items() if len(a.shape) > 2 and any(k > 1 for k in a.shape[2:])}
    ranks = {a.rank for n, a in adapters.items() if n not in convs}
    conv_ranks = {a.rank for a in convs.values()}
    top = max(ranks | conv_ranks, default=1)
    config = NetworkConfig(
        algorithm="lora", rank=max(ranks, default=top), alpha=float(max(ranks, default=top)),
        conv_rank=max(conv_ranks) if conv_ranks else None, conv_alpha=float(max(conv_ranks)) if conv_ranks else None,
        preset="locon" if convs else "kohya",
    )
    meta = kohya_metadata(config, model_config, title)
    meta["ss_network_dim"] = uniform(ranks) or meta["ss_network_dim"]
    meta["ss_network_alpha"] = uniform({a.alpha for n, a in adapters.items() if n not in convs}) or meta["ss_network_alpha"]
    if convs:
        args = json.loads(meta["ss_network_args"])
        args["conv_dim"] = uniform(conv_ranks)
        args["conv_alpha"] = uniform({a.alpha for a in convs.values()})
        meta["ss_network_args"] = json.dumps(args)
    if model_config is None and template:
        for key in ("ss_base_model_version", "ss_sd_model_name", "modelspec.architecture", "modelspec.implementation",
                    "modelspec.resolution"):
            if key in template:
                meta[key] = template[key]
    if meta["modelspec.architecture"].startswith("/"):  # no base model known
        del meta["modelspec.architecture"]
    del meta["lora_foundry_config"]  # a training config; a merged / extracted / resized LoRA has none
    meta["lora_foundry_source"] = json.dumps(source)
    return meta
