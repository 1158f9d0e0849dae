"""Reading one table of another trainer's config (ai-toolkit, OneTrainer): converters take its keys, the rest are
listed as not supported or not needed with why; a key is never dropped silently."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from .kohya_reader import Reader
from .run_config import ConfigError, RunConfig

MODEL_FILES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".gguf")


class Table:
    """One table (a mapping) of a foreign config, its keys named in messages by their path (train.lr)."""

    def __init__(self, data: Any, path: str, config: RunConfig):
        if not isinstance(data, dict):
            raise ConfigError(f"{config.source}: {path} must be a table of keys, not {type(data).__name__}")
        self.values, self.path, self.config = dict(data), path, config
        self.reader = Reader({}, config)

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def take(self, key: str, default: Any = None) -> Any:
        return self.values.pop(key, default)

    def table(self, key: str) -> Table:
        """A nested table (an empty one where the key is absent)."""
        return Table(self.take(key, None) or {}, self.name(key), self.config)

    def set(self, section: str, name: str, value: Any, key: str) -> None:
        self.reader.set(section, name, value, self.name(key))

    def set_from(self, key: str, section: str, name: str, convert=None) -> None:
        """Set a setting from `key` where the file has it (through `convert`: None from it means not supported)."""
        if key not in self.values:
            return
        value = self.take(key)
        converted = convert(value) if convert else value
        if converted is None:
            self.unsupported(key, f"{value!r}: no form of ours")
        else:
            self.set(section, name, converted, key)

    def unsupported(self, key: str, why: str) -> None:
        self.reader.unsupported(self.name(key), why)

    def not_needed(self, key: str, why: str) -> None:
        self.reader.not_needed(self.name(key), why)

    def rest(self, not_needed: dict[str, str], reasons: dict[str, str], no_effect: dict[str, Any]) -> None:
        """List the keys no converter took: not needed, at a value that changes nothing, or not supported."""
        for key, value in self.values.items():
            if key in not_needed:
                self.not_needed(key, not_needed[key])
            elif key not in no_effect or no_effect[key] != value:
                self.unsupported(key, reasons.get(key, "no setting of ours does this"))
        self.values.clear()


def model_file(table: Table, key: str, family_note: str = "") -> None:
    """A base model path: a file is [model] checkpoint; a Hub id or diffusers folder cannot be loaded."""
    value = table.take(key)
    if value is None:
        return
    if isinstance(value, str) and PurePath(value).suffix.lower() in MODEL_FILES:
        table.set("model", "checkpoint", value, key)
    else:
        table.unsupported(key, f"{value} is a Hub id or diffusers folder: set [model] checkpoint, or diffusion_model "
                               f"+ text_encoders + vae, to ComfyUI's files{family_note}")


def first_only(tables: list[Table], read, key: str, why: str) -> None:
    """Read the first table with `read`; each other one is listed under `key` as not supported (why), its keys dropped:
    a run trains one dataset folder."""
    for index, table in enumerate(tables):
        if index == 0:
            read(table)
        else:
            table.unsupported(key, why)
            table.values.clear()
