"""The pieces our V3 node schemas share: our socket types, and inputs derived from declared settings
(lora_core.settings: type, default, range, choices and tooltip)."""

from __future__ import annotations

import functools
import inspect

from comfy_api.latest import io

from ..lora_core import settings
from ..lora_core.ranks import DYNAMIC_METHODS, RankRule
from ..lora_core.settings import declared, default_of

CATEGORY = "Lora Foundry"
Lora = io.Custom("LORA")  # a LoraNetwork: the adapter in memory
LoraDataset = io.Custom("LORA_DATASET")
LoraLoss = io.Custom("LORA_LOSS")
LoraStack = io.Custom("LORA_STACK")
TrainingConfig = io.Custom("LORA_TRAINING_CONFIG")  # a training.configs.run_config.RunConfig


def setting_inputs(names: list[str], classes: tuple, others: dict[str, io.Input],
                   optional: bool = False) -> list[io.Input]:
    """Inputs for `names` in that order (saved workflows rely on it): the setting declared under that input name in
    one of `classes`, else the node's own input from `others`."""
    found = {}
    for cls in classes:
        for name, entry in declared(cls).items():
            found.setdefault(name, entry)
    inputs = [setting_input(name, *found[name]) if name in found else others[name] for name in names]
    for i in inputs:
        i.optional = optional
    return inputs


def setting_input(name: str, f, spec) -> io.Input:
    """The widget of one declared setting."""
    kind = f.type.split("|")[0].strip()
    default = default_of(f)
    if default is None and spec.zero_is_none:
        default = 0 if kind == "int" else 0.0
    common = {"tooltip": spec.help}
    if spec.choices:
        return io.Combo.Input(name, options=list(spec.choices), default=default, **common)
    if kind == "bool":
        return io.Boolean.Input(name, default=default, **common)
    if kind in ("str", "list[str]"):
        if isinstance(default, list):
            default = "\n".join(default)
        return io.String.Input(name, default=default, multiline=spec.multiline or kind == "list[str]", **common)
    number = io.Int if kind == "int" else io.Float
    limits = {k: v for k, v in (("min", spec.min), ("max", spec.max), ("step", spec.step)) if v is not None}
    if kind == "float" and spec.step is not None and spec.step < 1e-3:
        limits["round"] = False  # keep typed values finer than the step, such as a 3e-6 learning rate
    return number.Input(name, default=default, **limits, **common)


class Node(io.ComfyNode):
    """Our nodes' base. Every number input is held to its declared min / max and must be finite, and a combo value
    must be one of its options, before anything runs (this host checks neither for V3 nodes): `validate_inputs` when
    the prompt arrives (widget values), and again as `execute` starts (values that came through a link)."""

    CHECKED_AT_RUN: tuple[str, ...] = ()  # combos the node checks when it runs, with a better message

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        execute = cls.__dict__.get("execute")
        if execute is not None and not getattr(execute.__func__, "checks_numbers", False):
            cls.execute = classmethod(_numbers_checked(execute.__func__))

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        problem = number_problem(cls, inputs)
        if problem:
            return problem
        for i in cls.define_schema().inputs:
            value = inputs.get(i.id)
            if isinstance(i, io.Combo.Input) and i.id not in cls.CHECKED_AT_RUN and isinstance(value, str) \
                    and value not in i.options:
                shown = ", ".join(map(str, i.options[:20])) + (" ..." if len(i.options) > 20 else "")
                return f"{i.id}: {value!r} is not one of {shown}"
        return True


def number_problem(node: type[io.ComfyNode], values: dict) -> str | None:
    """What is wrong with each Int / Float input of `node`'s schema whose value in `values` is past its declared
    min / max or not finite, one per line (None: nothing)."""
    problems = [settings.number_problem(i.id, values.get(i.id), i.min, i.max) for i in node.define_schema().inputs
                if isinstance(i, (io.Int.Input, io.Float.Input))]
    return "\n".join(p for p in problems if p) or None


def _numbers_checked(execute):
    """`execute` that first refuses a number past its input's range (ValueError naming the input, range, value)."""
    signature = inspect.signature(execute)

    @functools.wraps(execute)
    def checked(cls, *args, **kwargs):
        bound = signature.bind_partial(cls, *args, **kwargs).arguments
        more = [name for name, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD]
        values = {**(bound.pop(more[0], {}) if more else {}), **bound}
        problem = number_problem(cls, values)
        if problem:
            raise ValueError(problem)
        return execute(cls, *args, **kwargs)

    checked.checks_numbers = True
    return checked


def rank_inputs(rank: int, tooltip: str) -> list[io.Input]:
    """The rank of a toolbox result: fixed, or chosen per layer from its singular values."""
    return [
        io.Int.Input("rank", default=rank, min=1, max=4096, tooltip=tooltip),
        io.Combo.Input("dynamic", options=["off", *DYNAMIC_METHODS], default="off",
                       tooltip="Choose each layer's rank from its singular values S (rank is then the maximum). "
                               "sv_ratio: keep S > S[0] / param (param > 1). sv_cumulative: keep the fewest S whose "
                               "sum reaches param of their total (0-1). sv_fro: keep param (0-1) of the Frobenius "
                               "norm of the change."),
        io.Float.Input("dynamic_param", default=0.9, min=0.0, max=1000.0, step=0.001),
    ]


def rank_rule(rank: int, dynamic: str, dynamic_param: float) -> RankRule:
    return RankRule(rank) if dynamic == "off" else RankRule(rank, dynamic, dynamic_param)
