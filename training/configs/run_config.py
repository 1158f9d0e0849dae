"""A run's settings as one document: our TOML (read, checked, written with every setting's help), shared by the
Load / Save Training Config nodes, Train LoRA, Load Dataset and the headless command.

Sections hold node-input values by input name (what the widgets show: `conv_rank = 0` means "= rank"), so the nodes
and the headless command build their settings from them with `from_inputs`, as from widgets. Every key comes from a
declared setting (lora_core.settings); [run] and [model] are the run's own: its name, and the model files a
headless run loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import tomllib

from ...lora_core.metadata import FAMILIES
from ...lora_core.network import NetworkConfig
from ...lora_core.settings import declared, default_of
from ..data.captions import CaptionOptions
from ..data.dataset_options import DatasetOptions
from ..engine.config import TrainConfig

SETTINGS = {"network": NetworkConfig, "training": TrainConfig, "captions": CaptionOptions, "dataset": DatasetOptions}
# The run's own keys: {section: {key: (type, default, help)}}.
RUN_KEYS = {
    "run": {
        "output_name": (str, "my_lora", "The run's name: its files are loras/<output_name>/<output_name>*.safetensors "
                                        "(a new run never reuses a used name: _2, _3, ... are added)."),
        "resume": (bool, False, "Continue the saved state of output_name (same settings, more steps)."),
        "save_precision": (str, "fp16", "Headless runs: the dtype of the adapter written at the end (fp16, bf16, "
                                        "fp32), as Save LoRA's precision."),
    },
    "model": {
        "checkpoint": (str, "", "Headless runs: a checkpoint (name in models/checkpoints or a path); or the three "
                                "below."),
        "diffusion_model": (str, "", "A diffusion model file (models/diffusion_models or a path)."),
        "text_encoders": (list, [], "Its text encoder files (models/text_encoders or paths)."),
        "clip_type": (str, "", "The text encoders' family as CLIPLoader names it (stable_diffusion, sd3, flux, ...); "
                               "empty: for one file the family's (below; stable_diffusion if it has none), flux for "
                               "two."),
        "vae": (str, "", "The VAE file (models/vae or a path)."),
        "weight_dtype": (str, "default", "The diffusion model's weight dtype, as UNETLoader's (default, "
                                         "fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2)."),
        "family": (str, "", "The base model's family, as a LoRA's ss_base_model_version names it (sd_v1, sd_v2, "
                            "sdxl_base_v1-0, sd3, flux1, chroma, lumina2, ...): which kohya script an export is "
                            "for; empty = told from the files above. Training reads the family from the model."),
    },
}
RUN_CHOICES = {("run", "save_precision"): ("fp16", "bf16", "fp32"),
               ("model", "weight_dtype"): ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
               ("model", "family"): ("", *dict.fromkeys(version for _, version in FAMILIES.values()))}
SECTIONS = (*RUN_KEYS, *SETTINGS)
GRAPH_SECTIONS = ("network", "training", "captions")  # what Train LoRA's config input overrides


class ConfigError(ValueError):
    """A config file the run cannot use; the message names the file, the key and what to do."""


@dataclass
class RunConfig:
    """Settings by section, as node-input values; only what the source sets (the rest keep their defaults)."""

    values: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    unsupported: list[str] = field(default_factory=list)  # keys read but not used, each with why
    changed: list[str] = field(default_factory=list)  # values taken as the nearest we have, each with why
    # The family a LoRA's metadata names (ss_base_model_version): which kohya script an export is for. Not a [model]
    # key: such a config has no model files, and a user adds [model] to it with theirs.
    base_family: str = ""
    source: str = "config"

    def section(self, name: str) -> dict[str, Any]:
        return self.values.setdefault(name, {})

    def inputs(self, *sections: str) -> dict[str, Any]:
        """The node-input values of `sections` merged (a key appears in one section only)."""
        out: dict[str, Any] = {}
        for s in sections:
            out.update(self.values.get(s, {}))
        return out

    def run_value(self, section: str, key: str) -> Any:
        """A [run] / [model] value, or its default."""
        return self.values.get(section, {}).get(key, RUN_KEYS[section][key][1])

    def describe(self) -> str:
        """What the config sets, one line per section, and what it could not use."""
        lines = [f"{self.source}:"]
        for s in SECTIONS:
            items = self.values.get(s)
            if items:
                lines.append(f"  [{s}] " + ", ".join(f"{k} = {_short(v)}" for k, v in items.items()))
        if self.changed:
            lines.append("  changed to the nearest we have:")
            lines += [f"    {c}" for c in self.changed]
        if self.unsupported:
            lines.append("  not supported (ignored):")
            lines += [f"    {u}" for u in self.unsupported]
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(section: str, key: str):
    """(python type, choices, min, max) a key's value must have, or None for a key that is not a setting."""
    if section in RUN_KEYS:
        entry = RUN_KEYS[section].get(key)
        return (entry[0], RUN_CHOICES.get((section, key), ()), None, None) if entry else None
    entry = declared(SETTINGS[section]).get(key)
    if entry is None:
        return None
    f, spec = entry
    name = f.type.split("|")[0].strip()
    kind = {"int": int, "float": float, "bool": bool, "str": str, "list[str]": list}[name]
    return kind, spec.choices, spec.min, spec.max


