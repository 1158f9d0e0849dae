"""kohya's names: the keys of sd-scripts training arguments, dataset configs and kohya_ss GUI JSON, how their
values map onto our settings, and the value readers the importers and the exporter share.

A key maps through the declared `kohya` name of a setting (lora_core.settings) where its value means the same here,
else through a converter in kohya_args / kohya_export. Every key read that does not map is listed in
`RunConfig.unsupported` with why; the only ones left out quietly are those whose value changes nothing in kohya
either (see kohya_gui, NO_EFFECT).
"""

from __future__ import annotations

import math
import re
from pathlib import PurePath, PureWindowsPath
from typing import Any

from ...lora_core.settings import declared
from .run_config import RUN_KEYS, SETTINGS

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
NO_EFFECT = {"clip_skip": 1, "max_token_length": 75, "network_multiplier": 1.0, "num_processes": 1,
              "num_machines": 1, "model_prediction_type": "raw"}

# Keys sd-scripts reads as lists; a key we read otherwise holds one value (a list there is refused by name).
LIST_KEYS = frozenset({"network_args", "optimizer_args", "text_encoder_lr", "resolution", "target_frames"})
# What the converters (kohya_args, kohya_gui, kohya_dataset) make of the keys they read: the README's table.
CONVERTED_KEYS = {
    "network_module": "algorithm and targets; modules we do not have are refused",
    "algo": "algorithm (LyCORIS lora / locon, loha, lokr, dylora, glora, diag-oft, boft; iA3, full ... refused)",
    "preset": "targets (full: all, attn-mlp: kohya, attn-only: attention)",
    "LoRA_type": "network_module and algo as kohya_ss passes them; types we do not have are refused",
    "use_cp": "use_tucker (refused for low-rank LoKr: ComfyUI cannot apply its Tucker core)",
    "network_dim": "rank; LoKr above 1024: rank 1024, full matrices, as LyCORIS' huge dims",
    "mixed_precision": "precision (no: fp32)",
    "save_precision": "[run] save_precision (float: fp32)",
    "optimizer_type": "optimizer; D-Adaptation: Prodigy, CAME: Adafactor, paged / 8-bit Lion: ours; "
                      "schedule-free and unknown ones refused",
    "optimizer_args": "optimizer_args and weight_decay, with kohya's defaults made ours; Adafactor relative_step kept",
    "learning_rate": "learning_rate (the text encoders' too unless text_encoder_lr)",
    "unet_lr": "learning_rate",
    "text_encoder_lr": "text_encoder_lr; 0 with a UNet rate: train_text_encoder off",
    "network_train_unet_only": "train_text_encoder off",
    "network_train_text_encoder_only": "refused: the UNet / DiT always trains",
    "lr_scheduler": "scheduler",
    "lr_warmup_steps": "warmup_steps (a fraction: of max_train_steps)",
    "lr_warmup": "warmup_steps (kohya_ss: a percent of the steps)",
    "epoch": "epochs (kohya_ss, without max_train_steps)",
    "resolution": "resolution (width x height: the side of the same pixel count)",
    "bucket_reso_steps": "bucket_step, the nearest multiple of 8 from 8 to 256",
    "loss_type": "loss (l2: mse)",
    "timestep_sampling": "timestep_sampling and timestep_shift",
    "noise_offset": "noise_offset; none for Flux, SD3, Lumina, Anima and HunyuanImage (kohya's trainers apply none)",
    "keep_tokens_separator": "keep_tokens_separator: tags before it stay in front, after a second one at the end",
    "block_dims": "block_ranks (every block)",
    "block_alphas": "block_alphas (every block)",
    "down_lr_weight": "block_lrs", "mid_lr_weight": "block_lrs", "up_lr_weight": "block_lrs",
    "cache_latents_to_disk": "cache_latents (disk / memory)",
    "pretrained_model_name_or_path": "[model] checkpoint, or diffusion_model with clip_l / clip_g / t5xxl",
    "clip_l": "[model] text_encoders", "clip_g": "[model] text_encoders", "t5xxl": "[model] text_encoders",
    "ae": "[model] vae", "vae": "[model] vae (with a diffusion_model)", "fp8_base": "[model] weight_dtype fp8_e4m3fn",
    "image_dir": "folder (the first image subset) or reg_folder (the first is_reg subset)",
    "batch_size": "batch_size", "video_directory": "folder", "target_frames": "frames (the longest)",
    "frame_extraction": "frame_extraction", "control_directory": "control_folder",
    "validation_split": "validation_split; 1.0 (a validation-only dataset): listed, its images not trained on",
}
# LyCORIS algorithms and kohya_ss LoRA types we do not have: refused, never trained as a default LoRA.
NO_ALGORITHM = ("ours are LoRA / LoCon, LoHa, LoKr, DyLoRA, GLoRA, OFT and BOFT (lora_core/adapters); train it with "
                "kohya")

