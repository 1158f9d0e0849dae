"""sd-scripts training arguments (the `--config_file` TOML, or what the kohya_ss GUI passes) read into a RunConfig."""

from __future__ import annotations

import math
from typing import Any

from ...lora_core.adapters.lokr import FULL_MATRIX_RANK
from ..engine.optim import SCHEDULERS
from .kohya_names import (
    FAMILY_CHECKBOXES,
    KOHYA_DEFAULTS,
    KOHYA_MODULES,
    LOSSES_IN,
    LYCORIS_ALGOS,
    LYCORIS_PRESETS,
    NO_ALGORITHM,
    NO_NOISE_OFFSET,
    NOT_NEEDED,
    PRECISIONS_IN,
    SAMPLING_IN,
    SAVE_PRECISIONS_IN,
    as_number,
    is_true,
    key_values,
)
from .kohya_optimizer import read_optimizer
from .kohya_reader import Reader, check_plain
from .run_config import RunConfig


def import_args(values: dict, config: RunConfig, gui: bool = False) -> None:
    check_plain(values, config.source)
    values = dict(values)
    values.update(key_values(values.pop("network_args", None)))  # sd-scripts hands them to the network module
    for key, default in KOHYA_DEFAULTS.items():
        values.setdefault(key, default)
    reader = Reader(values, config, gui)
    for convert in (_network, _learning_rates, read_optimizer, _noise, _schedule, _precision, _loss, _timesteps,
                    read_resolution, read_buckets, _block_ranks, _block_lrs, _latent_cache, _model, _samples):
        convert(reader)
    reader.rest()


def _network(r: Reader) -> None:
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
        r.refuse("network_module", module, "ours are networks.lora (and its Flux / SD3 forms), networks.dylora, "
                                           f"networks.loha, networks.lokr and lycoris.kohya; {NO_ALGORITHM}")
    if name == "lokr":
        _lokr(r, "use_tucker")
    conv = "conv_dim" in r.values
    if conv:
        r.values.setdefault("conv_alpha", 1.0)  # sd-scripts' default
    r.set("network", "algorithm", "locon" if conv and name == "lora" else name, "network_module")
    r.set("network", "targets", "locon" if conv else "kohya", "network_module")


def _lycoris(r: Reader, algo: str, preset: str) -> None:
    tucker_key = "use_cp" if "use_cp" in r.values else "use_tucker"
    for alias, key in (("use_cp", "use_tucker"), ("block_size", "unit"), ("dropout", "network_dropout")):
        if alias in r.values:
            r.values[key] = r.take(alias)
    name = LYCORIS_ALGOS.get(algo)
    if name is None:
        r.refuse("algo", algo, f"LyCORIS' {algo} is not an algorithm of ours: {NO_ALGORITHM}")
    if name == "lokr":
        _lokr(r, tucker_key)
    if name in ("oft", "boft"):
        _orthogonal(r)
    r.set("network", "algorithm", name, "algo")
    if preset in LYCORIS_PRESETS:
        r.set("network", "targets", LYCORIS_PRESETS[preset], "preset")
    else:
        r.unsupported("preset", f"{preset}: ours are full (targets all), attn-mlp (kohya), attn-only (attention)")
    # LyCORIS' defaults: convolutions take network_dim / network_alpha, DyLoRA grows 4 ranks at a time.
    if "conv_dim" in r.values and not as_number(r.values.get("conv_alpha")):
        r.values["conv_alpha"] = r.values["network_alpha"]
    if name == "dylora":
        r.values.setdefault("unit", 4)


def _orthogonal(r: Reader) -> None:
    """LyCORIS' OFT / BOFT: network_dim is the block size, as ours; network_alpha means nothing to them, the cap
    on the rotation is `constraint` times each layer's outputs, where ours (and ComfyUI's, which applies the file)
    is alpha itself; no cap (LyCORIS' default) is alpha 0 here."""
    for key in ("constraint", "constrain"):
        value = r.take(key)
        if as_number(value):
            r.refuse(key, value, "LyCORIS caps the rotation at this times each layer's outputs, ComfyUI (which "
                                 "applies the file) at alpha itself: no one value means the same here; import "
                                 "with 0 (LyCORIS' default, no cap) and set alpha to the cap ComfyUI should apply")
    rescaled = r.take("rescaled")
    if rescaled is not None and is_true(rescaled):
        r.refuse("rescaled", rescaled, "we train no per-row rescale (ComfyUI leaves OFT's out when it applies the "
                                       "file); leave it off")
    for key in ("network_alpha", "conv_alpha"):
        if as_number(r.values.get(key)):
            r.changed(key, r.values[key], 0, "LyCORIS' OFT / BOFT ignore it; our alpha is the cap on the rotation, "
                                             "0 = none, as LyCORIS trains by default")
        if key in r.values:
            r.values[key] = 0


