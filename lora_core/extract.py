"""Extracting a LoRA from two models: per layer, a low-rank SVD of W_tuned - W_base.

Layer by layer (one float32 weight-sized buffer at a time, plus the SVD's thin work), with the
weights each ModelPatcher would load: patches such as LoRAs already applied to a MODEL count as part of it.
kxk convolutions become LoCon modules (down kxk, up 1x1). Names are our kohya names.
"""

from __future__ import annotations

import time

import torch

from .adapters import LoRA
from .lowrank import truncate
from .metadata import result_metadata
from .network import LoraNetwork, NetworkConfig, _text_encoder_layers, _unet_layers
from .ranks import RankRule
from .reports import LayerStat, Progress, ToolReport
from .svd import SvdOptions
from .targets import layer_kind


class PatchedWeights:
    """The weights a ModelPatcher would load (originals plus its patches), one at a time, in float32."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.entries = patcher.get_key_patches()  # {key: [(original, convert), *patches]}, references only

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __call__(self, key: str, device=None) -> torch.Tensor:
        import comfy.lora

        (original, convert), *patches = self.entries[key]
        w = convert(original.to(device=device, dtype=torch.float32, copy=True), inplace=True)
        return comfy.lora.calculate_weight(patches, w, key) if patches else w

    def subtract_from(self, target: torch.Tensor, key: str) -> None:
        """target -= this weight; a plain unpatched weight goes in row blocks, never as a full float32 copy."""
        import comfy.model_patcher

        (original, _), *patches = self.entries[key]
        _, _, convert = comfy.model_patcher.get_key_weight(self.patcher.model, key)
        if patches or convert is not None:
            target.sub_(self(key, target.device))
            return
        flat, source = target.view(target.shape[0], -1), original.reshape(target.shape[0], -1)
        step = max(1, (1 << 22) // max(1, flat.shape[1]))
        for start in range(0, flat.shape[0], step):
            flat[start:start + step].sub_(source[start:start + step].to(target.device, torch.float32))


@torch.no_grad()
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
    sources = [(_unet_layers(model_base, config), PatchedWeights(model_base), PatchedWeights(model_tuned))]
    if (clip_base is None) != (clip_tuned is None):
        raise ValueError("give both clip_base and clip_tuned to extract the text encoder, or neither")
    if clip_base is not None:
        sources.append((_text_encoder_layers(clip_base, config), PatchedWeights(clip_base.patcher),
                        PatchedWeights(clip_tuned.patcher)))
    count = sum(len(layers) for layers, _, _ in sources)
    if count == 0:
        raise ValueError(f"preset {preset!r} targets no layer of this model")
    title = f"Extract LoRA ({rule.describe()}" + (f", convs {conv_rule.describe()}" if conv_rule else "") + ")"
    report = ToolReport(title)
    adapters: dict[str, LoRA] = {}
    keys: dict[str, str] = {}
    done = 0
    for layers, base, tuned in sources:
        for name, key, module in layers:
            layer_rule = conv_rule if conv_rule is not None and layer_kind(module) == "conv" else rule
            result = _extract_layer(name, key, base, tuned, layer_rule, clamp_quantile, min_diff, options,
                                    options.seed + done, device)
            if isinstance(result, str):
                report.skipped.append(f"{name} ({result})")
            else:
                adapters[name], keys[name] = result[0], key
                report.layers.append(result[1])
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


def _extract_layer(name, key, base: PatchedWeights, tuned: PatchedWeights, rule, clamp_quantile, min_diff, options,
                   seed, device) -> tuple[LoRA, LayerStat] | str:
    """One layer's LoRA and its stats, or why it is skipped."""
    if key not in tuned:
        raise ValueError(f"{name}: the tuned model has no weight {key}; the two models differ in architecture")
    diff = tuned(key, device)
    shape = tuple(diff.shape)
    base_shape = tuple(base.entries[key][0][0].shape)
    if shape != base_shape:
        raise ValueError(f"{name}: tuned weight {list(shape)} vs base {list(base_shape)}; "
                         "the two models differ in architecture")
    base.subtract_from(diff, key)
    diff = diff.reshape(shape[0], -1)
    low, high = torch.aminmax(diff)
    largest = max(-float(low), float(high))
    if largest <= min_diff:
        return f"max |diff| {largest:.1e}"
    kept = truncate(diff, rule, options, seed, clamp_quantile)
    return LoRA.from_matrices(kept.up, kept.down, shape).cpu(), kept.stat(name)