KOHYA_MODULES = {"networks.lora": "lora", "networks.lora_sd3": "lora", "networks.lora_flux": "lora",
                 "networks.lora_lumina": "lora", "networks.lora_anima": "lora", "networks.lora_hunyuan_image": "lora",
                 "networks.dylora": "dylora", "networks.loha": "loha", "networks.lokr": "lokr"}
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr", "dylora": "dylora", "diag-oft": "oft",
                 "boft": "boft", "glora": "glora"}
# LyCORIS presets as our targets: full (LyCORIS' default) adapts every layer, attn-mlp the transformer blocks.
LYCORIS_PRESETS = {"full": "all", "attn-mlp": "kohya", "attn-only": "attention"}
LYCORIS_PRESETS_OUT = {"all": "full", "kohya": "attn-mlp", "attention": "attn-only", "locon": "full"}
# Keys sd-scripts passes to the network module (network_args) rather than taking as arguments.
NETWORK_ARG_KEYS = frozenset({"conv_dim", "conv_alpha", "dora_wd", "rank_dropout", "module_dropout", "factor",
                              "use_tucker", "unit", "loraplus_lr_ratio", "block_dims", "block_alphas"})
# Keys kohya has only in a dataset config ([[datasets.subsets]]), not as training arguments.
DATASET_CONFIG_ONLY = frozenset({"num_repeats", "conditioning_data_dir"})

# sd-scripts' families whose trainers draw plain noise (flux_train_network.py and the others: no noise_offset).
NO_NOISE_OFFSET = {"networks.lora_flux": "Flux", "networks.lora_sd3": "SD3", "networks.lora_lumina": "Lumina",
                   "networks.lora_anima": "Anima", "networks.lora_hunyuan_image": "HunyuanImage"}
FAMILY_CHECKBOXES = {"flux1_checkbox": "Flux", "sd3_checkbox": "SD3", "lumina_checkbox": "Lumina",
                     "anima_checkbox": "Anima", "hunyuan_image_checkbox": "HunyuanImage"}
OPTIMIZERS_IN = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "sgd": "SGD", "sgdnesterov": "SGD",
                 "adafactor": "Adafactor", "prodigy": "Prodigy"}
_D_ADAPTATION = ("Prodigy", "Prodigy is D-Adaptation's successor: it estimates the step size as D-Adaptation "
                             "does, learning_rate its multiplier (about 1.0)")
_SAME_UPDATES = "the same updates; paged or 8-bit state only saves memory"
# kohya optimizers we have under another name: (ours, why); sd-scripts also takes full class names (module.Class).
OPTIMIZER_ALIASES = {
    **dict.fromkeys(("dadaptation", "dadaptadam", "dadaptadampreprint", "dadaptadagrad", "dadaptadan",
                     "dadaptadanip", "dadaptlion", "dadaptsgd"), _D_ADAPTATION),
    "prodigyplusschedulefree": ("Prodigy", "its schedule-free averaging is not kept; the step size is estimated "
                                           "as Prodigy does"),
    "came": ("Adafactor", "CAME is Adafactor with momentum and a confidence-weighted step: factored second moments "
                          "and beta1 at the same learning rate"),
    **dict.fromkeys(("pagedadamw", "pagedadamw32bit"), ("AdamW", _SAME_UPDATES)),
    "pagedadamw8bit": ("AdamW8bit", _SAME_UPDATES),
    **dict.fromkeys(("lion8bit", "pagedlion8bit"), ("Lion", _SAME_UPDATES)),
    "sgdnesterov8bit": ("SGD", _SAME_UPDATES),
}
# Optimizers whose learning rate means something else under ours: refused with why.
OPTIMIZERS_REFUSED = {
    **dict.fromkeys(("adamwschedulefree", "radamschedulefree", "sgdschedulefree"),
                    "schedule-free optimizers average their iterates and take a learning rate of their own; ours "
                    "follow a schedule: choose AdamW with a scheduler"),
}
# Prodigy's options (prodigyopt): D-Adaptation's of the same names mean the same there.
PRODIGY_ARGS = frozenset({"betas", "beta3", "eps", "weight_decay", "decouple", "use_bias_correction",
                          "safeguard_warmup", "d0", "d_coef", "growth_rate", "fsdp_in_use", "slice_p"})
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
    "secondary_separator": "captions are comma-separated tags; keep_tokens counts them",
    "caption_separator": "captions are comma-separated tags; keep_tokens counts them",
    "enable_wildcard": "captions are comma-separated tags",
    "sample_prompts": "a file of prompts: put its lines into sample_prompts",
}
GUI_NETWORK_KEYS = ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "use_cp", "use_scalar",
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
    "LyCORIS/GLoRA": ("lycoris.kohya", "glora", _LYCORIS),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", "diag-oft", (*_LYCORIS, "constrain", "rescaled")),
    "LyCORIS/BOFT": ("lycoris.kohya", "boft", (*_LYCORIS, "constrain", "rescaled")),
    "Flux1": ("networks.lora_flux", None, _DROPOUTS),
}
# The GUI's names of sd-scripts arguments (the GUI has no field of the sd-scripts name).
GUI_NAMES = {"optimizer_type": "optimizer", "resolution": "max_resolution"}
GUI_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
REPEATS_NAME = re.compile(r"^(\d+)_")
# Our 0 means none of these; kohya's is leaving the key out (its 0 would train no step or divide by zero).
ZERO_IS_ABSENT = frozenset({"max_train_epochs", "save_every_n_steps", "sample_every_n_steps",
                             "validate_every_n_steps"})


