"""Which sd-scripts script trains each model family and the family-only keys it reads: the kohya export writes a
family's keys only, the import tells the family back from them (where the model files do not already tell it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .kohya_names import as_number, file_name, is_true
from .kohya_reader import Reader
from .run_config import ConfigError, RunConfig


@dataclass(frozen=True)
class Script:
    """One sd-scripts LoRA trainer: its network module, model-file keys and the family-only keys it reads."""

    name: str
    module: str
    encoders: tuple[str, ...]  # its text-encoder file keys
    vae_key: str
    keys: frozenset[str]


# What sd-scripts' parsers add beyond train_network.py's (add_dit_training_arguments, add_flux_train_arguments, ...).
_CACHE = frozenset({"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"})
_DIT = _CACHE | {"weighting_scheme", "logit_mean", "logit_std", "mode_scale", "blocks_to_swap"}
_FLOW = frozenset({"timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "model_prediction_type", "ae"})
_FLUX = Script("flux_train_network.py", "networks.lora_flux", ("clip_l", "t5xxl"), "ae",
               _DIT | _FLOW | {"clip_l", "t5xxl", "guidance_scale", "model_type", "apply_t5_attn_mask"})
SCRIPTS = {
    "sd_v1": Script("train_network.py", "networks.lora", (), "vae", frozenset()),
    "sd_v2": Script("train_network.py", "networks.lora", (), "vae", frozenset({"v2"})),
    "sdxl_base_v1-0": Script("sdxl_train_network.py", "networks.lora", (), "vae", _CACHE),
    "sd3": Script("sd3_train_network.py", "networks.lora_sd3", ("clip_l", "clip_g", "t5xxl"), "vae",
                  _DIT | {"clip_l", "clip_g", "t5xxl", "training_shift", "apply_t5_attn_mask"}),
    "flux1": _FLUX,
    "chroma": Script(_FLUX.name, _FLUX.module, ("t5xxl",), "ae", _FLUX.keys),
    "lumina2": Script("lumina_train_network.py", "networks.lora_lumina", ("gemma2",), "ae", _DIT | _FLOW | {"gemma2"}),
}
# A config whose family is not known: train_network.py's module, every key (which script reads which is not known).
UNKNOWN = Script("train_network.py", "networks.lora", (), "vae", frozenset().union(*(s.keys for s in SCRIPTS.values())))
FAMILY_ONLY = UNKNOWN.keys
FLUX_MODEL_TYPES = {"flux1": "flux", "chroma": "chroma"}
# [model] clip_type (CLIPLoader's) as the family it loads; two files without one load as Flux, three as SD3.
CLIP_TYPES = {"flux": "flux1", "sd3": "sd3", "chroma": "chroma", "lumina2": "lumina2", "wan": "wan21",
              "hunyuan_video": "hunyuan_video", "qwen_image": "qwen_image", "ltxv": "ltxv", "flux2": "flux2",
              "hidream": "hidream", "omnigen2": "omnigen2", "hunyuan_image": "hunyuan_image"}
# One text encoder file's CLIPLoader type where it is not stable_diffusion: what the import sets and what a headless
# run loads it as when [model] names the family and no clip_type.
FAMILY_CLIP_TYPES = {"chroma": "chroma", "lumina2": "lumina2", "flux2": "flux2", "wan21": "wan", "wan22": "wan",
                     "qwen_image": "qwen_image", "omnigen2": "omnigen2", "hunyuan_image": "hunyuan_image"}
ENCODER_HINTS = {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5", "gemma2": "gemma"}
# SD3's weighting_scheme as our timestep_sampling (its training_shift is our fixed shift).
SD3_SCHEMES = {"uniform": "uniform", "none": "uniform", "logit_normal": "logit_normal"}


def family_of(config: RunConfig) -> str:
    """[model] family, the one its text encoders load as, or the one its LoRA's metadata names; "" when not known (a
    checkpoint: SD 1.x / 2.x / XL)."""
    model = config.values.get("model", {})
    if model.get("family"):
        return model["family"]
    if config.base_family and not model:
        return config.base_family
    if model.get("clip_type"):
        return CLIP_TYPES.get(model["clip_type"], "")
    return {2: "flux1", 3: "sd3"}.get(len(model.get("text_encoders") or []), "")


def script_of(config: RunConfig) -> Script:
    """The sd-scripts script that trains `config`'s family, or a ConfigError for a family sd-scripts cannot train."""
    family = family_of(config)
    if not family:
        return UNKNOWN
    if family not in SCRIPTS:
        raise ConfigError(f"{config.source}: [model] family {family}: kohya sd-scripts has no LoRA trainer for it "
                          f"(its are {', '.join(SCRIPTS)}; musubi-tuner's Wan / HunyuanVideo / Qwen-Image trainers "
                          "take other arguments); save it as our TOML")
    return SCRIPTS[family]


