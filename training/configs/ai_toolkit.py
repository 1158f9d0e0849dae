"""ai-toolkit job configs (YAML or JSON: job, config.process[0] of type sd_trainer) read into a RunConfig: each key
mapped, or listed as not supported / not needed with why."""

from __future__ import annotations

from typing import Any

from .foreign import Table, first_only, model_file
from .run_config import ConfigError, RunConfig

NETWORK_TYPES = {"lora": "lora", "locon": "locon", "lokr": "lokr"}
OPTIMIZERS = {"adamw": "AdamW", "adam": "AdamW", "adamw8bit": "AdamW8bit", "adam8bit": "AdamW8bit", "lion": "Lion",
              "sgd": "SGD", "adafactor": "Adafactor", "prodigy": "Prodigy"}
SCHEDULERS = {"constant": "constant", "cosine": "cosine", "linear": "linear",
              "cosine_with_restarts": "cosine_with_restarts", "constant_with_warmup": "constant_with_warmup"}
PRECISIONS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
              "float16": "fp16"}
LOSSES = {"mse": "mse", "mae": "l1", "l1": "l1"}
# timestep_type as (timestep_sampling, timestep_shift): sigmoid draws logit-normal levels, linear uniform ones.
TIMESTEPS = {"sigmoid": ("logit_normal", "none"), "linear": ("uniform", "none")}
# model.arch / is_* flags as the family a LoRA's ss_base_model_version names.
ARCHES = {"flux": "flux1", "flux_kontext": "flux1", "flux2": "flux2", "chroma": "chroma", "sd3": "sd3",
          "sdxl": "sdxl_base_v1-0", "sd1": "sd_v1", "sd2": "sd_v2", "lumina2": "lumina2", "wan21": "wan21", "wan22_14b": "wan22",
          "wan22_5b": "wan22", "qwen_image": "qwen_image", "hunyuan_video": "hunyuan_video"}
FLAGS = {"is_flux": "flux1", "is_xl": "sdxl_base_v1-0", "is_v2": "sd_v2", "is_v3": "sd3", "is_lumina2": "lumina2"}
# ai-toolkit's defaults where they differ from ours: a config without the key trains with these.
DEFAULTS = {"train": {"lr": 1e-6, "steps": 1000, "gradient_checkpointing": True, "min_snr_gamma": 0.0},
            "network": {"linear_alpha": 1.0}}

NOT_NEEDED = {
    "training_folder": "adapters are saved in models/loras/<name>, the run's state in output/lora_foundry_runs",
    "device": "the run uses ComfyUI's device (torchrun for several GPUs)",
    "performance_log_every": "each run logs its losses to output/lora_foundry_runs/<name>",
    "logging": "each run logs its losses to output/lora_foundry_runs/<name>",
    "noise_scheduler": "the training objective is read from the model",
    "xformers": "attention runs through ComfyUI's optimized attention",
    "sdp": "attention runs through ComfyUI's optimized attention",
    "attention_backend": "attention runs through ComfyUI's optimized attention",
    "cache_text_embeddings": "the outputs of frozen text encoders are always cached",
    "unload_text_encoder": "the outputs of frozen text encoders are always cached",
    "cache_latents": "latents are always cached; cache_latents_to_disk sets where",
    "buckets": "images are always bucketed by aspect ratio",
    "bucket_tolerance": "bucket_step sets the bucket sizes",
    "num_workers": "there are no data-loader workers: latents are cached",
    "save_format": "adapters are saved as .safetensors",
    "sampler": "previews sample with the model's own sampling",
    "low_vram": "vram_budget_gb sets the memory a run may use",
    "transformer_only": "the adapters go where targets says",
    "type": "an sd_trainer process",
}
REASONS = {
    "max_step_saves_to_keep": "every saved checkpoint is kept",
    "quantize": "set [model] diffusion_model and weight_dtype = \"fp8_e4m3fn\" (UNETLoader's fp8)",
    "quantize_te": "the text encoders load as stored; their outputs are cached once",
    "flip_y": "flip mirrors left to right only",
    "random_crop": "images are resized into their bucket, never cropped at random",
    "default_caption": "an image without a caption file trains on the trigger word and prefix / suffix",
    "content_or_style": "no content / style timestep weighting; set timestep_sampling",
    "linear_timesteps": "no timestep weighting of the loss",
    "network_kwargs": "set include / exclude: layer name patterns of ours",
    "push_to_hub": "adapters are saved locally only",
    "walk_seed": "each prompt samples with seed + its index",
    "anchor_strength": "the anchor counts as much as each side (1.0)",
}
NO_EFFECT = {"train_unet": True, "content_or_style": "balanced", "push_to_hub": False, "flip_y": False,
             "random_crop": False, "linear_timesteps": False, "quantize": False, "walk_seed": True,
             "max_step_saves_to_keep": None, "anchor_strength": 1.0}


