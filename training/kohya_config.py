"""kohya configs in and out: sd-scripts training arguments (the `--config_file` TOML), sd-scripts dataset configs (the
`--dataset_config` TOML) and kohya_ss GUI JSON read into a RunConfig; a RunConfig written as training arguments.

A key maps through the declared `kohya` name of a setting (lora_core.settings) where its value means the same here,
else through a converter below. Every key read that does not map is listed in `RunConfig.unsupported` with why; the
only ones left out quietly are those whose value changes nothing in kohya either (see _gui_args, _NO_EFFECT).
"""

from __future__ import annotations

import math
import re
from pathlib import PurePath, PureWindowsPath
from typing import Any

from ..lora_core.settings import declared, default_of
from .optim import SCHEDULERS
from .run_config import RUN_KEYS, SETTINGS, RunConfig, checked_value, toml_value

# Declared kohya names whose values differ from ours: the converters below read and write them.
CONVERTED = frozenset({
    "network_module", "mixed_precision", "optimizer_type", "optimizer_args", "lr_scheduler", "lr_warmup_steps",
    "resolution", "loss_type", "timestep_sampling", "learning_rate", "text_encoder_lr", "block_dims", "block_alphas",
})
# kohya keys our settings take whose declarations do not name them.
EXTRA_NAMES = {
    "caption_extention": ("dataset", "caption_extension"),  # sd-scripts still reads its old misspelling
    "output_name": ("run", "output_name"),
}
# sd-scripts' defaults where they differ from ours: a kohya config without the key trains with these.
KOHYA_DEFAULTS = {"network_dim": 4, "network_alpha": 1.0, "min_snr_gamma": 0.0, "keep_tokens": 0,
                  "caption_extension": ".caption"}
SUBSET_DEFAULTS = {"keep_tokens": 0, "caption_extension": ".caption", "num_repeats": 1}
# kohya keys at values that are what ours does anyway.
_NO_EFFECT = {"clip_skip": 1, "max_token_length": 75, "network_multiplier": 1.0, "num_processes": 1,
              "num_machines": 1, "model_prediction_type": "raw"}

KOHYA_MODULES = {"networks.lora": "lora", "networks.lora_sd3": "lora", "networks.lora_flux": "lora",
                 "networks.lora_lumina": "lora", "networks.lora_anima": "lora", "networks.lora_hunyuan_image": "lora",
                 "networks.dylora": "dylora", "networks.loha": "loha", "networks.lokr": "lokr"}
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr", "dylora": "dylora"}
# LyCORIS presets as our targets: full (LyCORIS' default) adapts every layer, attn-mlp the transformer blocks.
LYCORIS_PRESETS = {"full": "all", "attn-mlp": "kohya", "attn-only": "attention"}
LYCORIS_PRESETS_OUT = {"all": "full", "kohya": "attn-mlp", "attention": "attn-only", "locon": "full"}
# Keys sd-scripts passes to the network module (network_args) rather than taking as arguments.
NETWORK_ARG_KEYS = frozenset({"conv_dim", "conv_alpha", "dora_wd", "rank_dropout", "module_dropout", "factor",
                              "use_tucker", "unit", "loraplus_lr_ratio", "block_dims", "block_alphas"})
# Keys kohya has only in a dataset config ([[datasets.subsets]]), not as training arguments.
DATASET_CONFIG_ONLY = frozenset({"num_repeats", "conditioning_data_dir"})

OPTIMIZERS_IN = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "sgd": "SGD", "sgdnesterov": "SGD",
                 "adafactor": "Adafactor", "prodigy": "Prodigy"}
# The weight decay of the optimizer kohya builds when optimizer_args set none (torch / bitsandbytes AdamW); Lion,
# SGD, Adafactor and Prodigy default to none.
KOHYA_DECAY = {"AdamW": 0.01, "AdamW8bit": 0.01}
PRECISIONS_IN = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
PRECISIONS_OUT = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
SAVE_PRECISIONS_IN = {"float": "fp32", "fp16": "fp16", "bf16": "bf16"}
SAVE_PRECISIONS_OUT = {ours: kohya for kohya, ours in SAVE_PRECISIONS_IN.items()}
LOSSES_IN = {"l2": "mse", "l1": "l1", "huber": "huber"}
LOSSES_OUT = {ours: kohya for kohya, ours in LOSSES_IN.items()}
# sd-scripts' flow-model timestep_sampling as (our timestep_sampling, timestep_shift): sigmoid draws logit-normal
# levels, shift shifts them by discrete_flow_shift, flux_shift by the image size, sigma draws the scheduler's
# (shifted) levels uniformly.
SAMPLING_IN = {"uniform": ("uniform", "none"), "sigmoid": ("logit_normal", "none"), "shift": ("logit_normal", "fixed"),
               "flux_shift": ("logit_normal", "resolution"), "sigma": ("uniform", "fixed")}
SAMPLING_OUT = {pair: kohya for kohya, pair in SAMPLING_IN.items()}