def encoder_files(files: list[str], slots: tuple[str, ...]) -> dict[str, str]:
    """{kohya key: file} of the text encoders: by name (t5, clip_g, gemma), the rest in order."""
    out, left = {}, list(files)
    for slot in slots:
        named = [f for f in left if ENCODER_HINTS[slot] in file_name(f).lower()]
        if named:
            out[slot] = named[0]
            left.remove(named[0])
    for slot in (s for s in slots if s not in out):
        if left:
            out[slot] = left.pop(0)
    return out


def sd3_timesteps_out(training: dict[str, Any]) -> dict[str, Any] | None:
    """SD3's weighting_scheme and training_shift for our timestep settings, or None where it has no form of them."""
    sampling, shift = training["timestep_sampling"], training["timestep_shift"]
    if sampling not in ("uniform", "logit_normal") or shift not in ("none", "fixed"):
        return None
    return {"weighting_scheme": sampling, "training_shift": training["shift"] if shift == "fixed" else 1.0}


# --- import ---


def read_family(values: dict, config: RunConfig) -> None:
    """Take the family-only keys of sd-scripts arguments that the generic import does not read (model_type,
    SD3's timesteps, Lumina's files) and set [model] family where the model files will not tell it."""
    family = _family_in(values)
    r = Reader({}, config)
    model_type = values.pop("model_type", None)
    if model_type is not None and model_type not in FLUX_MODEL_TYPES.values():
        r.unsupported("model_type", f"{model_type}: flux_train_network.py's are flux and chroma")
    if family == "sd3":
        _sd3_timesteps(values, r)
    if family == "lumina2":
        _lumina_files(values, r)
    if family:
        r.set("model", "family", family, _FAMILY_KEY.get(family, "network_module"))


_FAMILY_KEY = {"sd_v2": "v2", "sdxl_base_v1-0": "cache_text_encoder_outputs", "chroma": "model_type"}


def _family_in(values: dict) -> str:
    module = values.get("network_module")
    if values.get("model_type") == "chroma":
        return "chroma"
    if module == "networks.lora_flux" or values.get("model_type") == "flux":
        return "flux1"
    if module == "networks.lora_sd3" or "training_shift" in values or "clip_g" in values:
        return "sd3"
    if module == "networks.lora_lumina" or "gemma2" in values:
        return "lumina2"
    if is_true(values.get("v2", False)):
        return "sd_v2"
    if "cache_text_encoder_outputs" in values and module in ("networks.lora", "networks.dylora", "lycoris.kohya"):
        return "sdxl_base_v1-0"  # sdxl_train_network.py reads it, train_network.py does not
    return ""


def finish_family(config: RunConfig) -> None:
    """The text encoders' loader type where one file cannot say it (Chroma's T5, Lumina's Gemma); [model] family
    kept only where the model files do not tell it."""
    model = config.values.get("model", {})
    family = model.pop("family", "")
    if model.get("text_encoders") and not model.get("clip_type") and family in FAMILY_CLIP_TYPES:
        model["clip_type"] = FAMILY_CLIP_TYPES[family]
    if family and family_of(config) != family:
        model["family"] = family


def _sd3_timesteps(values: dict, r: Reader) -> None:
    scheme, shift = values.pop("weighting_scheme", None), values.pop("training_shift", None)
    mean, std = (as_number(values.pop(k, d)) for k, d in (("logit_mean", 0.0), ("logit_std", 1.0)))
    values.pop("mode_scale", None)  # only the mode scheme reads it
    if scheme is None and shift is None:
        return
    scheme = scheme or "uniform"  # sd-scripts' default
    if scheme not in SD3_SCHEMES:
        r.unsupported("weighting_scheme", f"{scheme}: ours are uniform and logit_normal")
        return
    if scheme == "logit_normal" and (mean, std) != (0, 1):
        r.unsupported("logit_mean / logit_std", f"{mean} / {std}: our logit-normal levels have mean 0, scale 1")
    r.set("training", "timestep_sampling", SD3_SCHEMES[scheme], "weighting_scheme")
    number = as_number(shift if shift is not None else 1.0)
    r.set("training", "timestep_shift", "none" if number == 1 else "fixed", "training_shift")
    if number != 1:
        r.set("training", "shift", number if number is not None else shift, "training_shift")


def _lumina_files(values: dict, r: Reader) -> None:
    gemma = values.pop("gemma2", None)
    if not gemma:
        return
    base, ae = values.pop("pretrained_model_name_or_path", None), values.pop("ae", None)
    if base:
        r.set("model", "diffusion_model", base, "pretrained_model_name_or_path")
    r.set("model", "text_encoders", [gemma], "gemma2")
    r.set("model", "clip_type", "lumina2", "gemma2")
    if ae:
        r.set("model", "vae", ae, "ae")
    if is_true(values.pop("fp8_base", False)):
        r.set("model", "weight_dtype", "fp8_e4m3fn", "fp8_base")
