"""A RunConfig written as the sd-scripts training arguments of its family's script (train_network.py,
sdxl_train_network.py, sd3_train_network.py, flux_train_network.py, lumina_train_network.py --config_file)."""

from __future__ import annotations

from typing import Any

from ...lora_core.metadata import LYCORIS_ALGOS
from ...lora_core.settings import declared, default_of
from .kohya_families import (
    FAMILY_ONLY,
    FLUX_MODEL_TYPES,
    UNKNOWN,
    encoder_files,
    family_of,
    script_of,
    sd3_timesteps_out,
)
from .kohya_names import (
    DATASET_CONFIG_ONLY,
    LOSSES_OUT,
    LYCORIS_PRESETS_OUT,
    NETWORK_ARG_KEYS,
    PRECISIONS_OUT,
    SAMPLING_OUT,
    SAVE_PRECISIONS_OUT,
    ZERO_IS_ABSENT,
    is_true,
    key_values,
    kohya_names,
)
from .run_config import RUN_KEYS, SETTINGS, RunConfig, toml_value


def export_kohya(config: RunConfig) -> str:
    """sd-scripts training arguments of `config` for its family's script; what that script lacks in comments."""
    w = _Writer(config)
    for write in (_model_out, _network_out, _rates_out, _optimizer_out, _schedule_out, _precision_out, _loss_out,
                  _timesteps_out, _dataset_out, _declared_out, _family_only):
        write(w)
    if w.network_args:
        w.args["network_args"] = [f"{k}={_arg_text(v)}" for k, v in w.network_args.items()]
    return w.text()


class _Writer:
    """Our settings (defaults filled in) and the kohya arguments written from them."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.family = family_of(config)
        self.script = script_of(config)
        self.values = {s: _with_defaults(config, s) for s in SETTINGS}
        self.args: dict[str, Any] = {}
        self.network_args: dict[str, Any] = {}
        self.used: set[tuple[str, str]] = set()
        self.notes: list[str] = []

    def get(self, section: str, name: str) -> Any:
        self.used.add((section, name))
        return self.values[section][name]

    def text(self) -> str:
        lines = [f"# kohya sd-scripts training arguments ({self.script.name} --config_file), written by Lora Foundry.",
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
    model, script = w.config.values.get("model", {}), w.script
    base = model.get("checkpoint") or model.get("diffusion_model")
    if base:
        w.args["pretrained_model_name_or_path"] = base
    files = encoder_files(list(model.get("text_encoders") or []), script.encoders)
    w.args.update(files)
    if model.get("vae"):
        w.args[script.vae_key] = model["vae"]
    missing = [k for k in ("pretrained_model_name_or_path", *script.encoders, script.vae_key) if k not in w.args
               and k != "vae"]  # a checkpoint holds its VAE
    if missing and script is not UNKNOWN:
        w.notes.append(f"{', '.join(missing)}: set to the model's files")
    left = [f for f in model.get("text_encoders") or [] if f not in files.values()]
    if left:
        w.notes.append(f"text_encoders {toml_value(left)}: {script.name} takes no more text encoder files")
    _fp8_out(w, model)
    if w.family in FLUX_MODEL_TYPES:
        w.args["model_type"] = FLUX_MODEL_TYPES[w.family]
    if w.family == "sd_v2":
        w.args["v2"] = True
        w.notes.append("v_parameterization: add v_parameterization = true for a 768-v model (SD 2.x 768)")
    if w.family == "sdxl_base_v1-0":
        w.args["cache_text_encoder_outputs"] = False  # as ours: the text encoders' outputs for each caption
    w.args["output_name"] = w.config.run_value("run", "output_name")
    w.args["save_precision"] = SAVE_PRECISIONS_OUT[w.config.run_value("run", "save_precision")]


def _fp8_out(w: _Writer, model: dict) -> None:
    dtype = str(model.get("weight_dtype", ""))
    if not dtype.startswith("fp8"):
        return
    if not model.get("diffusion_model"):
        w.notes.append(f"weight_dtype {dtype}: a checkpoint loads as it is stored; left out")
        return
    w.args["fp8_base"] = True
    if dtype == "fp8_e5m2":
        w.notes.append("weight_dtype fp8_e5m2: kohya's fp8_base is fp8_e4m3fn")


def _network_out(w: _Writer) -> None:
    algorithm, targets = w.get("network", "algorithm"), w.get("network", "targets")
    if algorithm == "locon":
        algorithm, targets = "lora", "locon" if targets == "kohya" else targets
    rank, alpha = w.get("network", "rank"), w.get("network", "alpha")
    conv_rank, conv_alpha = w.get("network", "conv_rank") or None, w.get("network", "conv_alpha")
    native = (algorithm in ("lora", "dylora") and targets in ("kohya", "locon") and not w.values["network"]["dora"]
              and not w.values["network"]["use_tucker"])
    if algorithm == "dylora" and w.script.module != "networks.lora":
        native = False  # networks.dylora adapts SD's UNets only; LyCORIS' DyLoRA any model
    if native:
        w.args["network_module"] = w.script.module if algorithm == "lora" else "networks.dylora"
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
    w.network_args["algo"] = "locon" if algorithm == "lora" else LYCORIS_ALGOS.get(algorithm, algorithm)
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
    if algorithm in ("oft", "boft") and w.get("network", "alpha"):
        w.notes.append(f"alpha = {w.get('network', 'alpha'):g}: our cap on the rotation; LyCORIS caps at its "
                       "constraint times each layer's outputs, so no one value means the same: exported without a "
                       "cap (constraint 0)")
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
    pairs = key_values([pair for line in w.get("training", "optimizer_args") for pair in line.split()])
    if name == "SGD" and is_true(pairs.pop("nesterov", "False")):
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
        if value is None or value == "" or (value == 0 and key in ZERO_IS_ABSENT):
            continue
        if key not in NETWORK_ARG_KEYS:  # those are written with their network module, where it takes them
            w.args[key] = value


def _family_only(w: _Writer) -> None:
    """The keys of other families' scripts left out (their settings are listed as kohya has no key for them, where
    not at their defaults); then SD3's own timestep keys."""
    names = kohya_names()
    for key in [k for k in w.args if k in FAMILY_ONLY and k not in w.script.keys]:
        del w.args[key]
        if key == "timestep_sampling":
            w.used -= {("training", "timestep_sampling"), ("training", "timestep_shift")}
        elif key in names:
            w.used.discard(names[key])
    pairs = sd3_timesteps_out(w.values["training"]) if w.family == "sd3" else None
    if pairs is not None:
        w.args.update(pairs)
        w.used.update({("training", "timestep_sampling"), ("training", "timestep_shift"), ("training", "shift")})
