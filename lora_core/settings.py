"""Settings declared once, as peft's LoraConfig does: a dataclass field with its help, range and the names other
places use for it.

`setting(default, help, ...)` makes the field; the Train LoRA node's inputs (nodes/inputs.py), the values a node
hands the engine (`from_inputs`), the choices checked at construction (`check_choices`) and the kohya `ss_*`
metadata written into every file (`ss_metadata`) are all derived from these declarations.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Setting:
    """What a field declares besides its default."""

    help: str = ""
    input: str | None = None  # the node input's name, when it differs from the field's (saved workflows use it)
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    zero_is_none: bool = False  # the input's 0 stands for None ("0 = the UNet's learning rate")
    multiline: bool = False  # a text input; a list field takes one item per non-empty line
    kohya: str | None = None  # the sd-scripts argument / kohya_ss key (for config import)
    ss: tuple[str, ...] = ()  # metadata keys the value is written under (kohya's ss_* names)


def setting(default: Any, help: str = "", **declared) -> Any:
    """A dataclass field carrying its Setting."""
    metadata = {"setting": Setting(help=help, **declared)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def declared(cls) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """{input name: (field, its Setting)} for the declared fields of a settings dataclass, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if spec is not None:
            out[spec.input or f.name] = (f, spec)
    return out


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def number_problem(name: str, value: Any, low: float | None, high: float | None) -> str | None:
    """Why a number cannot be the value of input `name` declared from `low` to `high` (None: it can): NaN and
    infinity never, anything past either end never. Not a number at all: None (its type is checked elsewhere)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    span = f"from {low} to {high}" if low is not None and high is not None else (
        f"{low} or more" if low is not None else f"{high} or less" if high is not None else "a finite number")
    if isinstance(value, float) and not math.isfinite(value):  # a Python int is always finite (and may be huge)
        return f"{name}: {value} is not a finite number; give a value {span}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{name}: {value} is outside its range; give a value {span}"
    return None


def check_numbers(cls, inputs: dict[str, Any]) -> None:
    """ValueError naming the first declared number of `cls` in `inputs` that is not finite or is past its range."""
    for name, (_, spec) in declared(cls).items():
        problem = number_problem(name, inputs.get(name), spec.min, spec.max)
        if problem:
            raise ValueError(problem)


def from_inputs(cls, inputs: dict[str, Any], **values):
    """An instance of `cls` from node input values (by input name; absent ones keep the default), plus `values`.
    Numbers are held to their declared range first (widgets, a config file's values and a headless run's alike)."""
    check_numbers(cls, inputs)
    kwargs = {}
    for name, (f, spec) in declared(cls).items():
        if name not in inputs:
            continue
        value = inputs[name]
        if spec.zero_is_none and value == 0:
            value = None
        elif isinstance(default_of(f), list) and isinstance(value, str):
            value = [line.strip() for line in value.splitlines() if line.strip()]
        kwargs[f.name] = value
    return cls(**{**kwargs, **values})


def check_choices(instance) -> None:
    """A clear error for a declared setting whose value is not one of its choices."""
    for name, (f, spec) in declared(type(instance)).items():
        value = getattr(instance, f.name)
        if spec.choices and value not in spec.choices:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(spec.choices)}")


def ss_metadata(instance) -> dict[str, str]:
    """The kohya `ss_*` metadata of the settings that have a kohya name."""
    out = {}
    for f, spec in declared(type(instance)).values():
        for key in spec.ss:
            out[key] = str(getattr(instance, f.name))
    return out
