"""Reading a config text: our TOML, or one of kohya's (sd-scripts training arguments or dataset config, kohya_ss GUI
JSON), told apart by their contents."""

from __future__ import annotations

import json

import tomllib

from .kohya_args import import_args
from .kohya_dataset import import_dataset
from .kohya_gui import gui_args
from .kohya_reader import flatten
from .run_config import SECTIONS, ConfigError, RunConfig, parse_toml


def read_config(text: str, source: str = "config") -> RunConfig:
    """Our TOML, a kohya sd-scripts TOML (training arguments or dataset) or a kohya_ss GUI JSON as a RunConfig."""
    if is_ours(text):
        return parse_toml(text, source)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: not valid JSON ({error})") from error
        return import_kohya(data, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from error
    return import_kohya(data, source)


def import_kohya(data: dict, source: str) -> RunConfig:
    """A kohya_ss GUI JSON, an sd-scripts dataset config or sd-scripts training arguments as a RunConfig."""
    config = RunConfig(source=source)
    if "LoRA_type" in data:
        import_args(gui_args(data, config), config, gui=True)
    elif "datasets" in data or "general" in data:
        import_dataset(data, config)
    else:
        import_args(flatten(data), config)
    return config


def is_ours(text: str) -> bool:
    """Whether a text is our TOML: only tables, at least one of them ours (JSON is kohya_ss's)."""
    if text.lstrip().startswith("{"):
        return False
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return True  # parse_toml says what is wrong
    return bool(data) and all(isinstance(v, dict) for v in data.values()) and any(k in SECTIONS for k in data)