NOT_NEEDED = {
    **dict.fromkeys(("xformers", "sdpa", "mem_eff_attn"), "attention runs through ComfyUI's optimized attention"),
    "cache_latents": "latents are always cached; cache_latents_to_disk sets where",
    **dict.fromkeys(("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"),
                    "the outputs of frozen text encoders are always cached"),
    **dict.fromkeys(("persistent_data_loader_workers", "max_data_loader_n_workers"),
                    "there are no data-loader workers: latents are cached"),
    **dict.fromkeys(("logging_dir", "log_with", "log_prefix", "log_tracker_name", "log_tracker_config", "log_config",
                     "wandb_api_key", "wandb_run_name", "use_wandb"),
                    "each run logs its losses to output/lora_foundry_runs/<output_name>"),
    "output_dir": "adapters are saved in models/loras/<output_name>",
    "save_model_as": "adapters are saved as .safetensors",
    "enable_bucket": "images are always bucketed by aspect ratio",
    "masked_loss": "a mask_folder (conditioning_data_dir) or alpha_mask turns masked loss on",
    **dict.fromkeys(("lowram", "lowvram", "highvram", "vae_batch_size", "no_half_vae", "sdxl_no_half_vae"),
                    "ComfyUI loads and runs the models (vram_budget_gb sets the memory a run may use)"),
    **dict.fromkeys(("sdxl", "v2", "v_parameterization", "model_list", "flux1_checkbox", "sd3_checkbox"),
                    "the model's family and prediction type are read from the model"),
    **dict.fromkeys(("num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
                     "main_process_port", "extra_accelerate_launch_args", "dynamo_backend", "dynamo_mode",
                     "dynamo_use_fullgraph", "dynamo_use_dynamic"),
                    "accelerate launch settings; several GPUs train through torchrun and the headless command"),
    "save_as_bool": "a kohya_ss GUI setting",
}
REASONS = {
    "frame_stride": "chunk takes consecutive windows; uniform spreads one over the whole clip",
    "frame_sample": "uniform takes one window spread over the whole clip",
    "max_frames": "frames sets the sample length",
    "source_fps": "set frame_rate: the rate clips are resampled to (each clip's own rate is read from the file)",
    "block_lr": "sdxl_train.py's full fine-tuning; a LoRA's per-block learning rates are network_args "
                "down_lr_weight / mid_lr_weight / up_lr_weight",
    "save_every_n_epochs": "set save_every (steps)",
    "sample_every_n_epochs": "set sample_every (steps)",
    "save_last_n_epochs": "every saved checkpoint is kept",
    "save_last_n_steps": "every saved checkpoint is kept",
    "network_weights": "training starts from new adapters; resume continues a run of ours",
    "dataset_config": "import that file too: it holds the dataset",
    "additional_parameters": "extra command-line arguments; set what they do by hand",
    "class_tokens": "an image without a caption file takes the tokens of a folder named `N_tokens`; write caption "
                    "files or name the folder so",
    "metadata_file": "captions come from caption files next to the images; write them",
    "conv_block_dims": "convolutions take conv_rank everywhere",
    "conv_block_alphas": "convolutions take conv_alpha everywhere",
    "loraplus_unet_lr_ratio": "one LoRA+ ratio for every adapter: set lora_plus_ratio",
    "loraplus_text_encoder_lr_ratio": "one LoRA+ ratio for every adapter: set lora_plus_ratio",
    "full_fp16": "the adapter trains in fp32 under autocast (precision)",
    "full_bf16": "the adapter trains in fp32 under autocast (precision)",
    "clip_skip": "the text encoders run as ComfyUI loads them",
    "color_aug": "no colour augmentation; flip is the one augmentation",
    "random_crop": "images are resized into their bucket, never cropped at random",
    "multires_noise_iterations": "noise_offset is the only noise augmentation",
    "multires_noise_discount": "noise_offset is the only noise augmentation",
    "adaptive_noise_scale": "noise_offset is the only noise augmentation",
    "noise_offset_random_strength": "noise_offset is the only noise augmentation",
    "ip_noise_gamma": "noise_offset is the only noise augmentation",
    "scale_weight_norms": "no max-norm regularisation",
    "caption_dropout_every_n_epochs": "caption_dropout is drawn at every step",
    "keep_tokens_separator": "captions are comma-separated tags; keep_tokens counts them",
    "secondary_separator": "captions are comma-separated tags; keep_tokens counts them",
    "caption_separator": "captions are comma-separated tags; keep_tokens counts them",
    "enable_wildcard": "captions are comma-separated tags",
    "sample_prompts": "a file of prompts: put its lines into sample_prompts",
}
_GUI_NETWORK_KEYS = ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "use_cp", "use_scalar",
                     "rank_dropout_scale", "bypass_mode", "dora_wd", "factor", "decompose_both", "unit", "train_norm",
                     "constrain", "rescaled", "train_on_input", "rank_dropout", "module_dropout", "block_dims",
                     "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
                     "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                     "loraplus_text_encoder_lr_ratio")
_DROPOUTS = ("rank_dropout", "module_dropout")
_KOHYA_BLOCKS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                 "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
_LYCORIS = ("conv_dim", "conv_alpha", "use_tucker", *_DROPOUTS, "rank_dropout_scale", "train_norm", "use_scalar",
            "bypass_mode", "dora_wd")
# kohya_ss LoRA_type: (network_module, LyCORIS algo, the GUI fields it passes as network_args), as lora_gui.py does.
GUI_NETWORKS = {
    "Standard": ("networks.lora", None, _DROPOUTS + _KOHYA_BLOCKS),
    "Kohya LoCon": ("networks.lora", None, ("conv_dim", "conv_alpha", *_DROPOUTS, *_KOHYA_BLOCKS)),
    "Kohya DyLoRA": ("networks.dylora", None, ("conv_dim", "conv_alpha", "unit", *_DROPOUTS, *_KOHYA_BLOCKS)),
    "Kohya LoHa": ("networks.loha", None, ("conv_dim", "conv_alpha", "use_tucker", *_DROPOUTS)),
    "Kohya LoKr": ("networks.lokr", None, ("conv_dim", "conv_alpha", "use_tucker", "factor", *_DROPOUTS)),
    "LoCon": ("lycoris.kohya", "locon", _LYCORIS),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon", _LYCORIS),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha", _LYCORIS),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr", (*_LYCORIS, "factor", "use_cp", "decompose_both")),
    "LyCORIS/DyLoRA": ("lycoris.kohya", "dylora", ("conv_dim", "conv_alpha", "use_tucker", "unit", *_DROPOUTS,
                                                   "train_norm")),
    "Flux1": ("networks.lora_flux", None, _DROPOUTS),
}
# The GUI's names of sd-scripts arguments (the GUI has no field of the sd-scripts name).
GUI_NAMES = {"optimizer_type": "optimizer", "resolution": "max_resolution"}
_GUI_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_REPEATS_NAME = re.compile(r"^(\d+)_")
# Our 0 means none of these; kohya's is leaving the key out (its 0 would train no step or divide by zero).
_ZERO_IS_ABSENT = frozenset({"max_train_epochs", "save_every_n_steps", "sample_every_n_steps",
                             "validate_every_n_steps"})


def kohya_names() -> dict[str, tuple[str, str]]:
    """{kohya key: (section, input name)} of the settings whose kohya key holds the same value as ours."""
    out = {}
    for section, cls in SETTINGS.items():
        for name, (_, spec) in declared(cls).items():
            if spec.kohya and spec.kohya not in CONVERTED:
                out[spec.kohya] = (section, name)
    return {**out, **EXTRA_NAMES}


# --- reading -----------------------------------------------------------------------------------------------


def import_kohya(data: dict, source: str) -> RunConfig:
    """A kohya_ss GUI JSON, an sd-scripts dataset config or sd-scripts training arguments as a RunConfig."""
    config = RunConfig(source=source)
    if "LoRA_type" in data:
        _import_args(_gui_args(data, config), config, gui=True)
    elif "datasets" in data or "general" in data:
        _import_dataset(data, config)
    else:
        _import_args(_flatten(data), config)
    return config