def _lokr(r: Reader, tucker_key: str) -> None:
    """LyCORIS' full-matrix LoKr (a dim past our largest rank) as our rank 1024, which is full matrices too; a Tucker
    core, which ComfyUI cannot apply to LoKr, is refused where the matrices are low rank (full ones have none)."""
    dims = {key: as_number(r.values.get(key)) for key in ("conv_dim", "network_dim")}
    full = (dims["network_dim"] or 0) > FULL_MATRIX_RANK and (dims["conv_dim"] is None or
                                                              dims["conv_dim"] > FULL_MATRIX_RANK)
    why = f"LyCORIS makes LoKr's matrices full at a dim this large; ours does at rank {FULL_MATRIX_RANK}"
    for key, number in dims.items():
        if number is not None and number > FULL_MATRIX_RANK:
            r.changed(key, r.values[key], FULL_MATRIX_RANK, why)
            r.values[key] = FULL_MATRIX_RANK
    for key in ("conv_alpha", "network_alpha"):
        number = as_number(r.values.get(key))
        if full and number is not None and number > FULL_MATRIX_RANK:
            r.changed(key, r.values[key], FULL_MATRIX_RANK, "full matrices take no alpha")
            r.values[key] = FULL_MATRIX_RANK
    tucker = r.values.get("use_tucker")
    if tucker is not None and is_true(tucker):
        r.take("use_tucker")
        if full:
            r.not_needed(tucker_key, "full-matrix LoKr has no Tucker core")
        else:
            r.refuse(tucker_key, tucker, "ComfyUI cannot apply LoKr's Tucker core (lokr_t2), so training refuses "
                                         "it: leave it off, or choose LoHa / LoCon for a Tucker core")


def _learning_rates(r: Reader) -> None:
    lr, unet, te = r.take("learning_rate"), r.take("unet_lr"), r.take("text_encoder_lr")
    unet_only = is_true(r.take("network_train_unet_only", False))
    te_only = r.take("network_train_text_encoder_only", False)
    if is_true(te_only):
        r.refuse("network_train_text_encoder_only", te_only, "the UNet / DiT always trains here; train the text "
                                                             "encoders alone with kohya")
    if isinstance(te, list):  # one per text encoder
        if len({as_number(x) for x in te}) > 1:
            r.unsupported("text_encoder_lr", f"{te}: one learning rate for every text encoder; the first is used")
        te = te[0] if te else None
    if unet is not None or lr is not None:
        r.set("training", "learning_rate", unet if unet is not None else lr, "unet_lr" if unet is not None else
              "learning_rate")
    trains_te = not unet_only and as_number(te) != 0  # sd-scripts leaves out parameters whose learning rate is 0
    r.set("network", "train_text_encoder", trains_te, "network_train_unet_only")
    if te is not None and as_number(te) != 0:
        r.set("training", "text_encoder_lr", te, "text_encoder_lr")
    elif trains_te and unet is not None and lr is not None and as_number(lr) != as_number(unet):
        r.set("training", "text_encoder_lr", lr, "learning_rate")  # kohya's text encoders learn at learning_rate


def _noise(r: Reader) -> None:
    """noise_offset where kohya's trainer for the family applies it: Flux, SD3 and the newer ones draw plain noise."""
    checked = [family for key, family in FAMILY_CHECKBOXES.items() if is_true(r.values.get(key, False))]
    family = NO_NOISE_OFFSET.get(r.module) or next(iter(checked), None)
    if family is None or "noise_offset" not in r.values:
        return
    if as_number(r.take("noise_offset")) != 0:
        r.not_needed("noise_offset", f"kohya's {family} trainer applies no noise offset")