def checked_value(section: str, key: str, value: Any, where: str) -> Any:
    """`value` as the setting's type, or a ConfigError saying what the key takes."""
    kind, choices, low, high = _kind(section, key)
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          bool: isinstance(value, bool), str: isinstance(value, str),
          list: isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))}[kind]
    if not ok:
        wanted = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
                  list: "a list of strings"}[kind]
        raise ConfigError(f"{where}: [{section}] {key} = {value!r} must be {wanted}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: [{section}] {key} = {value} must be a finite number")
    if choices and value not in choices:
        raise ConfigError(f"{where}: [{section}] {key} = {value!r} is not one of {', '.join(choices)}")
    if kind in (int, float) and ((low is not None and value < low) or (high is not None and value > high)):
        raise ConfigError(f"{where}: [{section}] {key} = {value} is outside {low:g} to {high:g}")
    return value


def parse_toml(text: str, source: str = "config") -> RunConfig:
    """Our TOML into a RunConfig: values checked against their settings, unknown keys listed as not supported."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from error
    config = RunConfig(source=source)
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            config.unsupported.append(f"[{section}]: not a section of ours ({', '.join(SECTIONS)})")
            continue
        for key, value in table.items():
            if _kind(section, key) is None:
                config.unsupported.append(f"[{section}] {key}: not a setting")
                continue
            config.section(section)[key] = checked_value(section, key, value, source)
    return config


def settings_values(network: NetworkConfig | None = None, training: TrainConfig | None = None,
                    dataset: DatasetOptions | None = None, output_name: str | None = None) -> RunConfig:
    """Every setting of the given objects as node-input values (a whole config, for export)."""
    config = RunConfig(source="settings")
    objects = {"network": network, "training": training, "dataset": dataset,
               "captions": training.captions if training is not None else None}
    for section, instance in objects.items():
        if instance is None:
            continue
        for name, (f, spec) in declared(type(instance)).items():
            value = getattr(instance, f.name)
            if value is None and spec.zero_is_none:
                value = 0 if f.type.startswith("int") else 0.0
            if value is not None:
                config.section(section)[name] = value
    if output_name is not None:
        config.section("run")["output_name"] = output_name
    return config


def from_metadata(metadata: dict[str, str], source: str = "LoRA metadata") -> RunConfig:
    """The settings a LoRA of ours was trained with, from its lora_foundry_* metadata."""
    if "lora_foundry_training" not in metadata or "lora_foundry_config" not in metadata:
        raise ConfigError(f"{source}: no lora_foundry_training / lora_foundry_config metadata; only adapters trained "
                          "by Train LoRA carry their settings")
    try:
        training = json.loads(metadata["lora_foundry_training"])
        dataset_options = json.loads(metadata.get("lora_foundry_dataset_options", "null"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: its lora_foundry_* metadata is not valid JSON ({error}); the file was changed "
                          "by another tool, so its settings cannot be read back") from error
    captions = CaptionOptions(**_known(CaptionOptions, training.pop("captions", {})))
    train = TrainConfig(**_known(TrainConfig, training), captions=captions)
    network = NetworkConfig.from_json(metadata["lora_foundry_config"])
    dataset = None
    if isinstance(dataset_options, dict):
        dataset = DatasetOptions(**_known(DatasetOptions, dataset_options))
    config = settings_values(network, train, dataset, metadata.get("ss_output_name"))
    config.source = source
    family = metadata.get("ss_base_model_version", "")
    if family in RUN_CHOICES[("model", "family")][1:]:
        config.base_family = family
    return config


def _known(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def to_toml(config: RunConfig) -> str:
    """Our TOML of `config`, each key under its help as a comment."""
    lines = ["# Lora Foundry training config: every key is a Train LoRA / Load Dataset input (README: Configs)."]
    for section in SECTIONS:
        items = config.values.get(section)
        if not items:
            continue
        lines += ["", f"[{section}]"]
        for key, value in items.items():
            lines.append(f"# {_help(section, key)}")
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def _help(section: str, key: str) -> str:
    if section in RUN_KEYS:
        return RUN_KEYS[section][key][2]
    f, spec = declared(SETTINGS[section])[key]
    default = default_of(f)
    shown = "" if isinstance(default, list) else f" (default {toml_value(default) if default is not None else 0})"
    return " ".join(spec.help.split()) + shown


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, int, float or list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                          ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
