"""Reading a config text: our TOML, one of kohya's (sd-scripts training arguments or dataset config, kohya_ss GUI
JSON), an ai-toolkit job (YAML or JSON) or a OneTrainer config (JSON), told apart by their contents."""

from __future__ import annotations

import json
from typing import Any

import tomllib
import yaml

from .ai_toolkit import import_ai_toolkit, is_ai_toolkit
from .kohya_args import import_args
from .kohya_dataset import import_dataset
from .kohya_families import finish_family, read_family
from .kohya_gui import gui_args
from .kohya_reader import flatten
from .onetrainer import import_onetrainer, is_onetrainer
from .run_config import SECTIONS, ConfigError, RunConfig, parse_toml


def read_config(text: str, source: str = "config") -> RunConfig:
    """Our TOML, a kohya sd-scripts TOML (training arguments or dataset), a kohya_ss GUI JSON, an ai-toolkit job
    (YAML or JSON) or a OneTrainer config (JSON) as a RunConfig."""
    if is_ours(text):
        return parse_toml(text, source)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: not valid JSON ({error})") from error
        return import_data(data, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        data = _yaml(text)
        if data is None:
            raise ConfigError(f"{source}: not valid TOML ({error}) nor YAML") from error
    return import_data(data, source)


def import_data(data: Any, source: str) -> RunConfig:
    """Parsed config data, of whichever trainer's form it has, as a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config is a table of keys, not {type(data).__name__}")
    config = RunConfig(source=source)
    if is_ai_toolkit(data):
        import_ai_toolkit(data, config)
    elif is_onetrainer(data):
        import_onetrainer(data, config)
    else:
        return import_kohya(data, source)
    return config


def _yaml(text: str) -> Any:
    """YAML's data of a text (None where it is not YAML, or a bare string: not a config)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, (dict, list)) else None


def import_kohya(data: dict, source: str) -> RunConfig:
    """A kohya_ss GUI JSON, an sd-scripts dataset config or sd-scripts training arguments as a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a kohya config is a table of keys, not a {type(data).__name__}")
    config = RunConfig(source=source)
    if "LoRA_type" in data:
        import_args(gui_args(data, config), config, gui=True)
    elif "datasets" in data or "general" in data:
        import_dataset(data, config)
    else:
        values = flatten(data)
        read_family(values, config)
        import_args(values, config)
        finish_family(config)
    return config


def is_ours(text: str) -> bool:
    """Whether a text is our TOML: only tables, at least one of them ours (JSON is kohya_ss's)."""
    if text.lstrip().startswith("{"):
        return False
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False  # read_config says what is wrong
    return bool(data) and all(isinstance(v, dict) for v in data.values()) and any(k in SECTIONS for k in data)