def _schedule(r: Reader) -> None:
    name = r.take("lr_scheduler")
    if name is not None:
        if name in SCHEDULERS:
            r.set("training", "scheduler", name, "lr_scheduler")
        else:
            r.unsupported("lr_scheduler", f"{name}: ours are {', '.join(SCHEDULERS)}; constant is used")
    for key, user in (("lr_scheduler_num_cycles", "cosine_with_restarts"), ("lr_scheduler_power", "polynomial")):
        value = r.take(key)
        if value is None or as_number(value) == 1:  # kohya's default and ours
            continue
        if name == user:
            r.unsupported(key, f"{value}: our {user} uses 1")
        else:
            r.not_needed(key, f"only {user} uses it")
    _warmup(r)


def _warmup(r: Reader) -> None:
    value = r.take("lr_warmup_steps")
    if value is None:
        return
    number = as_number(value)
    if isinstance(number, float) and 0 < number < 1:  # sd-scripts: a fraction of the training steps
        steps = as_number(r.values.get("max_train_steps"))
        if steps is None:
            r.unsupported("lr_warmup_steps", f"{value} of the training steps: set warmup_steps")
            return
        number = round(number * steps)
    r.set("training", "warmup_steps", number if number is not None else value, "lr_warmup_steps")


def _precision(r: Reader) -> None:
    value = r.take("mixed_precision")
    if value is None:
        return
    if value in PRECISIONS_IN:
        r.set("training", "precision", PRECISIONS_IN[value], "mixed_precision")
    else:
        r.unsupported("mixed_precision", f"{value}: ours are no (fp32), fp16, bf16")


def _loss(r: Reader) -> None:
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


def _timesteps(r: Reader) -> None:
    sampling, scale = r.take("timestep_sampling"), r.take("sigmoid_scale")
    if sampling is not None:
        if sampling in SAMPLING_IN:
            levels, shift = SAMPLING_IN[sampling]
            r.set("training", "timestep_sampling", levels, "timestep_sampling")
            r.set("training", "timestep_shift", shift, "timestep_sampling")
        else:
            r.unsupported("timestep_sampling", f"{sampling}: ours are {', '.join(SAMPLING_IN)}")
    if scale is not None and as_number(scale) != 1:
        r.unsupported("sigmoid_scale", "our logit-normal levels have scale 1")


def read_resolution(r: Reader, key: str = "resolution") -> None:
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
    numbers = [as_number(p) for p in parts]
    if len(numbers) not in (1, 2) or not all(isinstance(n, int) and n > 0 for n in numbers):
        return None
    return numbers[0], numbers[-1]


def read_buckets(r: Reader) -> None:
    value = r.take("enable_bucket")
    if value is None:
        return
    if is_true(value):
        r.not_needed("enable_bucket", NOT_NEEDED["enable_bucket"])
    else:
        r.unsupported("enable_bucket", "false: kohya crops every image to resolution; images are always bucketed here")


def _ignored_by_module(r: Reader, keys: tuple[str, ...]) -> bool:
    """Whether the network module is one that does not read `keys` (only networks.lora has per-block values);
    then they are listed."""
    if r.module in (None, "networks.lora"):
        return False
    for key in keys:
        if key in r.values:
            r.take(key)
            r.not_needed(key, f"kohya's {r.module} ignores it")
    return True


def _block_ranks(r: Reader) -> None:
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


def _block_lrs(r: Reader) -> None:
    keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
    if _ignored_by_module(r, keys):
        return
    down, mid, up, threshold = (r.take(k) for k in keys)
    if down is None and mid is None and up is None:
        if threshold is not None:
            r.not_needed("block_lr_zero_threshold", "only down / mid / up_lr_weight use it")
        return
    text = _lr_weights(down, mid, up, as_number(threshold) or 0.0)
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
    numbers = [as_number(p) for p in parts]
    return None if any(n is None for n in numbers) else [float(n) for n in numbers]


def _latent_cache(r: Reader) -> None:
    value = r.take("cache_latents_to_disk")
    if value is not None:
        r.set("training", "cache_latents", "disk" if is_true(value) else "memory", "cache_latents_to_disk")


def _model(r: Reader) -> None:
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
    fp8 = is_true(r.take("fp8_base", False))
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


def _samples(r: Reader) -> None:
    if r.gui and "sample_prompts" in r.values:  # the GUI holds the prompts themselves, sd-scripts a file of them
        lines = [line.strip() for line in str(r.take("sample_prompts")).splitlines() if line.strip()]
        r.set("training", "sample_prompts", lines, "sample_prompts")