def _flatten(data: dict) -> dict:
    """Training arguments as sd-scripts reads a --config_file: the keys of every [section] and the top-level ones."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


class _Reader:
    """The keys of one kohya config being mapped: converters take what they read; `rest` maps or lists the others."""

    def __init__(self, values: dict, config: RunConfig, gui: bool = False):
        self.values, self.config, self.gui = dict(values), config, gui
        self.names = GUI_NAMES if gui else {}  # messages name a key as the file does
        self.module: str | None = None  # the network module, once read

    def take(self, key: str, default: Any = None) -> Any:
        return self.values.pop(key, default)

    def set(self, section: str, name: str, value: Any, key: str) -> None:
        value = _typed(section, name, value)
        where = f"{self.config.source}: {self.names.get(key, key)}"
        self.config.section(section)[name] = checked_value(section, name, value, where)

    def unsupported(self, key: str, why: str) -> None:
        self.config.unsupported.append(f"{self.names.get(key, key)}: not supported ({why})")

    def not_needed(self, key: str, why: str) -> None:
        self.config.unsupported.append(f"{self.names.get(key, key)}: not needed ({why})")

    def rest(self) -> None:
        names = kohya_names()
        for key, value in self.values.items():
            if key in names:
                self.set(*names[key], value, key)
            elif key in NOT_NEEDED:
                self.not_needed(key, NOT_NEEDED[key])
            elif key not in _NO_EFFECT or _NO_EFFECT[key] not in (value, _number(value)):
                self.unsupported(key, REASONS.get(key, "no setting of ours does this"))
        self.values.clear()


def _import_args(values: dict, config: RunConfig, gui: bool = False) -> None:
    values = dict(values)
    values.update(_pairs(values.pop("network_args", None)))  # sd-scripts hands them to the network module
    for key, default in KOHYA_DEFAULTS.items():
        values.setdefault(key, default)
    reader = _Reader(values, config, gui)
    for convert in (_network, _learning_rates, _optimizer, _schedule, _precision, _loss, _timesteps,
                    _resolution, _buckets, _block_ranks, _block_lrs, _latent_cache, _model, _samples):
        convert(reader)
    reader.rest()


def _network(r: _Reader) -> None:
    module, algo, preset = r.take("network_module"), r.take("algo"), r.take("preset")
    r.module = module
    if module == "lycoris.kohya":
        _lycoris(r, str(algo or "lora").lower(), str(preset or "full"))
        return
    for key, value in (("algo", algo), ("preset", preset)):
        if value is not None:
            r.unsupported(key, f"only LyCORIS (lycoris.kohya) reads it, not {module}")
    if module is None:
        return
    name = KOHYA_MODULES.get(module)
    if name is None:
        r.unsupported("network_module", f"{module}: ours are networks.lora (and its Flux / SD3 forms), "
                                        "networks.dylora, networks.loha, networks.lokr and lycoris.kohya")
        return
    conv = "conv_dim" in r.values
    if conv:
        r.values.setdefault("conv_alpha", 1.0)  # sd-scripts' default
    r.set("network", "algorithm", "locon" if conv and name == "lora" else name, "network_module")
    r.set("network", "targets", "locon" if conv else "kohya", "network_module")


def _lycoris(r: _Reader, algo: str, preset: str) -> None:
    for alias, key in (("use_cp", "use_tucker"), ("block_size", "unit"), ("dropout", "network_dropout")):
        if alias in r.values:
            r.values[key] = r.take(alias)
    name = LYCORIS_ALGOS.get(algo)
    if name is None:
        r.unsupported("algo", f"LyCORIS {algo}: ours are lora / locon, loha, lokr, dylora")
        return
    r.set("network", "algorithm", name, "algo")
    if preset in LYCORIS_PRESETS:
        r.set("network", "targets", LYCORIS_PRESETS[preset], "preset")
    else:
        r.unsupported("preset", f"{preset}: ours are full (targets all), attn-mlp (kohya), attn-only (attention)")
    # LyCORIS' defaults: convolutions take network_dim / network_alpha, DyLoRA grows 4 ranks at a time.
    if "conv_dim" in r.values and not _number(r.values.get("conv_alpha")):
        r.values["conv_alpha"] = r.values["network_alpha"]
    if name == "dylora":
        r.values.setdefault("unit", 4)


def _learning_rates(r: _Reader) -> None:
    lr, unet, te = r.take("learning_rate"), r.take("unet_lr"), r.take("text_encoder_lr")
    unet_only = _truthy(r.take("network_train_unet_only", False))
    if _truthy(r.take("network_train_text_encoder_only", False)):
        r.unsupported("network_train_text_encoder_only", "the UNet / DiT always trains")
    if isinstance(te, list):  # one per text encoder
        if len({float(x) for x in te}) > 1:
            r.unsupported("text_encoder_lr", f"{te}: one learning rate for every text encoder; the first is used")
        te = te[0] if te else None
    if unet is not None or lr is not None:
        r.set("training", "learning_rate", unet if unet is not None else lr, "unet_lr" if unet is not None else
              "learning_rate")
    trains_te = not unet_only and _number(te) != 0  # sd-scripts leaves out parameters whose learning rate is 0
    r.set("network", "train_text_encoder", trains_te, "network_train_unet_only")
    if te is not None and _number(te) != 0:
        r.set("training", "text_encoder_lr", te, "text_encoder_lr")
    elif trains_te and unet is not None and lr is not None and _number(lr) != _number(unet):
        r.set("training", "text_encoder_lr", lr, "learning_rate")  # kohya's text encoders learn at learning_rate


def _optimizer(r: _Reader) -> None:
    name = str(r.take("optimizer_type") or "")
    if _truthy(r.take("use_8bit_adam", False)):
        name = name or "AdamW8bit"
    if _truthy(r.take("use_lion_optimizer", False)):
        name = name or "Lion"
    name = name or "AdamW"  # sd-scripts' default
    pairs = _pairs(r.take("optimizer_args"))
    ours = OPTIMIZERS_IN.get(name.lower())
    if ours is None:
        r.unsupported("optimizer_type", f"{name}: ours are AdamW, AdamW8bit, Lion, SGD / SGDNesterov, Adafactor, "
                                        "Prodigy")
        if pairs:
            r.unsupported("optimizer_args", f"the options of {name}")
        return
    pairs = _as_our_optimizer(name.lower(), pairs, r)
    decay = pairs.pop("weight_decay", KOHYA_DECAY.get(ours, 0.0))
    for key in ("lr", "params"):
        if pairs.pop(key, None) is not None:
            r.unsupported(f"optimizer_args {key}", "set learning_rate")
    r.set("training", "optimizer", ours, "optimizer_type")
    r.set("training", "weight_decay", decay, "optimizer_args weight_decay")
    r.set("training", "optimizer_args", [f"{k}={v}" for k, v in pairs.items()], "optimizer_args")


def _as_our_optimizer(kind: str, pairs: dict, r: _Reader) -> dict:
    """optimizer_args that make our optimizer train as kohya's `kind` does (where their defaults differ)."""
    if kind == "sgdnesterov":
        return {"nesterov": "True", **pairs}
    if kind == "sgd":  # torch's SGD has no momentum unless given; ours has 0.9
        if "momentum" not in pairs:
            return {**pairs, "momentum": "0"}
        return {k: v for k, v in pairs.items() if k != "momentum" or _number(v) != 0.9}
    if kind == "adafactor":
        if _truthy(pairs.pop("relative_step", "True")):  # kohya's default
            r.unsupported("optimizer_args relative_step", "kohya's Adafactor then picks its own step size; ours "
                                                         "trains at learning_rate (relative_step=False)")
        if _truthy(pairs.pop("warmup_init", "False")):
            r.unsupported("optimizer_args warmup_init", "ours trains at learning_rate (set warmup_steps)")
        if _truthy(pairs.pop("scale_parameter", "True")):  # transformers' default; ours is False
            pairs["scale_parameter"] = "True"
    return pairs


