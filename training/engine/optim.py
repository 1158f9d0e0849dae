"""Optimizers, LoRA+ parameter groups, learning-rate schedules, and pickle-free optimizer state for resuming.

Pure torch: nothing here knows about ComfyUI. Names and semantics follow kohya sd-scripts. Over 300 lines
because each optimizer and schedule is a short table entry, and resuming must know them all.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ...lora_core.adapters import PLUS_PARAMS

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "SGD", "Adafactor", "Prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# Optimizer state per parameter, in fp32 values (Adafactor's factored moments are a small fraction).
STATE_FLOATS = {"AdamW": 2.0, "AdamW8bit": 0.5, "Lion": 1.0, "SGD": 1.0, "Adafactor": 0.1, "Prodigy": 4.0}

# Arguments build_optimizer takes itself, so `extra` may not carry them.
_RESERVED = ("params", "lr", "weight_decay", "betas")
_STATE_FORMAT = 1


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): step by the sign of an interpolated momentum, with decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: invalid lr={lr}, betas={betas} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                momentum = state["exp_avg"]
                p.mul_(1.0 - lr * decay)
                p.add_(momentum.lerp(p.grad, 1.0 - beta1).sign_(), alpha=-lr)
                momentum.lerp_(p.grad, 1.0 - beta2)
        return loss


class Adafactor(torch.optim.Optimizer):
    """Adafactor as transformers' (kohya's): at the given learning rate, or with relative_step at
    min(1e-2, 1 / sqrt(step)) (warmup_init: min(1e-6 * step, 1 / sqrt(step))), the learning rate then unused.

    torch.optim.Adafactor always multiplies the step by max(eps2, RMS(param)), which barely moves parameters
    that start at zero such as lora_up, and has no switch for it; here that scaling is `scale_parameter`, off.
    """

    def __init__(self, params, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 scale_parameter: bool = False, relative_step: bool = False, warmup_init: bool = False):
        if lr < 0 or weight_decay < 0 or clip_threshold <= 0 or decay_rate > 0:
            raise ValueError(f"Adafactor: invalid lr={lr}, weight_decay={weight_decay}, "
                             f"clip_threshold={clip_threshold} or decay_rate={decay_rate}")
        defaults = {"lr": lr, "eps": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "beta1": beta1, "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                    "relative_step": relative_step, "warmup_init": warmup_init}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        eps1, eps2 = group["eps"]
        beta1 = group["beta1"]
        grad = p.grad.float()
        factored = grad.dim() >= 2
        state = self.state[p]
        if not state:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if beta1 is not None:
                state["exp_avg"] = torch.zeros_like(grad)
        state["step"] += 1
        param = p.float()  # p itself when it is float32; a float32 copy of bf16/fp16 weights
        lr = group["lr"]
        if group.get("relative_step"):  # state saved before relative steps existed has no such key
            step = state["step"]
            lr = min(1e-6 * step if group.get("warmup_init") else 1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr *= max(eps2, _rms(param).item())
        mix = state["step"] ** group["decay_rate"]  # 1 - beta2 at this step: 1 on the first step
        square = grad.square().add_(eps1)
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(square.mean(dim=-1), mix)
            col.lerp_(square.mean(dim=-2), mix)
            # Rank-1 estimate of the second moment: outer(row, col) / mean(row).
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = row_factor * col.rsqrt().unsqueeze(-2) * grad
        else:
            state["exp_avg_sq"].lerp_(square, mix)
            update = state["exp_avg_sq"].rsqrt() * grad
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if beta1 is not None:
            update = state["exp_avg"].mul_(beta1).add_(update, alpha=1.0 - beta1)
        if group["weight_decay"]:
            param.mul_(1.0 - group["weight_decay"] * lr)
        param.sub_(update)
        if param is not p:
            p.copy_(param)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(t.numel())


def _adamw8bit() -> type[torch.optim.Optimizer]:
    try:
        import bitsandbytes.optim
    except Exception as e:  # a broken install can fail with anything, not only ImportError
        raise RuntimeError(f"AdamW8bit needs bitsandbytes, which could not be imported ({e}): "
                           "`pip install bitsandbytes`, or choose the AdamW optimizer") from e
    return bitsandbytes.optim.AdamW8bit


def _prodigy() -> type[torch.optim.Optimizer]:
    try:
        import prodigyopt
    except Exception as e:
        raise RuntimeError(f"Prodigy needs the prodigyopt package, which could not be imported ({e}): "
                           "`pip install prodigyopt`, or choose another optimizer") from e
    return prodigyopt.Prodigy


# name -> (class getter, defaults that differ from the class's own)
_OPTIMIZERS: dict[str, tuple[Callable[[], type[torch.optim.Optimizer]], dict]] = {
    "AdamW": (lambda: torch.optim.AdamW, {}),
    "AdamW8bit": (_adamw8bit, {}),
    "Lion": (lambda: Lion, {}),
    # kohya's SGD has no momentum; plain SGD is rarely what anyone training a LoRA wants.
    "SGD": (lambda: torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    "Adafactor": (lambda: Adafactor, {}),
    "Prodigy": (_prodigy, {}),
}


def _keyword_names(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds and p.name != "self"}


def build_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float = 0.01,
                    betas: tuple | None = None, extra: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` over param_groups; `extra` holds optimizer-specific keywords (kohya's optimizer_args).

    Groups without their own "lr"/"weight_decay" get these. Prodigy uses `lr` as given: it expects about 1.0,
    as it estimates the step size itself, and it takes one lr for all groups (so no LoRA+). SGD defaults to
    momentum 0.9 (nesterov off); `extra` can change it.
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "Prodigy" and len({g.get("lr", lr) for g in param_groups} - {0.0}) > 1:
        raise ValueError("Prodigy estimates one step size for all parameters, so every parameter group needs the "
                         "same lr: turn LoRA+ off (ratio 0 or 1) or choose another optimizer")
    get_class, defaults = _OPTIMIZERS[name]
    cls = get_class()
    accepted = _keyword_names(cls)
    extra = dict(extra or {})
    reserved = sorted(k for k in extra if k in _RESERVED)
    if reserved:
        raise ValueError(f"{name}: pass {', '.join(reserved)} as build_optimizer's own argument, not in extra")
    unknown = sorted(set(extra) - accepted)
    if unknown:
        options = sorted(accepted - set(_RESERVED))
        raise ValueError(f"{name} does not accept {', '.join(unknown)}; its options are {', '.join(options)}")
    kwargs = {**defaults, "lr": lr, "weight_decay": weight_decay}
    if "fused" in accepted and all(p.is_cuda for g in param_groups for p in g["params"]):
        kwargs["fused"] = True  # one kernel for every parameter's update (torch's AdamW, SGD on CUDA)
    elif "foreach" in accepted:
        kwargs["foreach"] = True  # one operator per update stage for all parameters, on any device
    kwargs.update(extra)
    if betas is not None:
        if "betas" not in accepted:
            raise ValueError(f"{name} does not take betas")
        kwargs["betas"] = tuple(betas)
    return cls(param_groups, **kwargs)


def parse_optimizer_args(lines: list[str]) -> dict:
    """kohya's optimizer_args ("key=value", several per line allowed) as keywords: True / False, numbers, and
    comma-separated numbers (betas=0.9,0.99) as tuples; anything else stays text."""
    out = {}
    for line in lines:
        for pair in line.split():
            key, sep, text = pair.partition("=")
            if not sep or not key or not text:
                raise ValueError(f"optimizer_args: {pair!r} is not key=value (e.g. betas=0.9,0.99 or decouple=True)")
            out[key] = _argument(text)
    return out


def _argument(text: str):
    if text in ("True", "true", "False", "false"):
        return text in ("True", "true")
    parts = text.split(",")
    numbers = []
    for part in parts:
        try:
            numbers.append(int(part))
        except ValueError:
            try:
                numbers.append(float(part))
            except ValueError:
                return text
    return tuple(numbers) if len(parts) > 1 else numbers[0]


def lora_plus_groups(named_params: list[tuple[str, torch.nn.Parameter]], lr: float, ratio: float,
                     weight_decay: float) -> list[dict]:
    """LoRA+ groups: the zero-initialised side of each adapter at lr * ratio, the rest at lr.

    `named_params` are (name, parameter) pairs as adapters name them, with any prefix ("<module>.lora_up"); a
    parameter is on that side when its name is one an adapter class declares so (Adapter.plus_params).

    A ratio of 0 or 1 gives one group. Frozen parameters are left out; so are empty groups. The per-group "lr"
    is what LambdaLR records as each group's initial_lr.
    """
    if ratio < 0:
        raise ValueError(f"LoRA+ ratio must be >= 0, got {ratio}")
    plus = ratio not in (0, 1)
    base, up = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (up if plus and PLUS_PARAMS.intersection(name.split(".")) else base).append(param)
    groups = [{"params": base, "lr": lr, "weight_decay": weight_decay},
              {"params": up, "lr": lr * ratio, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def _schedule(name: str, total: int, warmup: int, cycles: int, power: float, floor: float) -> Callable[[int], float]:
    """The multiplier of the base lr at each step, shaped like the transformers/diffusers schedules."""

    def decay(progress: float) -> float:  # 1 -> 0 over progress 0 -> 1
        if name == "linear":
            return 1.0 - progress
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "cosine_with_restarts":
            return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
        return (1.0 - progress) ** power  # polynomial

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0  # kohya: plain constant ignores warmup
        if step < warmup:
            return step / warmup
        if name == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * decay(progress)

    return factor


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    num_cycles: int = 1, power: float = 1.0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step: linear warmup (except "constant"), then the named decay.

    Decays end at min_lr_ratio * lr; "cosine" is one half cosine, "cosine_with_restarts" has num_cycles hard
    restarts; "polynomial" is (1 - progress) ** power. The curve comes from these arguments, not from the state
    dict, which carries only the position (so a resumed run may change total_steps).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if total_steps < 1 or warmup_steps < 0 or num_cycles < 1 or power <= 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"invalid schedule: total_steps={total_steps}, warmup_steps={warmup_steps}, "
                         f"num_cycles={num_cycles}, power={power}, min_lr_ratio={min_lr_ratio}")
    factor = _schedule(name, total_steps, warmup_steps, num_cycles, power, min_lr_ratio)
    return LambdaLR(optimizer, factor)


def _encode(value, key: str, tensors: dict[str, torch.Tensor]):
    """A JSON tree for value, tagged so that restoring gives back the same types; tensors go to `tensors`."""
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"optimizer state key {key!r} is ambiguous")
        # A copy: safetensors refuses tensors that share storage (bitsandbytes shares its quantisation maps).
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"optimizer state {key}: cannot store a {type(value).__name__}")


def _decode(node: dict, tensors: dict[str, torch.Tensor]):
    (kind, value), = node.items()
    if kind == "tensor":
        if value not in tensors:
            raise KeyError(f"optimizer state tensor {value!r} is missing")
        return tensors[value]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    if kind == "list":
        return [_decode(v, tensors) for v in value]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    return value


def optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """opt.state_dict() as (tensors for safetensors, keyed "state.<param index>.<name>", JSON-serialisable rest)."""
    tensors: dict[str, torch.Tensor] = {}
    state = opt.state_dict()
    meta = {"format": _STATE_FORMAT, "optimizer": type(opt).__name__,
            "state": _encode(state["state"], "state", tensors),
            "param_groups": _encode(state["param_groups"], "param_groups", tensors)}
    return tensors, meta


def optimizer_state_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what optimizer_state_to_tensors saved into opt (same parameters, same groups).

    Create the LR scheduler before calling this: LambdaLR rewrites each group's lr when it is built.
    """
    if meta.get("format") != _STATE_FORMAT:
        raise ValueError(f"unsupported optimizer state format {meta.get('format')!r}")
    if meta.get("optimizer") != type(opt).__name__:
        raise ValueError(f"optimizer state was saved from {meta.get('optimizer')}, not {type(opt).__name__}")
    opt.load_state_dict({"state": _decode(meta["state"], tensors),
                         "param_groups": _decode(meta["param_groups"], tensors)})