def kohya_names() -> dict[str, tuple[str, str]]:
    """{kohya key: (section, input name)} of the settings whose kohya key holds the same value as ours."""
    out = {}
    for section, cls in SETTINGS.items():
        for name, (_, spec) in declared(cls).items():
            if spec.kohya and spec.kohya not in CONVERTED:
                out[spec.kohya] = (section, name)
    return {**out, **EXTRA_NAMES}


# --- values ---


def as_setting_type(section: str, name: str, value: Any) -> Any:
    """`value` as the setting's type where kohya writes it as text (network_args, GUI fields) or a whole float."""
    if section in RUN_KEYS:
        return value
    kind = declared(SETTINGS[section])[name][0].type.split("|")[0].strip()
    if kind == "bool" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if kind in ("int", "float") and isinstance(value, str) and as_number(value) is not None:
        value = as_number(value)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def as_number(value: Any) -> int | float | None:
    """A finite number written as a number or as text, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        for kind in (int, float):
            try:
                number = kind(value.strip())
            except ValueError:
                continue
            return number if math.isfinite(number) else None
    return None


def is_true(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def key_values(value: Any) -> dict[str, str]:
    """kohya's key=value list (network_args, optimizer_args: a TOML list or the GUI's spaced string) as a dict."""
    if not value:
        return {}
    if isinstance(value, dict):
        return dict(value)
    items = value.split() if isinstance(value, str) else [str(v) for v in (value if isinstance(value, list) else
                                                                           [value])]
    out = {}
    for item in items:
        key, _, text = item.strip().strip('"').partition("=")
        out[key.strip()] = text.strip().strip('"')
    return out


def file_name(path: str) -> str:
    return (PureWindowsPath(path) if "\\" in path else PurePath(path)).name


def key_table() -> str:
    """Every kohya key the import reads and what it becomes, as the README's Markdown table."""
    rows = {key: ("mapped", f"`[{section}] {name}`") for key, (section, name) in kohya_names().items()}
    rows.update({key: ("converted", what) for key, what in CONVERTED_KEYS.items()})
    for key, value in NO_EFFECT.items():
        other = NOT_NEEDED.get(key) or REASONS.get(key, "no setting of ours does this")
        rows.setdefault(key, ("no effect", f"`{value}` is what ours does; another value is listed: {other}"))
    rows.update({key: ("not needed", why) for key, why in NOT_NEEDED.items() if key not in rows})
    rows.update({key: ("not supported", why) for key, why in REASONS.items() if key not in rows})
    order = ("mapped", "converted", "no effect", "not needed", "not supported")
    lines = ["| kohya key | read as | what it becomes, or why not |", "|---|---|---|"]
    for key, (kind, what) in sorted(rows.items(), key=lambda row: (order.index(row[1][0]), row[0].lower())):
        lines.append(f"| `{key}` | {kind} | {what.replace('|', '/')} |")
    return "\n".join(lines)