def is_ai_toolkit(data: Any) -> bool:
    """Whether parsed data is an ai-toolkit job: a config table with a process list."""
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and "process" in data["config"]


def import_ai_toolkit(data: dict, config: RunConfig) -> None:
    """An ai-toolkit job's first sd_trainer process into `config`."""
    top = Table(data, "", config)
    job = top.take("job")
    if job not in (None, "extension", "train"):
        raise ConfigError(f"{config.source}: job: {job!r} is not a training job (extension, with an sd_trainer "
                          "process)")
    body = top.table("config")
    top.take("meta")  # the job's name and version for the saved file's metadata
    top.rest({}, {}, {})
    process = _process(body)
    name = body.take("name")
    if name is not None:
        body.set("run", "output_name", name, "name")
    body.rest({}, {}, {})
    _read(process)


def _process(body: Table) -> Table:
    processes = body.take("process")
    if not isinstance(processes, list) or not processes:
        raise ConfigError(f"{body.config.source}: config.process must be a list of processes (- type: sd_trainer)")
    for index in range(1, len(processes)):
        body.unsupported(f"process[{index}]", "one process is trained; the first is used")
    process = Table(processes[0], "config.process[0]", body.config)
    if process.values.get("type", "sd_trainer") not in ("sd_trainer", "ui_trainer", "concept_slider"):
        raise ConfigError(f"{body.config.source}: config.process[0].type: {process.values['type']!r} is not a "
                          "trainer (sd_trainer, concept_slider)")
    return process


def _read(process: Table) -> None:
    for key, read in (("network", _network), ("train", _train), ("model", _model), ("save", _save),
                      ("sample", _sample), ("slider", _slider)):
        table = process.table(key)
        for name, value in DEFAULTS.get(key, {}).items():
            table.values.setdefault(name, value)
        read(table)
        table.rest(NOT_NEEDED, REASONS, NO_EFFECT)
    _datasets(process)
    trigger = process.take("trigger_word")
    if trigger is not None:
        process.set("captions", "trigger_word", trigger, "trigger_word")
    process.rest(NOT_NEEDED, REASONS, NO_EFFECT)


def _network(t: Table) -> None:
    kind = str(t.take("type", "lora")).lower()
    if kind not in NETWORK_TYPES:
        t.unsupported("type", f"{kind}: ours are lora, locon, lokr")
        kind = "lora"
    conv = t.take("conv") or 0  # checked as conv_rank
    t.set("network", "algorithm", "locon" if conv and kind == "lora" else NETWORK_TYPES[kind], "type")
    if conv:
        t.set("network", "targets", "locon", "conv")
        t.set("network", "conv_rank", conv, "conv")
        t.set("network", "conv_alpha", t.take("conv_alpha", conv), "conv_alpha")
    rank = t.take("linear", t.take("rank"))
    if rank is not None:
        t.set("network", "rank", rank, "linear")
    t.set_from("linear_alpha", "network", "alpha")
    t.take("alpha")  # linear_alpha's default, read above
    t.set_from("dropout", "network", "network_dropout")
    t.set_from("lokr_factor", "network", "lokr_factor")


