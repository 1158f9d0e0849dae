"""Inference: adapters as patches on MODEL / CLIP clones, through the host's own LoRA loader.

The host's key map and patch machinery do the work, so the result equals ComfyUI's
LoraLoader; what we add is a report of every key that did not match, instead of a log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import adapter_from_factors, without_tucker
from .files import factor_problems, split_modules
from .info import base_model


@dataclass
class ApplyReport:
    applied: list[str] = field(default_factory=list)  # module names that became patches
    unmatched: list[str] = field(default_factory=list)  # module names with no layer in the model
    mismatched: list[str] = field(default_factory=list)  # "name: file shape vs model shape"
    unknown_keys: list[str] = field(default_factory=list)  # tensors that are no adapter factor
    zeroed: list[str] = field(default_factory=list)  # weight keys left unpatched: block weight 0
    refused: list[str] = field(default_factory=list)  # "name: why": NaN / infinite / non-float values, not applied
    oversized: list[str] = field(default_factory=list)  # "name: rank r > n": applied, but larger than any change
    hint: str = ""  # what the whole file's fit suggests, e.g. a LoRA for another base model

    @property
    def ok(self) -> bool:
        return bool(self.applied) and not (self.unmatched or self.mismatched or self.unknown_keys or self.refused)

    def summary(self) -> str:
        lines = [f"{len(self.applied)} modules applied"]
        for title, items in (("refused, not applied (NaN / infinite / non-float values: the file is damaged, "
                              "re-download or re-export it)", self.refused),
                             ("no matching layer", self.unmatched), ("shape mismatch", self.mismatched),
                             ("unknown keys", self.unknown_keys)):
            if items:
                lines.append(f"{len(items)} {title}: " + ", ".join(items[:50]) + (" ..." if len(items) > 50 else ""))
        if self.oversized:
            lines.append(f"{len(self.oversized)} modules with a rank above what their layer can hold (applied; the "
                         "file is larger than it needs to be): " + ", ".join(self.oversized[:10])
                         + (" ..." if len(self.oversized) > 10 else ""))
        if self.zeroed:
            lines.append(f"{len(self.zeroed)} layers left unpatched by a block weight of 0")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


def lora_key_map(model=None, clip=None) -> dict:
    """{file module name: host weight key} for every naming ComfyUI understands, plus PEFT / diffusers UNet names.

    ComfyUI maps diffusers UNet attention layers only in the old attention-processor form
    (`attn1.processor.to_q`); PEFT and current diffusers files name them `[unet.]...attn1.to_q`.
    """
    import comfy.lora
    import comfy.utils

    key_map: dict = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
        for diffusers, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
            if diffusers.endswith(".weight"):
                for prefix in ("", "unet."):
                    key_map.setdefault(prefix + diffusers[: -len(".weight")], f"diffusion_model.{ldm}")
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def _weight_shapes(model, clip) -> dict[str, torch.Size]:
    shapes = {}
    for patcher in (model, clip.patcher if clip is not None else None):
        if patcher is not None:
            shapes.update({k: v.shape for k, v in patcher.model.state_dict().items()})
    return shapes


def _shape_problem(parts: dict[str, torch.Tensor], target: torch.Size) -> str | None:
    try:
        adapter = adapter_from_factors(parts, shape=tuple(target))
    except ValueError as e:
        return str(e)
    return adapter.shape_error(target) if adapter is not None else None


def _rank(parts: dict[str, torch.Tensor]) -> int:
    """A LoRA module's rank (its down factor's rows); 0 for other algorithms."""
    down = parts.get("lora_down.weight", parts.get("lora_A.weight"))
    return int(down.shape[0]) if down is not None and down.dim() >= 2 else 0


def _full_rank(shape: torch.Size | None) -> int:
    """The highest rank a change of a weight of `shape` can have."""
    if shape is None or len(shape) < 2:
        return 0
    return min(int(shape[0]), int(torch.Size(shape[1:]).numel()))


TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")


def _fit_hint(model, clip, names: list[str], metadata: dict[str, str] | None) -> str:
    """What to say when none of a file's modules (`names`) fits the model."""
    module_count = len(names)
    if module_count == 0:
        return "the file holds no LoRA / LoHa / LoKr modules: it is empty or not an adapter; choose another file"
    if clip is None and all(name.startswith(TEXT_ENCODER_PREFIXES) for name in names):
        return "all of the file's modules are for the text encoder: connect a CLIP to apply them"
    family = type(model.model.model_config).__name__ if model is not None else ""
    made_for = base_model(metadata or {})
    return (f"none of the file's {module_count} modules fits this model{f' ({family})' if family else ''}: it is "
            f"probably a LoRA for another base model{f' (its metadata says {made_for})' if made_for else ''}; "
            "choose a LoRA made for this model")