def _schedule(r: _Reader) -> None:
    name = r.take("lr_scheduler")
    if name is not None:
        if name in SCHEDULERS:
            r.set("training", "scheduler", name, "lr_scheduler")
        else:
            r.unsupported("lr_scheduler", f"{name}: ours are {', '.join(SCHEDULERS)}; constant is used")
    for key, user in (("lr_scheduler_num_cycles", "cosine_with_restarts"), ("lr_scheduler_power", "polynomial")):
        value = r.take(key)
        if value is None or _number(value) == 1:  # kohya's default and ours
            continue
        if name == user:
            r.unsupported(key, f"{value}: our {user} uses 1")
        else:
            r.not_needed(key, f"only {user} uses it")
    _warmup(r)


def _warmup(r: _Reader) -> None:
    value = r.take("lr_warmup_steps")
    if value is None:
        return
    number = _number(value)
    if isinstance(number, float) and 0 < number < 1:  # sd-scripts: a fraction of the training steps
        steps = _number(r.values.get("max_train_steps"))
        if steps is None:
            r.unsupported("lr_warmup_steps", f"{value} of the training steps: set warmup_steps")
            return
        number = round(number * steps)
    r.set("training", "warmup_steps", number if number is not None else value, "lr_warmup_steps")


def _precision(r: _Reader) -> None:
    value = r.take("mixed_precision")
    if value is None:
        return
    if value in PRECISIONS_IN:
        r.set("training", "precision", PRECISIONS_IN[value], "mixed_precision")
    else:
        r.unsupported("mixed_precision", f"{value}: ours are no (fp32), fp16, bf16")


def _loss(r: _Reader) -> None:
    loss, schedule = r.take("loss_type"), r.take("huber_schedule")  # huber_schedule acts on huber losses only
    if loss is None:
        return
    if loss not in LOSSES_IN:
        r.unsupported("loss_type", f"{loss}: ours are l2 (mse), l1, huber")
        return
    r.set("training", "loss", LOSSES_IN[loss], "loss_type")
    if loss == "huber":
        r.values.setdefault("huber_c", 0.1)  # sd-scripts' default
        if (schedule or "snr") != "constant":
            r.unsupported("huber_schedule", f"{schedule or 'snr'} (kohya's default is snr) varies huber_c with the "
                                            "timestep; our huber_delta is constant")


def _timesteps(r: _Reader) -> None:
    sampling, scale = r.take("timestep_sampling"), r.take("sigmoid_scale")
    if sampling is not None:
        if sampling in SAMPLING_IN:
            levels, shift = SAMPLING_IN[sampling]
            r.set("training", "timestep_sampling", levels, "timestep_sampling")
            r.set("training", "timestep_shift", shift, "timestep_sampling")
        else:
            r.unsupported("timestep_sampling", f"{sampling}: ours are {', '.join(SAMPLING_IN)}")
    if scale is not None and _number(scale) != 1:
        r.unsupported("sigmoid_scale", "our logit-normal levels have scale 1")


def _resolution(r: _Reader, key: str = "resolution") -> None:
    value = r.take(key)
    if value is None:
        return
    size = _size(value)
    if size is None:
        r.set("dataset", "resolution", value, key)  # checked_value says what it takes
        return
    width, height = size
    side = width
    if width != height:
        side = max(64, round(math.sqrt(width * height) / 64) * 64)
        r.unsupported(key, f"{width}x{height} is not square: resolution {side} keeps about its pixel count; buckets "
                           "follow each image's aspect ratio")
    r.set("dataset", "resolution", side, key)


