"""Extracting a LoRA from two models: per layer, a low-rank SVD of W_tuned - W_base.

Layer by layer (two weights and their difference in memory at a time), with the weights each
ModelPatcher would load: patches such as LoRAs already applied to a MODEL count as part of it.
kxk convolutions become LoCon modules (down kxk, up 1x1). Names are our kohya names.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .adapters import LoRA
from .network import LoraNetwork, NetworkConfig, _text_encoder_layers, _unet_layers
from .targets import layer_kind
from .toolbox import (
    LayerStat,
    Progress,
    RankRule,
    SvdOptions,
    ToolReport,
    clamp_factors,
    decompose,
    kept_energy,
    lora_factors,
    result_metadata,
)


def patched_weights(patcher) -> Callable[[str, object], torch.Tensor]:
    """weight(key, device) -> float32 copy of the weight `patcher` would load: original plus its patches."""
    import comfy.lora

    entries = patcher.get_key_patches()

    def weight(key: str, device=None) -> torch.Tensor:
        if key not in entries:
            raise KeyError(key)
        (original, convert), *patches = entries[key]
        w = convert(original.to(device=device, dtype=torch.float32, copy=True), inplace=True)
        return comfy.lora.calculate_weight(patches, w, key) if patches else w

    return weight


def extract_lora(model_base, model_tuned, clip_base=None, clip_tuned=None, rule: RankRule = RankRule(16),
                 conv_rule: RankRule | None = None, preset: str = "kohya", clamp_quantile: float = 0.99,
                 min_diff: float = 1e-6, options: SvdOptions = SvdOptions(), progress: Progress | None = None,
                 device=None) -> tuple[LoraNetwork, ToolReport]:
    """A LoRA that turns the base models into the tuned ones, as closely as `rule` allows.

    Layers are those `preset` targets (kxk convolutions use `conv_rule`, default `rule`); the text
    encoders only when both CLIPs are given. Layers whose max |diff| <= `min_diff` are skipped.
    up and down are clamped to the `clamp_quantile` of their absolute values (1 = no clamp); the
    reported energy is then that of the clamped factors.
    """
    start = time.perf_counter()
    config = NetworkConfig(algorithm="lora", rank=rule.rank, alpha=float(rule.rank), preset=preset,
                           conv_rank=conv_rule.rank if conv_rule else None, text_encoder=clip_base is not None)
    sources = [(_unet_layers(model_base, config), patched_weights(model_base), patched_weights(model_tuned))]
    if (clip_base is None) != (clip_tuned is None):
        raise ValueError("give both clip_base and clip_tuned to extract the text encoder, or neither")
    if clip_base is not None:
        sources.append((_text_encoder_layers(clip_base, config), patched_weights(clip_base.patcher),
                        patched_weights(clip_tuned.patcher)))
    count = sum(len(layers) for layers, _, _ in sources)
    if count == 0:
        raise ValueError(f"preset {preset!r} targets no layer of this model")
    title = f"Extract LoRA ({rule.describe()}" + (f", convs {conv_rule.describe()}" if conv_rule else "") + ")"
    report = ToolReport(title)
    adapters: dict[str, LoRA] = {}
    keys: dict[str, str] = {}
    done = 0
    for layers, base_weight, tuned_weight in sources:
        for name, key, module, _ in layers:
            layer_rule = conv_rule if conv_rule is not None and layer_kind(module) == "conv" else rule
            stat, adapter = _extract_layer(name, key, base_weight, tuned_weight, layer_rule, clamp_quantile, min_diff,
                                           options, options.seed + done, device, report)
            if adapter is not None:
                adapters[name], keys[name] = adapter, key
                report.layers.append(stat)
            done += 1
            if progress:
                progress(done, count)
    report.seconds = time.perf_counter() - start
    if not adapters:
        raise ValueError(f"the models do not differ on any of the {count} targeted layers (max |diff| <= {min_diff:g})")
    network = LoraNetwork(adapters, keys, config)
    source = {"mode": "extract", "rank": rule.describe(), "conv_rank": conv_rule.describe() if conv_rule else None,
              "preset": preset, "clamp_quantile": clamp_quantile, "min_diff": min_diff, "energy": report.energy}
    network.metadata = result_metadata(adapters, "", source, model_config=model_base.model.model_config)
    return network, report


def _extract_layer(name, key, base_weight, tuned_weight, rule, clamp_quantile, min_diff, options, seed, device,
                   report) -> tuple[LayerStat | None, LoRA | None]:
    base = base_weight(key, device)
    try:
        tuned = tuned_weight(key, device)
    except KeyError:
        raise ValueError(f"{name}: the tuned model has no weight {key}; the two models differ in architecture") from None
    if tuned.shape != base.shape:
        raise ValueError(f"{name}: tuned weight {list(tuned.shape)} vs base {list(base.shape)}; "
                         "the two models differ in architecture")
    diff = tuned.sub_(base).reshape(base.shape[0], -1)
    del base
    largest = float(diff.abs().max()) if diff.numel() else 0.0
    if largest <= min_diff:
        report.skipped.append(f"{name} (max |diff| {largest:.1e})")
        return None, None
    dec, rank, note = decompose(diff, rule, options, seed)
    up, down = lora_factors(dec, rank, (diff.shape[0], diff.shape[1]))
    up, down, clamped = clamp_factors(up, down, clamp_quantile)
    energy = kept_energy(diff, up, down, dec.total) if clamped else dec.energy(rank)
    shape = tuple(tuned.shape)
    adapter = LoRA(down.reshape(rank, *shape[1:]).cpu().contiguous(),
                   up.reshape(shape[0], rank, *[1] * (len(shape) - 2)).cpu().contiguous(), float(rank))
    return LayerStat(name, rank, energy, dec.total, dec.method, note), adapter
