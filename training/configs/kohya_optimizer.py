"""kohya's optimizer_type and optimizer_args as ours: the same optimizer, one that trains the same way under
another name (D-Adaptation as Prodigy, CAME as Adafactor, paged and 8-bit forms), or refused by name."""

from __future__ import annotations

from ..engine.optim import OPTIMIZERS
from .kohya_names import (
    KOHYA_DECAY,
    OPTIMIZER_ALIASES,
    OPTIMIZERS_IN,
    OPTIMIZERS_REFUSED,
    PRODIGY_ARGS,
    as_number,
    is_true,
    key_values,
)
from .kohya_reader import Reader


def read_optimizer(r: Reader) -> None:
    """optimizer_type and optimizer_args as our optimizer, its options made to train as kohya's do."""
    name = str(r.take("optimizer_type") or "")
    if is_true(r.take("use_8bit_adam", False)):
        name = name or "AdamW8bit"
    if is_true(r.take("use_lion_optimizer", False)):
        name = name or "Lion"
    name = name or "AdamW"  # sd-scripts' default
    pairs = key_values(r.take("optimizer_args"))
    ours, kind = _our_optimizer(r, name)
    pairs = _as_our_optimizer(kind, pairs, r)
    decay = pairs.pop("weight_decay", KOHYA_DECAY.get(ours, 0.0))
    for key in ("lr", "params"):
        if pairs.pop(key, None) is not None:
            r.unsupported(f"optimizer_args {key}", "set learning_rate")
    r.set("training", "optimizer", ours, "optimizer_type")
    r.set("training", "weight_decay", decay, "optimizer_args weight_decay")
    r.set("training", "optimizer_args", [f"{k}={v}" for k, v in pairs.items()], "optimizer_args")


def _our_optimizer(r: Reader, name: str) -> tuple[str, str]:
    """(our optimizer, kohya's name for it in lower case) for kohya's `name`; a ConfigError for one we lack."""
    for kind in (name.lower(), name.lower().rsplit(".", 1)[-1]):  # sd-scripts also takes module.Class
        if kind in OPTIMIZERS_IN:
            return OPTIMIZERS_IN[kind], kind
        if kind in OPTIMIZER_ALIASES:
            ours, why = OPTIMIZER_ALIASES[kind]
            r.changed("optimizer_type", name, ours, why)
            return ours, kind.removesuffix("8bit")
        if kind in OPTIMIZERS_REFUSED:
            r.refuse("optimizer_type", name, OPTIMIZERS_REFUSED[kind])
    r.refuse("optimizer_type", name, f"ours are {', '.join(OPTIMIZERS)} (and what kohya calls D-Adaptation, CAME, "
                                     "paged and 8-bit forms of them); its learning rate means something else under "
                                     "another optimizer, so none stands in for it")


def _as_our_optimizer(kind: str, pairs: dict, r: Reader) -> dict:
    """optimizer_args that make our optimizer train as kohya's `kind` does (where their defaults differ)."""
    if kind == "sgdnesterov":
        return {"nesterov": "True", **pairs}
    if kind == "sgd":  # torch's SGD has no momentum unless given; ours has 0.9
        if "momentum" not in pairs:
            return {**pairs, "momentum": "0"}
        return {k: v for k, v in pairs.items() if k != "momentum" or as_number(v) != 0.9}
    if kind == "adafactor":
        return _adafactor(pairs, r)
    if kind == "came":  # Adafactor's factored moments with momentum beta1 (CAME's first beta)
        betas = str(pairs.pop("betas", "0.9")).strip("()[] ").split(",")
        for key in sorted(set(pairs) - {"weight_decay"}):
            r.unsupported(f"optimizer_args {key}", f"CAME's {key}: Adafactor has none of that meaning")
        return {"beta1": betas[0].strip(), **({"weight_decay": pairs["weight_decay"]} if "weight_decay" in pairs else {})}
    if kind.startswith("dadapt") or kind == "prodigyplusschedulefree":
        return _d_adaptation(kind, pairs, r)
    return pairs


def _adafactor(pairs: dict, r: Reader) -> dict:
    """kohya's Adafactor options as ours: relative steps (kohya's default; warmup_init turns them on) are kept."""
    relative = is_true(pairs.pop("relative_step", "True")) or is_true(pairs.get("warmup_init", "False"))
    out = {"relative_step": "True"} if relative else {}
    if is_true(pairs.pop("warmup_init", "False")):
        out["warmup_init"] = "True"
    if is_true(pairs.pop("scale_parameter", "True")):  # transformers' default; ours is False
        out["scale_parameter"] = "True"
    if relative:
        r.not_needed("learning_rate", "Adafactor's relative steps set the step size; kohya logs learning_rate only")
    return {**out, **pairs}


def _d_adaptation(kind: str, pairs: dict, r: Reader) -> dict:
    """D-Adaptation's options for Prodigy: those Prodigy has; its Adam couples weight decay unless told."""
    adam = kind in ("dadaptation", "dadaptadam", "dadaptadampreprint")
    if adam:
        pairs.setdefault("decouple", "False")
    kept = {}
    for key, value in pairs.items():
        if key in PRODIGY_ARGS and (adam or key != "betas"):
            kept[key] = value
        else:
            r.unsupported(f"optimizer_args {key}", f"Prodigy has no {key}" if key not in PRODIGY_ARGS else
                          f"{kind}'s {key} are not Prodigy's (Adam's)")
    return kept