def _size(value: Any) -> tuple[int, int] | None:
    """(width, height) of a kohya resolution: 512, "512", "512,768" or [512, 768]."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    numbers = [_number(p) for p in parts]
    if len(numbers) not in (1, 2) or not all(isinstance(n, int) and n > 0 for n in numbers):
        return None
    return numbers[0], numbers[-1]


def _buckets(r: _Reader) -> None:
    value = r.take("enable_bucket")
    if value is None:
        return
    if _truthy(value):
        r.not_needed("enable_bucket", NOT_NEEDED["enable_bucket"])
    else:
        r.unsupported("enable_bucket", "false: kohya crops every image to resolution; images are always bucketed here")


def _ignored_by_module(r: _Reader, keys: tuple[str, ...]) -> bool:
    """Whether the network module is one that does not read `keys` (only networks.lora has per-block values);
    then they are listed."""
    if r.module in (None, "networks.lora"):
        return False
    for key in keys:
        if key in r.values:
            r.take(key)
            r.not_needed(key, f"kohya's {r.module} ignores it")
    return True


def _block_ranks(r: _Reader) -> None:
    if _ignored_by_module(r, ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")):
        return
    for key, name in (("block_dims", "block_ranks"), ("block_alphas", "block_alphas")):
        value = r.take(key)
        if value is None:
            continue
        parts = [p.strip() for p in str(value).split(",")]
        if len(parts) == 25:  # SD1.x / 2.x: IN00-IN11, MID, OUT00-OUT11, our every-block form
            r.set("network", name, ",".join(parts), key)
        elif len(parts) == 23:  # SDXL: embedding, IN00-IN08, the middle block's 3 parts, OUT00-OUT08, out
            # A linear layer sits in the middle block's attention (part 2) only; kohya adapts none in the other two.
            r.set("network", name, ",".join(parts[1:10] + parts[11:12] + parts[13:22]), key)
        else:
            r.unsupported(key, f"{len(parts)} values; kohya's SD1.x / 2.x form has 25, its SDXL form 23")


def _block_lrs(r: _Reader) -> None:
    keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
    if _ignored_by_module(r, keys):
        return
    down, mid, up, threshold = (r.take(k) for k in keys)
    if down is None and mid is None and up is None:
        if threshold is not None:
            r.not_needed("block_lr_zero_threshold", "only down / mid / up_lr_weight use it")
        return
    text = _lr_weights(down, mid, up, _number(threshold) or 0.0)
    if text is None:
        for key, value in zip(keys, (down, mid, up, threshold), strict=True):
            if value is not None:
                r.unsupported(key, "block_lrs takes per-block numbers: 12 down, 1 mid, 12 up (SD1.x / 2.x) or 9, 1 "
                                   "or 3 equal, 9 (SDXL); kohya's named curves are not supported")
        return
    r.set("training", "block_lrs", text, "down_lr_weight / mid_lr_weight / up_lr_weight")


def _lr_weights(down: Any, mid: Any, up: Any, threshold: float) -> str | None:
    """kohya's down / mid / up_lr_weight as our every-block block_lrs, or None where it cannot say the same.

    The lists' lengths tell the family: 9 down / up or 3 mid weights are SDXL's, else SD1.x / 2.x's (12, 1)."""
    lists = [_floats(v) for v in (down, mid, up)]
    if any(v is not None and weights is None for v, weights in zip((down, mid, up), lists, strict=True)):
        return None
    down_w, mid_w, up_w = lists
    sdxl = (mid_w is not None and len(mid_w) == 3) or 9 in {len(v) for v in (down_w, up_w) if v is not None}
    size, mid_size = (9, 3) if sdxl else (12, 1)

    def filled(weights: list[float] | None, length: int) -> list[float]:
        # kohya cuts a long list, fills a short or missing one with 1 and zeroes given weights up to the threshold.
        if weights is None:
            return [1.0] * length
        return [w if w > threshold else 0.0 for w in (weights + [1.0] * length)[:length]]

    middle = filled(mid_w, mid_size)
    if len(set(middle)) > 1:  # our MID is one value
        return None
    return ",".join(f"{w:g}" for w in [*filled(down_w, size), middle[0], *filled(up_w, size)])


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    parts = value if isinstance(value, list) else str(value).split(",")
    numbers = [_number(p) for p in parts]
    return None if any(n is None for n in numbers) else [float(n) for n in numbers]


def _latent_cache(r: _Reader) -> None:
    value = r.take("cache_latents_to_disk")
    if value is not None:
        r.set("training", "cache_latents", "disk" if _truthy(value) else "memory", "cache_latents_to_disk")


def _model(r: _Reader) -> None:
    base = r.take("pretrained_model_name_or_path")
    encoders = {k: r.take(k) for k in ("clip_l", "clip_g", "t5xxl")}
    ae, vae = r.take("ae"), r.take("vae")
    vae_key, vae = ("ae", ae) if ae else ("vae", vae)
    files = [v for v in encoders.values() if v]
    if base is not None:
        if str(base).lower().endswith((".safetensors", ".sft", ".ckpt", ".pt", ".pth")):
            r.set("model", "diffusion_model" if files else "checkpoint", base, "pretrained_model_name_or_path")
        else:
            r.unsupported("pretrained_model_name_or_path", f"{base} is a diffusers folder or Hub id: set [model] "
                                                           "checkpoint to a .safetensors file")
    if files:
        r.set("model", "text_encoders", files, "clip_l / clip_g / t5xxl")
        if len(files) == 2:  # DualCLIPLoader's type; three files need none
            r.set("model", "clip_type", "sd3" if encoders["clip_g"] else "flux", "clip_l / clip_g / t5xxl")
    if vae and files:
        r.set("model", "vae", vae, vae_key)
    elif vae:
        r.unsupported(vae_key, "a checkpoint encodes the images with its own VAE")
    fp8 = _truthy(r.take("fp8_base", False))
    if fp8 and files:
        r.set("model", "weight_dtype", "fp8_e4m3fn", "fp8_base")  # the fp8 kohya loads the base model in
    elif fp8:
        r.unsupported("fp8_base", "[model] weight_dtype applies to a diffusion_model file; a checkpoint loads as "
                                  "it is stored")
    precision = r.take("save_precision", "float")  # sd-scripts saves in fp32 unless told
    if precision in SAVE_PRECISIONS_IN:
        r.set("run", "save_precision", SAVE_PRECISIONS_IN[precision], "save_precision")
    else:
        r.unsupported("save_precision", f"{precision}: ours are float (fp32), fp16, bf16")


def _samples(r: _Reader) -> None:
    if r.gui and "sample_prompts" in r.values:  # the GUI holds the prompts themselves, sd-scripts a file of them
        lines = [line.strip() for line in str(r.take("sample_prompts")).splitlines() if line.strip()]
        r.set("training", "sample_prompts", lines, "sample_prompts")


# --- kohya_ss GUI ---


def _gui_args(data: dict, config: RunConfig) -> dict:
    """A kohya_ss GUI config as the sd-scripts arguments its lora_gui.py passes."""
    # The GUI leaves every "", false, 0 and null value out of those (its filter compares with ==, so 0 goes too):
    # sd-scripts then trains with its defaults, so such keys change nothing and are left out here as well.
    gui = {key: value for key, value in data.items() if value not in ("", False, None)}
    lora_type = gui.pop("LoRA_type", "Standard")
    fields = {key: gui.pop(key) for key in _GUI_NETWORK_KEYS if key in gui}
    args = _gui_network(lora_type, fields, config)
    if "optimizer" in gui:
        args["optimizer_type"] = gui.pop("optimizer")
    if "optimizer_args" in gui:
        args["optimizer_args"] = str(gui.pop("optimizer_args")).replace('"', "").split()
    if "max_resolution" in gui:
        args["resolution"] = gui.pop("max_resolution")
    _gui_noise(gui)
    _gui_steps(gui, args, config)
    attention = gui.pop("xformers", "none")
    attention = "xformers" if attention is True else attention  # older GUI versions: a checkbox
    if attention in ("xformers", "sdpa"):
        args[attention] = True
    return {**args, **gui}


