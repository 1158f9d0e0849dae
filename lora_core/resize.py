"""Resizing an adapter: per module, rebuild dW, SVD, keep the top ranks (fixed or dynamic).

LoRA modules keep their scale: new alpha = alpha_old / r_old * new_rank (kohya's resize_lora),
with U * S / scale as up, so the effective weights are exactly the truncated SVD. Other
algorithms (LoHa, LoKr) become LoRA modules with alpha = rank.
"""

from __future__ import annotations

import time

import torch

from .adapters import LoRA
from .network import LoraNetwork
from .toolbox import (
    LayerStat,
    Progress,
    RankRule,
    SvdOptions,
    ToolReport,
    decompose,
    factored_svd,
    inference,
    lora_from,
    refuse_dora,
    result_metadata,
    scaled_matrices,
)


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
        refuse_dora(adapter, name, "resizing")
        scale, note = 1.0, ""
        if isinstance(adapter, LoRA):
            scale = adapter.alpha / adapter.rank
            up, down = scaled_matrices(adapter)
            dec = factored_svd(up.to(device), down.to(device))
            rank = rule.choose(dec.s, dec.total, dec.nuclear)
        else:
            with inference(adapter):
                delta = adapter.delta().float().to(device)
            dec, rank, note = decompose(delta.reshape(delta.shape[0], -1), rule, options, seed=options.seed + i)
        if dec.total <= 0:
            report.skipped.append(f"{name} (no change)")
        else:
            adapters[name] = lora_from(dec, rank, adapter.shape, scale).cpu()
            report.layers.append(LayerStat(name, rank, dec.energy(rank), dec.total, dec.method, note))
        if progress:
            progress(i + 1, len(names))
    report.seconds = time.perf_counter() - start
    resized = LoraNetwork(adapters, {n: k for n, k in network.weight_keys.items() if n in adapters})
    source = {"mode": "resize", "rank": rule.describe(), "energy": report.energy}
    resized.metadata = result_metadata(adapters, "", source, getattr(network, "metadata", None))
    return resized, report
