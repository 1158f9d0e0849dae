"""Resizing an adapter: per module, rebuild dW, SVD, keep the top ranks (fixed or dynamic).

LoRA modules keep their scale: new alpha = alpha_old / r_old * new_rank (kohya's resize_lora),
with U * S / scale as up, so the effective weights are exactly the truncated SVD. Other
algorithms (LoHa, LoKr) become LoRA modules with alpha = rank.
"""

from __future__ import annotations

import time

import torch

from .adapters import LoRA
from .lowrank import change_of, refuse_base_dependent, truncate
from .metadata import result_metadata
from .network import LoraNetwork
from .ranks import RankRule
from .reports import Progress, ToolReport
from .svd import SvdOptions


@torch.no_grad()
def resize_lora(network: LoraNetwork, rule: RankRule, options: SvdOptions = SvdOptions(),
                progress: Progress | None = None, device=None) -> tuple[LoraNetwork, ToolReport]:
    """The adapter truncated to `rule` per module, and how much of each module's ||dW||_F^2 it keeps."""
    start = time.perf_counter()
    report = ToolReport(f"Resize LoRA ({rule.describe()})")
    adapters: dict[str, LoRA] = {}
    names = sorted(network.adapters)
    for i, name in enumerate(names):
        adapter = network.adapters[name]
        refuse_base_dependent(adapter, name, "resizing")
        scale = adapter.alpha / adapter.rank if isinstance(adapter, LoRA) else 1.0
        kept = truncate(change_of([(adapter, 1.0)], adapter.shape, device), rule, options, seed=options.seed + i)
        if kept.dec.total <= 0:
            report.skipped.append(f"{name} (no change)")
        else:
            adapters[name] = LoRA.from_matrices(kept.up, kept.down, adapter.shape, scale).cpu()
            report.layers.append(kept.stat(name))
        if progress:
            progress(i + 1, len(names))
    report.seconds = time.perf_counter() - start
    resized = LoraNetwork(adapters, {n: k for n, k in network.weight_keys.items() if n in adapters})
    source = {"mode": "resize", "rank": rule.describe(), "energy": report.energy}
    resized.metadata = result_metadata(adapters, "", source, getattr(network, "metadata", None))
    return resized, report