def apply_lora(model, clip, tensors: dict[str, torch.Tensor], strength_model: float = 1.0,
               strength_clip: float = 1.0, block_strength=None, metadata: dict[str, str] | None = None):
    """(MODEL clone, CLIP clone, ApplyReport) with the adapter in `tensors` patched in.

    `block_strength(weight_key) -> float`, when given, scales each UNet layer's strength; layers
    it gives 0 are left unpatched (listed in the report's `zeroed`), like a strength of 0 leaves a part.
    Modules with NaN / infinite / non-float values are refused (listed in `refused`). `metadata`, the
    file's, names the base model it was made for when none of its modules fits.
    """
    import comfy.lora
    import comfy.lora_convert

    tensors = comfy.lora_convert.convert_lora(tensors)
    key_map = lora_key_map(model, clip)
    modules, unknown = split_modules(tensors)
    report = ApplyReport(unknown_keys=sorted(unknown))
    shapes = _weight_shapes(model, clip)
    usable = {}
    for name, parts in modules.items():
        target = key_map.get(name)
        if target is None:
            report.unmatched.append(name)
            continue
        values = factor_problems(parts)
        if values:
            report.refused.append(f"{name}: {'; '.join(values)}")
            continue
        target_key = target[0] if isinstance(target, tuple) else target
        problem = None if isinstance(target, tuple) else _shape_problem(parts, shapes[target_key])
        if problem:
            report.mismatched.append(f"{name}: {problem}")
            continue
        usable[name] = target
        report.applied.append(name)
        rank, full = _rank(parts), _full_rank(shapes.get(target_key))
        if rank and full and rank > full:
            report.oversized.append(f"{name}: rank {rank} > {full}")
    kept = {f"{n}.{s}": t for n in usable for s, t in without_tucker(modules[n]).items()}
    patches = comfy.lora.load_lora(kept, {n: usable[n] for n in usable}, log_missing=False)

    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    unet = {k: v for k, v in patches.items() if (k[0] if isinstance(k, tuple) else k).startswith("diffusion_model.")}
    te = {k: v for k, v in patches.items() if k not in unet}
    if new_model is not None and unet and strength_model != 0:
        groups: dict[float, dict] = {}  # one add_patches per distinct strength: each call walks the state dict
        for key, patch in unet.items():
            weight_key = key[0] if isinstance(key, tuple) else key
            weight = 1.0 if block_strength is None else block_strength(weight_key)
            if weight == 0:
                report.zeroed.append(weight_key)
            else:
                groups.setdefault(weight, {})[key] = patch
        for weight, group in groups.items():
            new_model.add_patches(group, strength_model * weight)
    if new_clip is not None and te and strength_clip != 0:
        new_clip.add_patches(te, strength_clip)
    report.unmatched.sort()
    report.refused.sort()
    if not (report.applied or report.refused):
        report.hint = _fit_hint(model, clip, list(modules), metadata)
    return new_model, new_clip, report


def bake(model, tensors: dict[str, torch.Tensor], strength: float = 1.0):
    """A MODEL clone whose weights have the adapter merged in (W += strength * dW, in place)."""
    patched, _, report = apply_lora(model, None, tensors, strength, 0.0)
    patched.patch_model()
    return patched, report


def unbake(model) -> None:
    """Restore the exact weights a `bake` replaced."""
    model.unpatch_model()
