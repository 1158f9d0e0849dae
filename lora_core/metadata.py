"""Metadata written into adapter files: kohya `ss_*` keys, `modelspec.*`, and our own config."""

from __future__ import annotations

import json
import time

ARCHITECTURES = {
    "SD15": "stable-diffusion-v1", "SD20": "stable-diffusion-v2-768-v", "SDXL": "stable-diffusion-xl-v1-base",
    "SD3": "stable-diffusion-3-medium", "Flux": "flux-1-dev",
}
NETWORK_MODULES = {"lora": "networks.lora", "locon": "networks.lora", "loha": "lycoris.kohya",
                   "lokr": "lycoris.kohya", "dylora": "networks.dylora"}


def base_model_version(model_config) -> str:
    name = type(model_config).__name__
    return {"SD15": "sd_v1", "SD20": "sd_v2", "SDXL": "sdxl_base_v1-0", "SD3": "sd3", "Flux": "flux1"}.get(name, name)


def kohya_metadata(network_config, model_config=None, title: str = "", training: dict | None = None,
                   tag_frequency: dict | None = None) -> dict[str, str]:
    """String-valued metadata other tools read: `ss_*` (kohya), `modelspec.*`, and our full config."""
    training = dict(training or {})
    arch_name = type(model_config).__name__ if model_config is not None else ""
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
        "modelspec.architecture": f"{ARCHITECTURES.get(arch_name, arch_name)}/{'lycoris-' + algo if algo in ('loha', 'lokr') else 'lora'}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if arch_name.startswith("SD") else "",
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
