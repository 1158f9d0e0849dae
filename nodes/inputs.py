"""Node inputs derived from declared settings (lora_core.settings): type, default, range, choices and tooltip."""

from __future__ import annotations

from ..lora_core.settings import declared, default_of

_TYPES = {"bool": "BOOLEAN", "int": "INT", "float": "FLOAT", "str": "STRING", "list[str]": "STRING"}


def setting_inputs(names: list[str], classes: tuple, others: dict[str, tuple]) -> dict[str, tuple]:
    """{input name: ComfyUI input} for `names` in that order (saved workflows rely on it): the setting declared
    under that input name in one of `classes`, else the node's own input from `others`."""
    found = {}
    for cls in classes:
        for name, entry in declared(cls).items():
            found.setdefault(name, entry)
    return {name: _input(*found[name]) if name in found else others[name] for name in names}


def _input(f, spec) -> tuple:
    kind = _TYPES[f.type.split("|")[0].strip()]
    default = default_of(f)
    if default is None and spec.zero_is_none:
        default = 0 if kind == "INT" else 0.0
    if isinstance(default, list):
        default = "\n".join(default)
    options = {"default": default, "tooltip": spec.help}
    options.update({k: v for k, v in (("min", spec.min), ("max", spec.max), ("step", spec.step)) if v is not None})
    if kind == "FLOAT" and spec.step is not None and spec.step < 1e-3:
        options["round"] = False  # keep typed values finer than the step, such as a 3e-6 learning rate
    if kind == "STRING" and (spec.multiline or f.type.startswith("list")):
        options["multiline"] = True
    return (spec.choices, options) if spec.choices else (kind, options)
