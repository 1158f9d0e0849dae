"""Merging adapters: into one LoRA (exact sum then SVD, or concatenated ranks), or into a model.

Ratios are linear: the merged change of a module is sum_i ratio_i * dW_i. (kohya's merge_lora
multiplies up and down by the ratio each, squaring it, and merges ups and downs separately,
which adds cross terms: sd-scripts issues 586, 868.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .adapters import Adapter, LoRA
from .adapters.base import flat_shape
from .apply import ApplyReport, apply_lora
from .files import atomic_target
from .lowrank import change_of, refuse_base_dependent, scaled_matrices, truncate
from .metadata import result_metadata
from .network import LoraNetwork
from .ranks import RankRule
from .reports import LayerStat, Progress, ToolReport
from .svd import SvdOptions

Inputs = list[tuple[LoraNetwork, float]]


def _modules(inputs: Inputs, what: str) -> dict[str, tuple[tuple[int, ...], list[tuple[Adapter, float]]]]:
    """{module: (weight shape, [(adapter, ratio)])} over all inputs with a non-zero ratio, checked."""
    modules: dict[str, tuple[tuple[int, ...], list[tuple[Adapter, float]]]] = {}
    for i, (network, ratio) in enumerate(inputs, start=1):
        if ratio == 0:
            continue
        for name, adapter in network.adapters.items():
            refuse_base_dependent(adapter, f"input {i}, module {name}", what)
            shape, parts = modules.setdefault(name, (adapter.shape, []))
            if flat_shape(shape) != flat_shape(adapter.shape):
                raise ValueError(f"module {name}: input {i} changes a {list(adapter.shape)} weight, "
                                 f"an earlier input a {list(shape)} one; these LoRAs are for different models")
            if len(adapter.shape) > len(shape):  # a flattened conv (LoHa, PEFT) next to a kohya one
                modules[name] = (adapter.shape, parts)
            parts.append((adapter, ratio))
    if not modules:
        raise ValueError("nothing to merge: give at least one LoRA with a non-zero ratio")
    return modules


def _weight_keys(inputs: Inputs) -> dict[str, str]:
    keys: dict[str, str] = {}
    for network, _ in inputs:
        for name, key in network.weight_keys.items():
            keys.setdefault(name, key)
    return keys


def _template(inputs: Inputs) -> dict | None:
    return next((n.metadata for n, _ in inputs if getattr(n, "metadata", None)), None)


@torch.no_grad()
def merge_exact(inputs: Inputs, rule: RankRule, options: SvdOptions = SvdOptions(),
                progress: Progress | None = None, device=None) -> tuple[LoraNetwork, ToolReport]:
    """One LoRA with dW = sum_i ratio_i * dW_i per module, truncated to `rule` by SVD.

    Modules where every input is a LoRA are decomposed from their stacked factors (exact, never
    forming dW); others (LoHa, LoKr, mixes) from the dense sum.
    """
    start = time.perf_counter()
    modules = _modules(inputs, "merging")
    report = ToolReport(f"Merge LoRA (exact, {rule.describe()})")
    adapters: dict[str, LoRA] = {}
    for i, (name, (shape, parts)) in enumerate(sorted(modules.items())):
        kept = truncate(change_of(parts, shape, device), rule, options, seed=options.seed + i)
        if kept.dec.total <= 0:
            report.skipped.append(f"{name} (no change)")
        else:
            adapters[name] = LoRA.from_matrices(kept.up, kept.down, shape).cpu()
            report.layers.append(kept.stat(name))
        if progress:
            progress(i + 1, len(modules))
    report.seconds = time.perf_counter() - start
    return _network(adapters, inputs, report, {"mode": "exact", "rank": rule.describe()}), report


@torch.no_grad()
def merge_concat(inputs: Inputs, progress: Progress | None = None) -> tuple[LoraNetwork, ToolReport]:
    """One LoRA whose ranks are all the inputs' ranks side by side: exact, rank = sum of ranks.

    down_i are stacked and up_i concatenated with ratio_i * alpha_i / r_i folded into up_i; alpha = rank.
    """
    start = time.perf_counter()
    modules = _modules(inputs, "merging")
    report = ToolReport("Merge LoRA (concat)")
    adapters: dict[str, LoRA] = {}
    for i, (name, (shape, parts)) in enumerate(sorted(modules.items())):
        ups, downs = [], []
        for adapter, ratio in parts:
            if not isinstance(adapter, LoRA):
                raise ValueError(f"module {name}: concat merges LoRA / LoCon only, this input is "
                                 f"{adapter.algorithm}; use mode 'exact'")
            up, down = scaled_matrices(adapter)
            ups.append(up * ratio)
            downs.append(down)
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        norm_sq = float(((up.T @ up).double() * (down @ down.T).double()).sum())  # ||up @ down||_F^2
        adapters[name] = LoRA.from_matrices(up, down, shape)
        report.layers.append(LayerStat(name, up.shape[1], 1.0, norm_sq, "concat"))
        if progress:
            progress(i + 1, len(modules))
    report.seconds = time.perf_counter() - start
    return _network(adapters, inputs, report, {"mode": "concat"}), report


def _network(adapters: dict[str, LoRA], inputs: Inputs, report: ToolReport, source: dict) -> LoraNetwork:
    network = LoraNetwork(adapters, _weight_keys(inputs))
    source = {**source, "ratios": [ratio for _, ratio in inputs], "energy": report.energy}
    network.metadata = result_metadata(adapters, "", source, _template(inputs))
    return network


# --- into a model ----------------------------------------------------------------------------

def merge_into_model(model, clip, loras: list[tuple[dict[str, torch.Tensor], float, float]]):
    """(MODEL, CLIP, [ApplyReport]) with each (tensors, ratio_model, ratio_clip) patched in, on clones.

    Each LoRA goes through `apply_lora` (the host's key map and patches), so the result equals
    chaining ComfyUI's LoraLoader; weights become W + sum ratio_i * dW_i when the host loads the
    model for sampling, or when `save_checkpoint` writes it.
    """
    reports: list[ApplyReport] = []
    for tensors, ratio_model, ratio_clip in loras:
        model, clip, report = apply_lora(model, clip, tensors, ratio_model, ratio_clip)
        reports.append(report)
    return model, clip, reports


def save_checkpoint(path: str | os.PathLike, model, clip=None, vae=None, metadata: dict | None = None) -> Path:
    """Write MODEL (+ CLIP, VAE) with their patches baked in, as ComfyUI's CheckpointSave does; atomic."""
    import comfy.sd

    path = Path(path)
    with atomic_target(path) as tmp:  # a .tmp name: a leftover is never listed as a checkpoint
        comfy.sd.save_checkpoint(str(tmp), model, clip, vae, metadata=metadata)
    return path