def _train(t: Table) -> None:
    t.set_from("lr", "training", "learning_rate")
    t.set_from("unet_lr", "training", "learning_rate")
    t.set_from("steps", "training", "steps")
    t.set_from("batch_size", "training", "batch_size")
    t.set_from("gradient_accumulation_steps", "training", "grad_accum")
    t.set_from("gradient_accumulation", "training", "grad_accum")
    t.set_from("gradient_checkpointing", "training", "gradient_checkpointing")
    t.set_from("max_grad_norm", "training", "grad_clip")
    t.set_from("min_snr_gamma", "training", "min_snr_gamma", lambda v: 0.0 if v is None else v)
    t.set_from("noise_offset", "training", "noise_offset")
    t.set_from("reg_weight", "dataset", "prior_loss_weight")
    t.set_from("dtype", "training", "precision", lambda v: PRECISIONS.get(str(v).lower()))
    t.set_from("lr_scheduler", "training", "scheduler", lambda v: SCHEDULERS.get(str(v).lower()))
    t.set_from("loss_type", "training", "loss", lambda v: LOSSES.get(str(v).lower()))
    trains_te = t.take("train_text_encoder", False)
    t.set("network", "train_text_encoder", bool(trains_te), "train_text_encoder")
    if trains_te and "text_encoder_lr" in t.values:
        t.set_from("text_encoder_lr", "training", "text_encoder_lr")
    elif "text_encoder_lr" in t.values:
        t.not_needed("text_encoder_lr", "train_text_encoder is false")
        t.take("text_encoder_lr")
    if t.values.get("train_unet") is False:
        t.unsupported("train_unet", "false: the UNet / DiT always trains")
        t.take("train_unet")
    _optimizer(t)
    _timesteps(t)
    _ema(t)
    _preservation(t)
    if isinstance(t.values.get("lr_scheduler_params"), dict) and not t.values["lr_scheduler_params"]:
        t.take("lr_scheduler_params")


def _preservation(t: Table) -> None:
    """Differential output preservation: its class (ai-toolkit's default "person") and multiplier; blank prompt
    preservation: its multiplier (ai-toolkit's default 1)."""
    if t.take("diff_output_preservation", False):
        t.set("training", "preservation_class", str(t.take("diff_output_preservation_class", "person")),
              "diff_output_preservation_class")
        t.set_from("diff_output_preservation_multiplier", "training", "preservation_weight")
    else:
        t.take("diff_output_preservation_class")
        t.take("diff_output_preservation_multiplier")
    if t.take("blank_prompt_preservation", False):
        t.set("training", "blank_preservation_weight", t.take("blank_prompt_preservation_multiplier", 1.0),
              "blank_prompt_preservation_multiplier")
    else:
        t.take("blank_prompt_preservation_multiplier")


def _slider(t: Table) -> None:
    """A concept_slider process's prompts and guidance. ai-toolkit asks for target_class alone where we ask for each
    caption: a caption saying target_class has it said as each side's prompt, any other gets the side added."""
    if not t.values:
        return
    t.values.setdefault("guidance_strength", 3.0)  # ai-toolkit's default
    for key, name in (("positive_prompt", "slider_positive"), ("negative_prompt", "slider_negative"),
                      ("target_class", "slider_target"), ("anchor_class", "slider_anchor"),
                      ("guidance_strength", "slider_guidance")):
        if t.values.get(key) is None:
            t.take(key)
        else:
            t.set_from(key, "training", name)


def _optimizer(t: Table) -> None:
    name = str(t.take("optimizer", "adamw")).lower()
    params = t.table("optimizer_params")
    if name not in OPTIMIZERS:
        t.unsupported("optimizer", f"{name}: ours are {', '.join(OPTIMIZERS)}")
        params.values.clear()
        return
    t.set("training", "optimizer", OPTIMIZERS[name], "optimizer")
    decay = params.take("weight_decay", 0.01 if OPTIMIZERS[name].startswith("AdamW") else 0.0)  # torch's
    t.set("training", "weight_decay", decay, "optimizer_params.weight_decay")
    pairs = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in params.values.items()]
    t.set("training", "optimizer_args", pairs, "optimizer_params")
    params.values.clear()


def _timesteps(t: Table) -> None:
    kind = t.take("timestep_type")
    if kind is None:
        return
    if str(kind) in TIMESTEPS:
        sampling, shift = TIMESTEPS[kind]
        t.set("training", "timestep_sampling", sampling, "timestep_type")
        t.set("training", "timestep_shift", shift, "timestep_type")
    else:
        t.unsupported("timestep_type", f"{kind}: ours are sigmoid (logit_normal) and linear (uniform)")