def _gui_network(lora_type: str, fields: dict, config: RunConfig) -> dict:
    # A field the GUI passes only for other LoRA types changes nothing for this one.
    if lora_type not in GUI_NETWORKS:
        config.unsupported.append(f"LoRA_type: not supported ({lora_type}: ours are {', '.join(GUI_NETWORKS)})")
        return {}
    module, algo, keys = GUI_NETWORKS[lora_type]
    network_args = {key: fields[key] for key in (*keys, *_GUI_LORAPLUS) if key in fields}
    if algo is not None:
        network_args = {"algo": algo, "preset": fields.get("LyCORIS_preset", "full"), **network_args}
    return {"network_module": module, "network_args": network_args}


def _gui_noise(gui: dict) -> None:
    """Drops the noise fields the GUI does not pass for its noise_offset_type."""
    kind = gui.pop("noise_offset_type", "Original")
    dropped = ("multires_noise_iterations", "multires_noise_discount") if kind == "Original" else (
        "noise_offset", "adaptive_noise_scale", "noise_offset_random_strength")
    for key in dropped:
        gui.pop(key, None)


def _gui_steps(gui: dict, args: dict, config: RunConfig) -> None:
    """The GUI's epoch and lr_warmup (a percent of the steps) as sd-scripts arguments or listed lines."""
    steps = _number(gui.get("max_train_steps"))
    epoch = gui.pop("epoch", None)
    if epoch is not None and steps is None:  # the GUI counts the steps of `epoch` epochs; with max_train_steps, none
        gui.setdefault("max_train_epochs", epoch)
    if epoch is not None and gui.get("lr_scheduler") == "cosine_with_restarts":
        gui.setdefault("lr_scheduler_num_cycles", epoch)  # the GUI's fallback
    percent = _number(gui.pop("lr_warmup", None))
    if percent and "lr_warmup_steps" not in gui:
        if steps is None:
            config.unsupported.append(f"lr_warmup: not supported ({percent}% of the steps: set warmup_steps)")
        else:
            args["lr_warmup_steps"] = round(percent / 100 * steps)


# --- dataset config ---


def _import_dataset(data: dict, config: RunConfig) -> None:
    general = data.get("general", {})
    for key in data:
        if key not in ("general", "datasets"):
            config.unsupported.append(f"{key}: not supported (a dataset config has [general] and [[datasets]])")
    subsets = []  # (label, values with [general] and [[datasets]] under the subset's own)
    for i, dataset in enumerate(data.get("datasets", [])):
        level = {k: v for k, v in dataset.items() if k != "subsets"}
        if "subsets" not in dataset:  # musubi-tuner: a dataset is one folder, with no subsets
            subsets.append((f"datasets[{i}]", {**SUBSET_DEFAULTS, **general, **level}))
        for j, subset in enumerate(dataset.get("subsets", [])):
            subsets.append((f"datasets[{i}].subsets[{j}]", {**SUBSET_DEFAULTS, **general, **level, **subset}))
    images = [s for s in subsets if not _truthy(s[1].get("is_reg", False))]
    regs = [s for s in subsets if _truthy(s[1].get("is_reg", False))]
    main = images[0][1] if images else {**SUBSET_DEFAULTS, **general}
    _import_subset(main, config)
    if regs:
        _import_reg(*regs[0], main, config)
    for label, values in images[1:]:
        _extra_subset(label, values, "dataset", config)
    for label, values in regs[1:]:
        _extra_subset(label, values, "regularisation", config)


def _import_subset(values: dict, config: RunConfig) -> None:
    r = _Reader({k: v for k, v in values.items() if k != "is_reg"}, config)
    folder = r.take("image_dir")
    if folder is not None:
        r.set("dataset", "folder", folder, "image_dir")
        named = _REPEATS_NAME.match(_basename(folder))
        if named and int(named.group(1)) != _number(r.values["num_repeats"]):
            r.unsupported("num_repeats", f"{r.values['num_repeats']}: the folder's name {_basename(folder)!r} sets "
                                         f"{named.group(1)} repeats here (kohya's dataset config ignores it); "
                                         "rename the folder")
    if "batch_size" in r.values:
        r.values["train_batch_size"] = r.take("batch_size")
    _clips(r, folder)
    _resolution(r)
    _buckets(r)
    r.rest()


def _clips(r: _Reader, image_dir: str | None) -> None:
    """musubi-tuner's video and edit subset keys (its dataset config is sd-scripts' with these added)."""
    videos = r.take("video_directory")
    if videos is not None and image_dir is not None:
        r.unsupported("video_directory", f"{videos}: this subset's image_dir is the folder; put the videos in it "
                                         "(Load Dataset reads images and videos together)")
    elif videos is not None:
        r.set("dataset", "folder", videos, "video_directory")
    targets = r.take("target_frames")
    if targets is not None:
        counts = [int(t) for t in (targets if isinstance(targets, list) else [targets])]
        r.set("dataset", "frames", max(counts), "target_frames")
        if len(counts) > 1:
            r.unsupported("target_frames", f"{counts}: one sample length per clip; {max(counts)} is used (clips "
                                           "shorter than it train with the longest length they have)")
    extraction = r.take("frame_extraction")
    if extraction in ("head", "chunk", "uniform"):
        r.set("dataset", "frame_extraction", extraction, "frame_extraction")
    elif extraction is not None:
        r.unsupported("frame_extraction", f"{extraction}: ours are head, chunk and uniform")
    control = r.take("control_directory")
    if control is not None:
        r.set("dataset", "control_folder", control, "control_directory")


def _import_reg(label: str, values: dict, main: dict, config: RunConfig) -> None:
    r = _Reader({}, config)
    if "image_dir" in values:
        r.set("dataset", "reg_folder", values["image_dir"], f"{label}.image_dir")
    repeats = values.get("num_repeats", 1)
    if _number(repeats) != 1:
        r.unsupported(f"{label}.num_repeats", f"{repeats}: put the regularisation images in a `{repeats}_name` "
                                              "sub-folder of the regularisation folder")
    for key, value in values.items():
        if key in ("image_dir", "is_reg", "num_repeats") or main.get(key) == value:
            continue
        r.unsupported(f"{label}.{key}", REASONS.get(key, "the image subset's value holds for every image"))


