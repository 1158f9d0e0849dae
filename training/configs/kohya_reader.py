"""One kohya config's keys as they are mapped onto our settings: converters take the keys they read, the rest map
through the settings' declared kohya names or are listed with why they were not."""

from __future__ import annotations

from typing import Any

from .kohya_names import GUI_NAMES, NO_EFFECT, NOT_NEEDED, REASONS, as_number, as_setting_type, kohya_names
from .run_config import RunConfig, checked_value


def flatten(data: dict) -> dict:
    """Training arguments as sd-scripts reads a --config_file: the keys of every [section] and the top-level ones."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


class Reader:
    """The keys of one kohya config being mapped: converters take what they read; `rest` maps or lists the others."""

    def __init__(self, values: dict, config: RunConfig, gui: bool = False):
        self.values, self.config, self.gui = dict(values), config, gui
        self.names = GUI_NAMES if gui else {}  # messages name a key as the file does
        self.module: str | None = None  # the network module, once read

    def take(self, key: str, default: Any = None) -> Any:
        return self.values.pop(key, default)

    def set(self, section: str, name: str, value: Any, key: str) -> None:
        value = as_setting_type(section, name, value)
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
            elif key not in NO_EFFECT or NO_EFFECT[key] not in (value, as_number(value)):
                self.unsupported(key, REASONS.get(key, "no setting of ours does this"))
        self.values.clear()
