"""OneTrainer training presets / configs (JSON) read into a RunConfig: each key mapped, or listed as not supported /
not needed with why."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

from .foreign import Table, first_only, model_file
from .kohya_names import as_number
from .run_config import ConfigError, RunConfig

# OneTrainer's defaults where they differ from ours: a preset without the key trains with these.
DEFAULTS = {"learning_rate": 3e-6, "epochs": 100, "learning_rate_warmup_steps": 200, "train_dtype": "FLOAT_16",
            "gradient_checkpointing": "ON", "timestep_distribution": "UNIFORM"}
MARKERS = ("training_method", "model_type", "base_model_name", "concept_file_name", "peft_type")
PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
MODEL_TYPES = {"STABLE_DIFFUSION_15": "sd_v1", "STABLE_DIFFUSION_20": "sd_v2", "STABLE_DIFFUSION_20_BASE": "sd_v2",
               "STABLE_DIFFUSION_21": "sd_v2", "STABLE_DIFFUSION_21_BASE": "sd_v2", "STABLE_DIFFUSION_3": "sd3",
               "STABLE_DIFFUSION_35": "sd3", "STABLE_DIFFUSION_XL_10_BASE": "sdxl_base_v1-0", "FLUX_DEV_1": "flux1",
               "CHROMA_1": "chroma", "QWEN": "qwen_image", "Z_IMAGE": "z_image", "HUNYUAN_VIDEO": "hunyuan_video"}
OPTIMIZERS = {"ADAMW": "AdamW", "ADAM": "AdamW", "ADAMW_8BIT": "AdamW8bit", "ADAM_8BIT": "AdamW8bit", "LION": "Lion",
              "SGD": "SGD", "ADAFACTOR": "Adafactor", "PRODIGY": "Prodigy"}
SCHEDULERS = {"CONSTANT": "constant", "LINEAR": "linear", "COSINE": "cosine",
              "COSINE_WITH_RESTARTS": "cosine_with_restarts"}
PRECISIONS = {"FLOAT_32": "fp32", "BFLOAT_16": "bf16", "FLOAT_16": "fp16"}
SAMPLINGS = {"UNIFORM": "uniform", "LOGIT_NORMAL": "logit_normal"}
PRESETS = {"full": "all", "attn-mlp": "kohya", "attn-only": "attention"}
FP8 = {"FLOAT_8": "fp8_e4m3fn"}
NF4 = {"NFLOAT_4": "nf4"}  # OneTrainer's 4-bit weights: our base_quantization
# The optimizer keys OneTrainer writes whatever the optimizer (null or false: the optimizer's own default).
OPTIMIZER_ARGS = {"eps": "eps", "momentum": "momentum", "nesterov": "nesterov", "decouple": "decouple",
                  "d_coef": "d_coef", "d0": "d0", "use_bias_correction": "use_bias_correction",
                  "safeguard_warmup": "safeguard_warmup", "relative_step": "relative_step",
                  "scale_parameter": "scale_parameter", "warmup_init": "warmup_init"}
MODEL_PARTS = ("unet", "transformer", "prior")
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")

NOT_NEEDED = {
    **dict.fromkeys(("workspace_dir", "cache_dir", "debug_mode", "debug_dir", "tensorboard", "tensorboard_expose",
                     "tensorboard_always_on", "tensorboard_port", "backup_after", "backup_after_unit",
                     "rolling_backup", "rolling_backup_count", "backup_before_save", "continue_last_backup"),
                    "each run logs to and resumes from output/lora_foundry_runs/<name>"),
    "output_model_format": "adapters are saved as kohya .safetensors",
    "aspect_ratio_bucketing": "images are always bucketed by aspect ratio",
    "latent_caching": "latents are always cached",
    "clear_cache_before_training": "cache_latents = \"disk\" keeps latents beside the images, keyed by their contents",
    "dataloader_threads": "there are no data-loader workers: latents are cached",
    "train_device": "the run uses ComfyUI's device",
    "temp_device": "ComfyUI loads and offloads the models",
    "attention_mechanism": "attention runs through ComfyUI's optimized attention",
    "vae": "the VAE encodes the images once, before training",
    "enable_autocast_cache": "precision sets autocast",
    "fallback_train_dtype": "precision sets autocast",
    "huggingface_cache_dir": "models load from ComfyUI's folders",
    "only_cache": "latents are cached as the run starts",
    "sample_image_format": "previews are PNG",
    "sample_definition_file_name": "put the prompts into sample_prompts",
    "lora_weight_dtype": "the adapter trains in fp32",
    "__version": "the file's format version",
}
REASONS = {
    "concept_file_name": "a separate file: put its concepts inline (concepts) or set [dataset] folder",
    "learning_rate_cycles": "our cosine_with_restarts uses 1 cycle",
    "layer_filter": "set include / exclude: layer name patterns of ours",
    "masked_training": "a mask_folder or alpha_mask turns masked loss on",
    "unmasked_probability": "every step uses the mask",
    "embedding": "Lora Foundry trains adapters, not embeddings",
    "additional_embeddings": "Lora Foundry trains adapters, not embeddings",
    "multi_gpu": "several GPUs train through torchrun and the headless command",
    "lora_model_name": "training starts from new adapters; resume continues a run of ours",
    "samples": "put the prompts into sample_prompts",
    "sample_after_unit": "sample_every counts steps",
    "save_every_unit": "save_every counts steps",
}
NO_EFFECT = {"learning_rate_cycles": 1.0, "layer_filter": "", "layer_filter_regex": False, "masked_training": False,
             "additional_embeddings": [], "multi_gpu": False, "lora_model_name": "", "samples": None,
             "lora_decompose_norm_epsilon": True, "lora_decompose_output_axis": False,
             "rescale_noise_scheduler_to_zero_terminal_snr": False,
             "force_v_prediction": False, "force_epsilon_prediction": False, "generalized_offset_noise": False,
             "perturbation_noise_weight": 0.0, "noising_weight": 0.0, "noising_bias": 0.0, "mae_strength": 0.0,
             "log_cosh_strength": 0.0, "huber_strength": 0.0, "vb_loss_strength": 1.0, "mse_strength": 1.0,
             "unmasked_probability": 0.1, "embedding_learning_rate": None, "preserve_embedding_norm": False}


def is_onetrainer(data: Any) -> bool:
    """Whether parsed JSON is a OneTrainer config: its own top-level keys."""
    return isinstance(data, dict) and "LoRA_type" not in data and any(k in data for k in MARKERS)


def import_onetrainer(data: dict, config: RunConfig) -> None:
    """A OneTrainer preset or saved config into `config`."""
    t = Table(data, "", config)
    for key, value in DEFAULTS.items():
        t.values.setdefault(key, value)
    method = t.take("training_method", "LORA")
    if method != "LORA":
        raise ConfigError(f"{config.source}: training_method {method}: Lora Foundry trains adapters (LORA)")
    for read in (_model, _network, _rates, _optimizer, _steps, _timesteps, _loss, _ema, _saving, _parts, _concepts):
        read(t)
    t.rest(NOT_NEEDED, REASONS, NO_EFFECT)


def _enum(table: dict[str, str]):
    return lambda value: table.get(str(value).upper())


def _model(t: Table) -> None:
    kind = str(t.take("model_type", "STABLE_DIFFUSION_15"))  # OneTrainer's default
    if kind in MODEL_TYPES:
        t.set("model", "family", MODEL_TYPES[kind], "model_type")
    else:
        t.unsupported("model_type", f"{kind}: not a family Lora Foundry names ({', '.join(MODEL_TYPES)})")
    model_file(t, "base_model_name")
    destination = t.take("output_model_destination")
    if destination:
        t.set("run", "output_name", PurePath(str(destination)).stem, "output_model_destination")
    t.set_from("output_dtype", "run", "save_precision", _enum(PRECISIONS))


def _network(t: Table) -> None:
    peft = str(t.take("peft_type", "LORA"))
    if peft not in PEFT_TYPES:
        t.unsupported("peft_type", f"{peft}: ours are LORA, LOHA, LOKR")
    else:
        t.set("network", "algorithm", PEFT_TYPES[peft], "peft_type")
    t.set_from("lora_rank", "network", "rank")
    t.set("network", "alpha", t.take("lora_alpha", 1.0), "lora_alpha")  # OneTrainer's default
    t.set_from("lora_decompose", "network", "dora")
    t.set_from("dropout_probability", "network", "network_dropout")
    t.set_from("layer_filter_preset", "network", "targets", lambda v: PRESETS.get(str(v)))


def _rates(t: Table) -> None:
    t.set_from("learning_rate", "training", "learning_rate")
    t.set_from("learning_rate_scheduler", "training", "scheduler", _enum(SCHEDULERS))
    t.set_from("learning_rate_warmup_steps", "training", "warmup_steps", _whole)
    t.set_from("clip_grad_norm", "training", "grad_clip", lambda v: 0.0 if v is None else v)


def _optimizer(t: Table) -> None:
    options = t.table("optimizer")
    name = str(options.take("optimizer", "ADAMW"))
    if name not in OPTIMIZERS:
        options.unsupported("optimizer", f"{name}: ours are {', '.join(OPTIMIZERS)}")
        options.values.clear()
        return
    options.set("training", "optimizer", OPTIMIZERS[name], "optimizer")
    decay = options.take("weight_decay")
    options.set("training", "weight_decay", decay if decay is not None else 0.01 if "ADAMW" in name else 0.0,
                "weight_decay")
    betas = [options.take(k) for k in ("beta1", "beta2")]
    pairs = [f"betas={betas[0]},{betas[1]}"] if None not in betas else []
    for key, arg in OPTIMIZER_ARGS.items():
        value = options.take(key)
        if value not in (None, False):
            pairs.append(f"{arg}={value}")
    options.set("training", "optimizer_args", pairs, "optimizer")
    # OneTrainer writes every optimizer's options; null / false ones are the optimizer's own defaults.
    options.values = {k: v for k, v in options.values.items() if v not in (None, False, {}, [])}
    options.rest({"stochastic_rounding": "the adapter trains in fp32", "fused": "the optimizer is chosen by name",
                  "foreach": "the optimizer is chosen by name"}, {}, {})


def _steps(t: Table) -> None:
    t.set_from("epochs", "training", "epochs")
    t.set_from("batch_size", "training", "batch_size")
    t.set_from("gradient_accumulation_steps", "training", "grad_accum")
    t.set_from("train_dtype", "training", "precision", _enum(PRECISIONS))
    t.set_from("resolution", "dataset", "resolution", _side)
    t.set_from("offset_noise_weight", "training", "noise_offset")
    t.set_from("unmasked_weight", "training", "mask_floor")
    t.set_from("gradient_checkpointing", "training", "gradient_checkpointing",
               lambda v: v if isinstance(v, bool) else str(v).upper() != "OFF")
    t.set_from("min_noising_strength", "training", "min_timestep", lambda v: _whole(as_number(v), 1000))
    t.set_from("max_noising_strength", "training", "max_timestep", lambda v: _whole(as_number(v), 1000))


def _whole(value: Any, scale: float = 1) -> int | None:
    """A whole number from a number (None for anything else: listed as not supported)."""
    value = as_number(value)
    return round(value * scale) if value is not None and math.isfinite(value) else None


def _side(value: Any) -> int | None:
    parts = [as_number(p) for p in str(value).replace("x", ",").split(",")]
    if len(parts) != 1 or parts[0] is None:
        return None  # several sizes or width x height: listed
    return _whole(parts[0])


def _timesteps(t: Table) -> None:
    t.set_from("timestep_distribution", "training", "timestep_sampling", _enum(SAMPLINGS))
    dynamic, shift = t.take("dynamic_timestep_shifting", False), t.take("timestep_shift", 1.0)
    if dynamic:
        t.set("training", "timestep_shift", "resolution", "dynamic_timestep_shifting")
    elif as_number(shift) not in (1, None):
        t.set("training", "timestep_shift", "fixed", "timestep_shift")
        t.set("training", "shift", shift, "timestep_shift")
    else:
        t.set("training", "timestep_shift", "none", "timestep_shift")


def _loss(t: Table) -> None:
    weight, strength = t.take("loss_weight_fn", "CONSTANT"), t.take("loss_weight_strength", 5.0)
    if weight == "MIN_SNR_GAMMA":
        t.set("training", "min_snr_gamma", strength, "loss_weight_strength")
    elif weight == "CONSTANT":
        t.set("training", "min_snr_gamma", 0.0, "loss_weight_fn")
    else:
        t.unsupported("loss_weight_fn", f"{weight}: ours are CONSTANT and MIN_SNR_GAMMA")
    strengths = {k: as_number(t.values.get(k, d)) for k, d in (("mse_strength", 1.0), ("mae_strength", 0.0),
                                                            ("huber_strength", 0.0))}
    used = [k for k, v in strengths.items() if v]
    if len(used) == 1 and strengths[used[0]] == 1:
        t.set("training", "loss", {"mse_strength": "mse", "mae_strength": "l1", "huber_strength": "huber"}[used[0]],
              used[0])
        for key in strengths:
            t.take(key)
        t.set_from("huber_delta", "training", "huber_delta")


def _ema(t: Table) -> None:
    mode = t.take("ema", "OFF")
    decay, every = t.take("ema_decay", 0.999), t.take("ema_update_step_interval", 5)
    if mode != "OFF":
        t.set("training", "ema_decay", decay, "ema_decay")
        t.set("training", "ema_every", every, "ema_update_step_interval")


def _saving(t: Table) -> None:
    for key, name in (("save_every", "save_every"), ("sample_after", "sample_every")):
        unit = t.values.get(f"{key}_unit", "STEP" if key in t.values else None)
        if key in t.values and unit == "STEP":
            t.take(f"{key}_unit")
            t.set_from(key, "training", name)
        elif key in t.values:
            t.unsupported(key, f"every {t.take(key)} {str(unit).lower()}: {name} counts steps")


def _parts(t: Table) -> None:
    for part in MODEL_PARTS:
        table = t.table(part)
        if table.take("train", True) is False:
            table.unsupported("train", "false: the UNet / DiT always trains")
        if str(table.values.get("weight_dtype")) in FP8:
            table.set_from("weight_dtype", "model", "weight_dtype", FP8.get)
        elif str(table.values.get("weight_dtype")) in NF4:
            table.set_from("weight_dtype", "training", "base_quantization", NF4.get)
        table.rest({"model_name": "set [model] diffusion_model", "weight_dtype": "the model loads as stored (fp8: "
                    "FLOAT_8, 4 bits: NFLOAT_4)"}, {"learning_rate": "one learning rate for the "
                   "UNet / DiT: learning_rate"}, {"model_name": "", "learning_rate": None})
    trains = []
    for name in ENCODERS:
        table = t.table(name)
        trains.append(bool(table.take("train", False)))
        table.set_from("learning_rate", "training", "text_encoder_lr", lambda v: 0.0 if v is None else v)
        table.rest({"weight_dtype": "the text encoders load as ComfyUI stores them"}, {}, {"model_name": ""})
        if t.take(f"{name}_layer_skip", 0):
            t.unsupported(f"{name}_layer_skip", "the text encoders run as ComfyUI loads them")
        if f"{name}_sequence_length" in t.values:
            t.not_needed(f"{name}_sequence_length", "captions are encoded as ComfyUI encodes prompts")
            t.take(f"{name}_sequence_length")
    t.set("network", "train_text_encoder", any(trains), "text_encoder.train")


def _concepts(t: Table) -> None:
    concepts = t.take("concepts")
    if concepts is None:
        return
    if not isinstance(concepts, list):
        raise ConfigError(f"{t.config.source}: concepts must be a list of concepts")
    tables = [Table(c, f"concepts[{i}]", t.config) for i, c in enumerate(concepts)]
    tables = [c for c in tables if c.take("enabled", True)]
    first_only(tables, _concept, "path", "one dataset folder: the first enabled concept is used")


def _concept(c: Table) -> None:
    c.set_from("path", "dataset", "folder")
    strategy, balancing = c.take("balancing_strategy", "REPEATS"), c.take("balancing", 1.0)
    repeats = _whole(balancing)
    if strategy == "REPEATS" and repeats is not None and repeats == as_number(balancing):
        c.set("dataset", "repeats", repeats, "balancing")
    else:
        c.unsupported("balancing", f"{balancing} ({strategy}): repeats are whole numbers of repeats")
    text = c.table("text")
    source = text.take("prompt_source", "sample")
    if source != "sample":
        text.unsupported("prompt_source", f"{source}: captions come from a text file beside each image")
    text.set_from("enable_tag_shuffling", "captions", "shuffle_tags")
    text.set_from("keep_tags_count", "captions", "keep_tokens")
    if text.take("tag_dropout_enable", False):
        text.set_from("tag_dropout_probability", "captions", "tag_dropout")
    text.rest({"prompt_path": "captions come from a text file beside each image"}, {},
              {"tag_delimiter": ",", "tag_dropout_probability": 0.0})
    image = c.table("image")
    image.set_from("enable_random_flip", "training", "flip")
    if not image.values.get("enable_resolution_override"):
        image.values.pop("resolution_override", None)
    image.values = {k: v for k, v in image.values.items() if v not in (False, 0, 0.0)}  # augmentations off
    image.rest({"enable_crop_jitter": "images are resized into their bucket"}, {}, {})
    c.rest({"name": "a concept's label", "seed": "the run's seed draws everything", "image_variations": "latents "
            "are cached once", "text_variations": "captions are drawn each step", "concept_stats": "statistics"},
           {}, {"type": "STANDARD", "include_subdirectories": False, "loss_weight": 1.0})