def _extra_subset(label: str, values: dict, kind: str, config: RunConfig) -> None:
    repeats = values.get("num_repeats", 1)
    config.unsupported.append(
        f"{label}: not supported (one dataset folder and one regularisation folder per run: put the images of "
        f"{values.get('image_dir', 'this subset')} in a `{repeats}_name` sub-folder of the {kind} folder)")


# --- values ---


def _typed(section: str, name: str, value: Any) -> Any:
    """`value` as the setting's type where kohya writes it as text (network_args, GUI fields) or a whole float."""
    if section in RUN_KEYS:
        return value
    kind = declared(SETTINGS[section])[name][0].type.split("|")[0].strip()
    if kind == "bool" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if kind in ("int", "float") and isinstance(value, str) and _number(value) is not None:
        value = _number(value)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    return None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _pairs(value: Any) -> dict[str, str]:
    """kohya's key=value list (network_args, optimizer_args: a TOML list or the GUI's spaced string) as a dict."""
    if not value:
        return {}
    if isinstance(value, dict):
        return dict(value)
    items = value.split() if isinstance(value, str) else [str(v) for v in value]
    out = {}
    for item in items:
        key, _, text = item.strip().strip('"').partition("=")
        out[key.strip()] = text.strip().strip('"')
    return out


def _basename(path: str) -> str:
    return (PureWindowsPath(path) if "\\" in path else PurePath(path)).name


# --- writing -----------------------------------------------------------------------------------------------


def export_kohya(config: RunConfig) -> str:
    """sd-scripts training arguments (train_network.py --config_file) of `config`; what kohya lacks in comments."""
    w = _Writer(config)
    for write in (_model_out, _network_out, _rates_out, _optimizer_out, _schedule_out, _precision_out, _loss_out,
                  _timesteps_out, _dataset_out, _declared_out):
        write(w)
    if w.network_args:
        w.args["network_args"] = [f"{k}={_arg_text(v)}" for k, v in w.network_args.items()]
    return w.text()


