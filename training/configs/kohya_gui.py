"""A kohya_ss GUI JSON as the sd-scripts training arguments its lora_gui.py passes."""

from __future__ import annotations

from .kohya_names import GUI_LORAPLUS, GUI_NETWORK_KEYS, GUI_NETWORKS, NO_ALGORITHM, as_number
from .kohya_reader import check_plain
from .run_config import ConfigError, RunConfig


def gui_args(data: dict, config: RunConfig) -> dict:
    """A kohya_ss GUI config as the sd-scripts arguments its lora_gui.py passes."""
    check_plain(data, config.source)
    trains = _trained_parts(data, config)
    # The GUI leaves every "", false, 0 and null value out of those (its filter compares with ==, so 0 goes too):
    # sd-scripts then trains with its defaults, so such keys change nothing and are left out here as well.
    gui = {key: value for key, value in data.items() if value not in ("", False, None)}
    lora_type = gui.pop("LoRA_type", "Standard")
    fields = {key: gui.pop(key) for key in GUI_NETWORK_KEYS if key in gui}
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
    return {**args, **trains, **gui}


def _trained_parts(data: dict, config: RunConfig) -> dict:
    """What kohya_ss trains, told by its learning rates: a text encoder rate of 0 with a UNet rate trains the UNet
    only (its lora_gui.py); a UNet rate of 0 with a text encoder rate, the text encoders only, which we cannot."""
    te, unet = (as_number(data.get(key)) or 0 for key in ("text_encoder_lr", "unet_lr"))
    if te == 0 and unet != 0:
        return {"network_train_unet_only": True}
    if te != 0 and unet == 0:
        raise ConfigError(f"{config.source}: text_encoder_lr = {te:g} with unet_lr = 0: kohya_ss trains the text "
                          "encoders only; here the UNet / DiT always trains (train the text encoders alone with "
                          "kohya)")
    return {}


def _gui_network(lora_type: str, fields: dict, config: RunConfig) -> dict:
    # A field the GUI passes only for other LoRA types changes nothing for this one.
    if lora_type not in GUI_NETWORKS:
        raise ConfigError(f"{config.source}: LoRA_type = {lora_type!r}: ours are {', '.join(GUI_NETWORKS)}; "
                          f"{NO_ALGORITHM}")
    module, algo, keys = GUI_NETWORKS[lora_type]
    network_args = {key: fields[key] for key in (*keys, *GUI_LORAPLUS) if key in fields}
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
    steps = as_number(gui.get("max_train_steps"))
    epoch = gui.pop("epoch", None)
    if epoch is not None and steps is None:  # the GUI counts the steps of `epoch` epochs; with max_train_steps, none
        gui.setdefault("max_train_epochs", epoch)
    if epoch is not None and gui.get("lr_scheduler") == "cosine_with_restarts":
        gui.setdefault("lr_scheduler_num_cycles", epoch)  # the GUI's fallback
    percent = as_number(gui.pop("lr_warmup", None))
    if percent and "lr_warmup_steps" not in gui:
        if steps is None:
            config.unsupported.append(f"lr_warmup: not supported ({percent}% of the steps: set warmup_steps)")
        else:
            args["lr_warmup_steps"] = round(percent / 100 * steps)
