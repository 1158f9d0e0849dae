"""One kohya config's keys as they are mapped onto our settings: converters take the keys they read, the rest map
through the settings' declared kohya names or are listed with why they were not."""

from __future__ import annotations

from typing import Any, NoReturn

from .kohya_names import GUI_NAMES, LIST_KEYS, NO_EFFECT, NOT_NEEDED, REASONS, as_number, as_setting_type, kohya_names
from .run_config import ConfigError, RunConfig, checked_value

_SCALARS = (str, int, float, bool)


def flatten(data: dict) -> dict:
    """Training arguments as sd-scripts reads a --config_file: the keys of every [section] and the top-level ones."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


def check_plain(values: dict, source: str) -> None:
    """A ConfigError naming the first key whose value is a table, or a list where kohya takes one value."""
    for key, value in values.items():
        if isinstance(value, _SCALARS):
            continue
        if key == "network_args" and isinstance(value, dict) and all(isinstance(v, _SCALARS) for v in value.values()):
            continue  # the kohya_ss GUI's fields, gathered by kohya_gui
        if key in LIST_KEYS and isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value):
            continue
        wanted = "a value or a list of values" if key in LIST_KEYS else "one value"
        raise ConfigError(f"{source}: {key} = {value!r} must be {wanted}")


class Reader:
    """The keys of one kohya config being mapped: converters take what they read; `rest` maps or lists the others."""

    def __init__(self, values: dict, config: RunConfig, gui: bool = False):
        check_plain(values, config.source)
        self.values, self.config, self.gui = dict(values), config, gui
        self.names = GUI_NAMES if gui else {}  # messages name a key as the file does
        self.module: str | None = None  # the network module, once read

    def take(self, key: str, default: Any = None) -> Any:
        return self.values.pop(key, default)

    def set(self, section: str, name: str, value: Any, key: str) -> None:
        value = as_setting_type(section, name, value)
        if (section, name) == ("dataset", "bucket_step"):
            value = self._bucket_step(value, key)
        where = f"{self.config.source}: {self.names.get(key, key)}"
        self.config.section(section)[name] = checked_value(section, name, value, where)

    def _bucket_step(self, value: Any, key: str) -> Any:
        """kohya takes any step; ours the nearest multiple of 8 from 8 to 256 (a latent cell is 8 pixels)."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return value  # checked_value says what it takes
        ours = min(256, max(8, round(value / 8) * 8))
        if ours != value:
            self.changed(key, value, ours, f"bucket sides here are multiples of 8 to 256 pixels; {ours} is the nearest")
        return ours

    def changed(self, key: str, value: Any, ours: Any, why: str) -> None:
        self.config.changed.append(f"{self.names.get(key, key)}: {value} -> {ours} ({why})")

    def refuse(self, key: str, value: Any, why: str) -> NoReturn:
        """Stops the import: the config means something we cannot do."""
        raise ConfigError(f"{self.config.source}: {self.names.get(key, key)} = {value!r}: {why}")

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