class _Writer:
    """Our settings (defaults filled in) and the kohya arguments written from them."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.values = {s: _with_defaults(config, s) for s in SETTINGS}
        self.args: dict[str, Any] = {}
        self.network_args: dict[str, Any] = {}
        self.used: set[tuple[str, str]] = set()
        self.notes: list[str] = []

    def get(self, section: str, name: str) -> Any:
        self.used.add((section, name))
        return self.values[section][name]

    def text(self) -> str:
        lines = ["# kohya sd-scripts training arguments (train_network.py --config_file), written by Lora Foundry.",
                 "# output_dir: set where kohya saves the LoRA."]
        defaults = {s: _defaults(s) for s in SETTINGS}
        left = [f"#   {name} = {toml_value(value)}" for s in SETTINGS for name, value in self.values[s].items()
                if (s, name) not in self.used and value != defaults[s][name]]
        if left:
            lines += ["# Settings kohya has no key for, left out (those at their defaults are not listed):", *left]
        lines += [f"# {note}" for note in self.notes]
        lines += [f"{key} = {toml_value(value)}" for key, value in self.args.items()]
        return "\n".join(lines) + "\n"


def _defaults(section: str) -> dict[str, Any]:
    out = {}
    for name, (f, spec) in declared(SETTINGS[section]).items():
        value = default_of(f)
        out[name] = (0 if f.type.startswith("int") else 0.0) if value is None and spec.zero_is_none else value
    return out


def _with_defaults(config: RunConfig, section: str) -> dict[str, Any]:
    return {**_defaults(section), **config.values.get(section, {})}


def _arg_text(value: Any) -> str:
    return str(value) if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def _model_out(w: _Writer) -> None:
    model = w.config.values.get("model", {})
    base = model.get("checkpoint") or model.get("diffusion_model")
    if base:
        w.args["pretrained_model_name_or_path"] = base
    if model.get("vae"):
        w.args["ae" if model.get("clip_type") == "flux" else "vae"] = model["vae"]
    if model.get("text_encoders"):
        w.notes.append(f"text_encoders {toml_value(model['text_encoders'])}: set clip_l / clip_g / t5xxl to them")
    if str(model.get("weight_dtype", "")).startswith("fp8"):
        w.args["fp8_base"] = True  # kohya's fp8 is e4m3fn
    w.args["output_name"] = w.config.run_value("run", "output_name")
    w.args["save_precision"] = SAVE_PRECISIONS_OUT[w.config.run_value("run", "save_precision")]


def _network_out(w: _Writer) -> None:
    algorithm, targets = w.get("network", "algorithm"), w.get("network", "targets")
    if algorithm == "locon":
        algorithm, targets = "lora", "locon" if targets == "kohya" else targets
    rank, alpha = w.get("network", "rank"), w.get("network", "alpha")
    conv_rank, conv_alpha = w.get("network", "conv_rank") or None, w.get("network", "conv_alpha")
    native = (algorithm in ("lora", "dylora") and targets in ("kohya", "locon") and not w.values["network"]["dora"]
              and not w.values["network"]["use_tucker"])
    if native:
        w.args["network_module"] = "networks.lora" if algorithm == "lora" else "networks.dylora"
        if targets == "locon":
            w.network_args["conv_dim"] = conv_rank or rank
            w.network_args["conv_alpha"] = conv_alpha if conv_alpha is not None else conv_rank or alpha  # as ours
        elif conv_rank or conv_alpha is not None:
            w.notes.append("conv_rank / conv_alpha: targets kohya adapt no kxk convolution (kohya's conv_dim would "
                           "add the ResBlocks' ones: targets locon); left out")
        if algorithm == "dylora":
            w.network_args["unit"] = w.get("network", "dylora_unit")
    else:
        _lycoris_out(w, algorithm, targets, conv_rank, conv_alpha)
    _block_ranks_out(w, native=w.args["network_module"] == "networks.lora")
    w.args["network_dim"], w.args["network_alpha"] = rank, alpha
    for name, key in (("rank_dropout", "rank_dropout"), ("module_dropout", "module_dropout")):
        if w.get("network", name):
            w.network_args[key] = w.values["network"][name]
    if w.get("network", "network_dropout"):
        if native:
            w.args["network_dropout"] = w.values["network"]["network_dropout"]
        else:
            w.network_args["dropout"] = w.values["network"]["network_dropout"]  # LyCORIS reads its own
    if not w.get("network", "train_text_encoder"):
        w.args["network_train_unet_only"] = True


def _lycoris_out(w: _Writer, algorithm: str, targets: str, conv_rank: int | None, conv_alpha: float | None) -> None:
    w.args["network_module"] = "lycoris.kohya"
    w.network_args["algo"] = "locon" if algorithm == "lora" else algorithm
    w.network_args["preset"] = LYCORIS_PRESETS_OUT[targets]
    if targets == "locon":
        w.notes.append("targets locon: LyCORIS has no such preset; full also adapts conv_in, conv_out and the time "
                       "embedding")
    if conv_rank:
        w.network_args["conv_dim"] = conv_rank
        w.network_args["conv_alpha"] = conv_alpha if conv_alpha is not None else conv_rank  # ours; LyCORIS: alpha
    elif conv_alpha is not None:
        w.network_args["conv_alpha"] = conv_alpha
    if algorithm == "lokr":
        w.network_args["factor"] = w.get("network", "lokr_factor")
    if algorithm == "dylora":
        w.network_args["block_size"] = w.get("network", "dylora_unit")
    for name, key in (("dora", "dora_wd"), ("use_tucker", "use_tucker")):
        if w.get("network", name):
            w.network_args[key] = True


def _block_ranks_out(w: _Writer, native: bool) -> None:
    for name, key in (("block_ranks", "block_dims"), ("block_alphas", "block_alphas")):
        text = w.get("network", name)
        if not text:
            continue
        parts = [p.strip() for p in str(text).split(",")]
        if native and len(parts) == 25:
            w.network_args[key] = ",".join(parts)
        elif native and len(parts) == 19:  # SDXL: kohya's form adds the embedding, 3 middle parts and the out block
            fill = str(w.values["network"]["rank" if name == "block_ranks" else "alpha"])
            w.network_args[key] = ",".join([fill, *parts[:9], parts[9], parts[9], parts[9], *parts[10:], fill])
        else:
            w.notes.append(f"{name} = {toml_value(text)}: kohya takes per-block values for networks.lora only, every "
                           "block listed (SD1.x / 2.x 25 values, SDXL 19); left out")


def _rates_out(w: _Writer) -> None:
    w.args["learning_rate"] = w.get("training", "learning_rate")
    if w.get("training", "text_encoder_lr"):
        w.args["text_encoder_lr"] = w.values["training"]["text_encoder_lr"]
    if w.get("training", "lora_plus_ratio"):  # 0 is off here; kohya would train the up factors at lr x 0
        w.network_args["loraplus_lr_ratio"] = w.values["training"]["lora_plus_ratio"]
    lrs = w.get("training", "block_lrs")
    if not lrs:
        return
    parts = [p.strip() for p in str(lrs).split(",")]
    if w.args.get("network_module") == "networks.lora" and len(parts) in (25, 19):
        half = 12 if len(parts) == 25 else 9
        mid = parts[half:half + 1] * (1 if half == 12 else 3)
        w.network_args.update(down_lr_weight=",".join(parts[:half]), mid_lr_weight=",".join(mid),
                              up_lr_weight=",".join(parts[half + 1:]))
    else:
        w.notes.append(f"block_lrs = {toml_value(lrs)}: kohya takes per-block learning rates for networks.lora only, "
                       "every block listed (SD1.x / 2.x 25 values, SDXL 19); left out")


def _optimizer_out(w: _Writer) -> None:
    name = w.get("training", "optimizer")
    pairs = _pairs([pair for line in w.get("training", "optimizer_args") for pair in line.split()])
    if name == "SGD" and _truthy(pairs.pop("nesterov", "False")):
        name = "SGDNesterov"  # momentum 0.9 unless given, as ours
    elif name == "SGD":
        pairs.setdefault("momentum", "0.9")  # kohya's SGD (torch's) has none unless given
    if name == "Adafactor":
        pairs.setdefault("scale_parameter", "False")
        pairs.update(relative_step="False", warmup_init="False")  # train at learning_rate, as ours
    pairs["weight_decay"] = _arg_text(float(w.get("training", "weight_decay")))
    w.args["optimizer_type"] = name
    w.args["optimizer_args"] = [f"{k}={v}" for k, v in pairs.items()]


def _schedule_out(w: _Writer) -> None:
    w.args["lr_scheduler"] = w.get("training", "scheduler")
    w.args["lr_warmup_steps"] = w.get("training", "warmup_steps")


def _precision_out(w: _Writer) -> None:
    w.args["mixed_precision"] = PRECISIONS_OUT[w.get("training", "precision")]


def _loss_out(w: _Writer) -> None:
    loss = w.get("training", "loss")
    w.args["loss_type"] = LOSSES_OUT[loss]
    if loss == "huber":
        w.args["huber_schedule"] = "constant"


def _timesteps_out(w: _Writer) -> None:
    pair = (w.values["training"]["timestep_sampling"], w.values["training"]["timestep_shift"])
    if pair in SAMPLING_OUT:
        w.args["timestep_sampling"] = SAMPLING_OUT[pair]
        w.used.update({("training", "timestep_sampling"), ("training", "timestep_shift")})


def _dataset_out(w: _Writer) -> None:
    side = w.get("dataset", "resolution")
    w.args["resolution"] = f"{side},{side}"
    w.args["enable_bucket"] = True  # ours always buckets
    w.args["cache_latents"] = True  # ours always caches
    w.args["cache_latents_to_disk"] = w.get("training", "cache_latents") == "disk"
    if w.values["dataset"]["alpha_mask"] or w.values["dataset"]["mask_folder"]:
        w.args["masked_loss"] = True


def _declared_out(w: _Writer) -> None:
    """The settings whose kohya key holds the same value as ours."""
    for key, (section, name) in kohya_names().items():
        if section in RUN_KEYS or (section, name) in w.used or key in w.args or key == "caption_extention":
            continue
        value = w.get(section, name)
        if key in DATASET_CONFIG_ONLY:
            if value != _defaults(section)[name]:
                w.notes.append(f"{name} = {toml_value(value)}: kohya has {key} in a dataset config's subsets only"
                               + (" (or train_data_dir sub-folders named `N_name`)" if key == "num_repeats" else ""))
            continue
        if value is None or value == "" or (value == 0 and key in _ZERO_IS_ABSENT):
            continue
        if key not in NETWORK_ARG_KEYS:  # those are written with their network module, where it takes them
            w.args[key] = value