def _ema(t: Table) -> None:
    ema = t.table("ema_config")
    if ema.take("use_ema", False):
        ema.set("training", "ema_decay", ema.take("ema_decay", 0.999), "ema_decay")
    else:
        ema.take("ema_decay")
    ema.rest(NOT_NEEDED, REASONS, NO_EFFECT)


def _model(t: Table) -> None:
    model_file(t, "name_or_path")
    family = ARCHES.get(str(t.values.get("arch", "")))
    if "arch" in t.values and family is None:
        t.unsupported("arch", f"{t.values['arch']}: not a family of ours")
    t.take("arch")
    for flag, name in FLAGS.items():
        if t.take(flag, False):
            family = family or name
    if family:
        t.set("model", "family", family, "arch")


def _save(t: Table) -> None:
    t.set_from("dtype", "run", "save_precision", lambda v: PRECISIONS.get(str(v).lower()))
    t.set_from("save_every", "training", "save_every")


def _sample(t: Table) -> None:
    t.set_from("sample_every", "training", "sample_every")
    t.set_from("sample_steps", "training", "sample_steps")
    t.set_from("guidance_scale", "training", "sample_cfg")
    options = [f"--{flag} {t.take(key)}" for key, flag in (("width", "w"), ("height", "h"), ("seed", "d"))
               if key in t.values]
    negative = t.take("neg") or ""
    if negative:
        options.append(f"--n {negative}")
    prompts = t.take("prompts")
    if prompts is not None:
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{t.config.source}: {t.name('prompts')} must be a list of prompts")
        t.set("training", "sample_prompts", [" ".join([p, *options]) for p in prompts], "prompts")


def _datasets(process: Table) -> None:
    datasets = process.take("datasets") or []
    if not isinstance(datasets, list):
        raise ConfigError(f"{process.config.source}: {process.name('datasets')} must be a list of datasets")
    tables = [Table(d, process.name(f"datasets[{i}]"), process.config) for i, d in enumerate(datasets)]
    train = [t for t in tables if not t.values.get("is_reg")]
    reg = [t for t in tables if t.values.get("is_reg")]
    first_only(train, _dataset, "folder_path", "one training dataset: the first is used")
    for index, table in enumerate(reg):
        table.take("is_reg")
        if index == 0:
            table.set_from("folder_path", "dataset", "reg_folder")
            if table.take("prior_reg", False):  # ai-toolkit trains these toward the base model's own prediction
                table.set("training", "prior_target", "base", "prior_reg")
        for key in table.values:
            table.unsupported(key, "one regularisation folder, read with the training dataset's options")
        table.values.clear()


def _dataset(t: Table) -> None:
    t.set_from("folder_path", "dataset", "folder")
    t.set_from("caption_ext", "dataset", "caption_extension", lambda v: "." + str(v).lstrip("."))
    t.set_from("caption_dropout_rate", "captions", "caption_dropout")
    t.set_from("shuffle_tokens", "captions", "shuffle_tags")
    t.set_from("keep_tokens", "captions", "keep_tokens")
    t.set_from("token_dropout_rate", "captions", "tag_dropout")
    t.set_from("num_repeats", "dataset", "repeats")
    t.set_from("flip_x", "training", "flip")
    t.set_from("cache_latents_to_disk", "training", "cache_latents", lambda v: "disk" if v else "memory")
    t.set_from("mask_path", "dataset", "mask_folder")
    t.set_from("alpha_mask", "dataset", "alpha_mask")
    t.set_from("control_path", "dataset", "control_folder")
    t.set_from("num_frames", "dataset", "frames")
    t.set_from("trigger_word", "captions", "trigger_word")
    _resolution(t)
    t.rest(NOT_NEEDED, REASONS, NO_EFFECT)


def _resolution(t: Table) -> None:
    value = t.take("resolution", 512)  # ai-toolkit's default
    sizes = value if isinstance(value, list) else [value]
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ConfigError(f"{t.config.source}: {t.name('resolution')} must be a size or a list of sizes")
    t.set("dataset", "resolution", max(sizes), "resolution")
    if len(sizes) > 1:  # each image at every size: our multi-resolution
        t.set("dataset", "resolutions", ", ".join(str(s) for s in sorted(set(sizes))), "resolution")

