"""A set of adapters attached to a model: created from a config, attached for training, saved, loaded."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from . import kohya_keys
from .adapters import ALGORITHMS, Adapter, adapter_from_factors
from .adapters.base import stored_weight
from .apply import lora_key_map
from .block_weights import block_of, block_values, layout_of
from .files import AdapterFileError, factor_problems, read_safetensors, split_modules
from .lowrank import stacked_lora
from .settings import check_choices, setting
from .targets import PRESETS, find_layers, layer_kind, text_encoders

# The algorithm input's values, in the order saved workflows know them: the algorithms, and "locon", kept for
# saved workflows as a name for LoRA on the locon preset (NetworkConfig reads it as that).
ALGORITHM_CHOICES = ("lora", "locon", *(name for name in ALGORITHMS if name != "lora"))


@dataclass
class NetworkConfig:
    """Everything that decides which adapters exist and how they are shaped."""

    algorithm: str = setting("lora", "The adapter: LoRA, LoCon (LoRA on convolutions too), LoHa, LoKr, DyLoRA, GLoRA, "
                             "OFT / BOFT (orthogonal: rank = block size, alpha = the rotation's constraint, 0 = none).",
                             choices=ALGORITHM_CHOICES, kohya="network_module")
    rank: int = setting(16, "Adapter rank (kohya's network_dim).", min=1, max=1024, kohya="network_dim")
    alpha: float = setting(16.0, "The adapter's scale is alpha / rank (kohya's network_alpha).", min=0.0,
                           max=1024.0, step=0.5, kohya="network_alpha")
    conv_rank: int | None = setting(None, "kxk convolutions; 0 = rank.", min=0, max=1024, zero_is_none=True,
                                    kohya="conv_dim")
    conv_alpha: float | None = setting(None, "kxk convolutions' alpha; unset = alpha (with conv_rank: conv_rank).",
                                       kohya="conv_alpha")
    preset: str = setting("kohya", "Which layers get adapters: attention, kohya (sd-scripts' defaults), locon "
                          "(+ ResBlocks and resamplers), all (every Linear / Conv).", input="targets",
                          choices=PRESETS)
    include: list[str] = setting([], "Extra module globs, e.g. *.proj_out.")
    exclude: list[str] = setting([], "Module globs left out.")
    block_ranks: str = setting("", "Rank per block, in block-weight notation (as Apply LoRA's block_weights: the "
                               "short or long vector, BASE = text encoders) or a UNet's kohya block_dims (every "
                               "block); linear layers take it, convolutions keep conv_rank; 0 = no adapter in that "
                               "block. Empty = rank everywhere.", kohya="block_dims")
    block_alphas: str = setting("", "Alpha per block, in the notation of block_ranks. Empty = alpha everywhere.",
                                kohya="block_alphas")
    text_encoder: bool = setting(False, "Also train the CLIP text encoders (T5 / LLM encoders stay frozen).",
                                 input="train_text_encoder")
    dora: bool = setting(False, "DoRA: weight-decomposed adapters (a learned magnitude per input column).",
                         kohya="dora_wd")
    rank_dropout: float = setting(0.0, "Drop ranks at each step.", min=0.0, max=1.0, step=0.01,
                                  kohya="rank_dropout")
    module_dropout: float = setting(0.0, "Skip whole adapters at each step.", min=0.0, max=1.0, step=0.01,
                                    kohya="module_dropout")
    network_dropout: float = setting(0.0, "kohya's network_dropout: dropout on the adapters' activations "
                                     "(attach = bypass).", min=0.0, max=1.0, step=0.01, kohya="network_dropout",
                                     ss=("ss_network_dropout",))
    lokr_factor: int = setting(-1, "LoKr's factor (-1: as square as the layer allows).", kohya="factor")
    use_tucker: bool = setting(False, "LoCon / LoHa: a Tucker core for kxk convolutions (LyCORIS use_tucker).",
                               kohya="use_tucker")
    dylora_unit: int = setting(1, "DyLoRA's rank step.", min=1, max=64, kohya="unit")
    seed: int = setting(0, "Seeds the adapters' initial values.", min=0, max=2**31 - 1)

    def __post_init__(self):
        check_choices(self)
        if self.algorithm == "locon":  # the one place the alias is read: LoRA, on the locon preset unless another is set
            self.algorithm = "lora"
            if self.preset == "kohya":
                self.preset = "locon"
        if self.rank < 1:
            raise ValueError(f"rank: must be at least 1, got {self.rank}")
        for name in ("block_ranks", "block_alphas"):  # files of earlier versions hold {} there
            if getattr(self, name) == {}:
                setattr(self, name, "")
        ALGORITHMS[self.algorithm].options_from(self)  # refuses settings the algorithm cannot honour

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NetworkConfig:
        """Settings saved as a file's lora_foundry_config metadata; a ValueError naming that key and what is wrong."""
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise _config_error(f"not valid JSON ({e})") from e
        if not isinstance(values, dict):
            raise _config_error(f"a JSON object of settings was expected, not a {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        wrong = _wrong_types(values)
        if wrong:
            raise _config_error("settings of the wrong type: " + ", ".join(wrong))
        try:
            return cls(**values)
        except (ValueError, TypeError) as e:
            raise _config_error(str(e)) from e

    def rank_alpha(self, kind: str) -> tuple[int, float]:
        if kind == "conv":
            rank = self.conv_rank or self.rank
            alpha = self.conv_alpha if self.conv_alpha is not None else (self.alpha if self.conv_rank is None else rank)
            return rank, alpha
        return self.rank, self.alpha

    def block_ranks_alphas(self, model) -> tuple[dict[str, float], dict[str, float], object]:
        """block_ranks and block_alphas by block id of `model`'s layout, and the layout (None when both are unset)."""
        if not (self.block_ranks or self.block_alphas) or model is None:
            return {}, {}, None
        layout = layout_of(model)
        ranks = block_values(self.block_ranks, layout, "block_ranks")
        alphas = block_values(self.block_alphas, layout, "block_alphas")
        bad = [f"{block}={value:g}" for block, value in ranks.items() if value < 0 or value != int(value)]
        bad += [f"{block}={value:g} (alpha)" for block, value in alphas.items() if value < 0]
        if bad:
            raise ValueError(f"block_ranks / block_alphas: ranks are whole numbers from 0, alphas 0 or more; got "
                             f"{', '.join(bad[:5])}")
        return ranks, alphas, layout


def _config_error(problem: str) -> ValueError:
    return ValueError(f"lora_foundry_config metadata: {problem}; these network settings cannot be read: re-save the "
                      "LoRA with Lora Foundry, or remove that metadata key to use its adapters without them")


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list[str]": (list,)}


def _wrong_types(values: dict) -> list[str]:
    """`name=value` for each setting whose JSON value does not have its field's type (a bool is no number here)."""
    wrong = []
    for f in fields(NetworkConfig):
        value, kind = values.get(f.name), f.type.removesuffix(" | None")
        if f.name not in values or (value is None and kind != f.type):
            continue
        if value == {} and f.name in ("block_ranks", "block_alphas"):  # what files of earlier versions hold
            continue
        fits = isinstance(value, _JSON_TYPES.get(kind, object)) and (kind == "bool" or not isinstance(value, bool))
        if fits and kind == "float":
            fits = abs(value) <= 1e300  # False for NaN and infinities, which JSON from Python may hold
        if fits and kind == "list[str]":
            fits = all(isinstance(item, str) for item in value)
        if not fits:
            wrong.append(f"{f.name}={repr(value)[:40]}")
    return wrong


ATTACH_MODES = ("bypass", "weights")


class BypassForward:
    """A layer's forward plus its adapter's output: how `attach` patches a layer in bypass mode. `base`, when set,
    computes the layer's own output instead of its class's forward (a 4-bit base's)."""

    def __init__(self, layer: nn.Module, adapter: Adapter):
        self.layer, self.adapter = layer, adapter
        self.base = None

    def __call__(self, x, *args, **kwargs):
        # The class's forward, not the instance's: a patch left on the layer by another clone is never stacked.
        if self.base is not None:
            out = self.base(x, *args, **kwargs)
        else:
            out = type(self.layer).forward(self.layer, x, *args, **kwargs)
        return self.adapter.bypass(self.layer, x, out)


def _unet_layers(model, config: NetworkConfig):
    """(kohya name, weight key, layer) for the UNet/DiT of a ComfyUI MODEL patcher."""
    base = model.model
    layers = find_layers(base.diffusion_model, config.preset, config.include, config.exclude)
    names = kohya_keys.unet_names(base.model_config, [p for p, _ in layers])
    return [(names[p], f"diffusion_model.{p}.weight", m) for p, m in layers]


def _text_encoder_layers(clip, config: NetworkConfig):
    """(kohya name, weight key, layer) for the text encoders of a ComfyUI CLIP."""
    encoders = text_encoders(clip.cond_stage_model)
    prefixes = kohya_keys.text_encoder_prefixes(list(encoders))
    preset = "attention" if config.preset == "attention" else "kohya"
    out = []
    for enc_name, encoder in encoders.items():
        if not is_trainable_text_encoder(enc_name):
            continue
        for path, module in find_layers(encoder, preset, config.include, config.exclude):
            full = f"{enc_name}.{path}" if enc_name else path
            out.append((kohya_keys.text_encoder_name(prefixes[enc_name], full), f"{full}.weight", module))
    return out


def is_trainable_text_encoder(name: str) -> bool:
    """CLIP encoders (L, G, H) train; T5 and LLM encoders stay frozen, as in kohya and ai-toolkit (their
    layers would dwarf the adapter and their memory the GPU)."""
    return name.startswith("clip_") or name == ""


def _host_layers(model, clip) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{host weight key: (our kohya name, weight shape)} for every layer an adapter may change."""
    everything = NetworkConfig(preset="all", text_encoder=True)
    layers = _unet_layers(model, everything) if model is not None else []
    layers += _text_encoder_layers(clip, everything) if clip is not None else []
    return {key: (name, tuple(module.weight.shape)) for name, key, module in layers}


def _read_adapter(parts: dict[str, torch.Tensor], shape: tuple[int, ...] | None) -> Adapter:
    """One module's adapter from its tensors, checked against the layer `shape` (or its own)."""
    adapter = adapter_from_factors(parts, shape)
    if adapter is None:
        raise ValueError(f"no LoRA/LoHa/LoKr/OFT/GLoRA factors ({', '.join(sorted(parts))})")
    error = adapter.shape_error(shape if shape is not None else adapter.shape)
    if error:
        raise ValueError(error)
    return adapter


class LoraNetwork(nn.Module):
    """Adapters by kohya module name, and the host weight each one changes."""

    def __init__(self, adapters: dict[str, Adapter], weight_keys: dict[str, str] | None = None,
                 config: NetworkConfig | None = None):
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self.weight_keys = dict(weight_keys or {})
        self.config = config

    @classmethod
    def create(cls, config: NetworkConfig, model=None, clip=None) -> LoraNetwork:
        """New adapters (dW = 0) for the layers of `model` (and `clip` if config.text_encoder) the config targets."""
        layers = _unet_layers(model, config) if model is not None else []
        if config.text_encoder and clip is not None:
            te_layers = _text_encoder_layers(clip, config)
            if not te_layers:
                names = ", ".join(text_encoders(clip.cond_stage_model))
                raise ValueError(f"train_text_encoder: this model's text encoders ({names}) are T5 / LLM encoders, "
                                 "which stay frozen (only CLIP encoders train); turn train_text_encoder off")
            layers += te_layers
        if not layers:
            raise ValueError(
                f"no layer matches preset {config.preset!r} with include {config.include} / exclude {config.exclude}; "
                "widen the preset or the include patterns"
            )
        adapter_cls = ALGORITHMS[config.algorithm]
        torch.manual_seed(config.seed)
        adapters, keys = {}, {}
        block_ranks, block_alphas, layout = config.block_ranks_alphas(model)
        for i, (name, key, module) in enumerate(layers):
            rank, alpha = config.rank_alpha(layer_kind(module))
            if layout is not None:  # kohya's block_dims: linear layers take the block's rank, 0 drops the block
                block = block_of(key, layout)
                if block_ranks.get(block) == 0:
                    continue
                if layer_kind(module) != "conv":
                    rank, alpha = int(block_ranks.get(block, rank)), block_alphas.get(block, alpha)
            weight = module.weight.detach()
            try:
                adapter = adapter_cls.create(weight, rank, alpha, **adapter_cls.options_from(config, i))
            except ValueError as e:  # a layer the algorithm cannot take (BOFT's widths): say which
                raise ValueError(f"{config.algorithm} on {name} {list(weight.shape)}: {e}") from e
            if config.dora:  # magnitudes of the weight the layer computes with (a scaled-fp8 one times its scale)
                adapter.enable_dora(stored_weight(module))
            adapters[name], keys[name] = adapter, key
        return cls(adapters, keys, config)

    # --- training --------------------------------------------------------------------------
    def attach(self, model=None, clip=None, mode: str = "weights"):
        """Clones of MODEL / CLIP with every adapter attached; base weights frozen.

        "weights": each adapter is a weight wrapper (the layer computes with W + dW).
        "bypass": each adapter adds its output in the layer's forward (an object patch of the clone's
        layer) and the base weight is never touched, so it may be fp8 or left in RAM by the host.
        """
        if mode not in ATTACH_MODES:
            raise ValueError(f"attach: {mode!r} is not one of {', '.join(ATTACH_MODES)}")
        new_model = model.clone() if model is not None else None
        new_clip = clip.clone() if clip is not None else None
        if new_model is not None:
            new_model.model.requires_grad_(False)
        if new_clip is not None:
            new_clip.cond_stage_model.requires_grad_(False)
        for name, adapter in self.adapters.items():
            key = self.weight_keys.get(name)
            if key is None:
                raise KeyError(f"adapter {name} is not bound to a model weight; create it from the model")
            adapter.requires_grad_(True)
            patcher = new_model if key.startswith("diffusion_model.") else (new_clip.patcher if new_clip else None)
            if patcher is None:
                continue
            if mode == "weights":
                patcher.add_weight_wrapper(key, adapter)
            else:
                path = key.removesuffix(".weight")
                patcher.add_object_patch(f"{path}.forward", BypassForward(patcher.model.get_submodule(path), adapter))
        return new_model, new_clip

    def at_strength(self, strength: float):
        """Every adapter at `strength` inside (0: the base model's own output), as before after."""
        return self.at_strengths(dict.fromkeys(self.adapters, strength))

    def as_now(self):
        """A context putting every adapter back at the strength it has now, whatever it has then."""
        return self.at_strengths({name: adapter.multiplier for name, adapter in self.adapters.items()})

    @contextmanager
    def at_strengths(self, strengths: dict[str, float]):
        """Each adapter at its strength in `strengths` inside, as before after."""
        before = {name: adapter.multiplier for name, adapter in self.adapters.items()}
        for name, adapter in self.adapters.items():
            adapter.multiplier = strengths[name]
        try:
            yield
        finally:
            for name, adapter in self.adapters.items():
                adapter.multiplier = before[name]

    def new_step(self) -> None:
        """Every adapter draws this step's random choices (DyLoRA rank, dropouts) once."""
        for adapter in self.adapters.values():
            adapter.new_step()

    def trainable_parameters(self, part: str | None = None) -> list[nn.Parameter]:
        """Parameters of all adapters, or of the UNet ("unet") or text-encoder ("te") ones."""
        out = []
        for name, adapter in self.adapters.items():
            if part is None or (part == "te") == name.startswith("lora_te"):
                out += list(adapter.parameters())
        return out

    # --- files -------------------------------------------------------------------------------
    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, adapter in self.adapters.items():
            for key, value in adapter.state_dict_kohya().items():
                value = value.detach().cpu()
                if dtype is not None and key != "alpha" and value.is_floating_point():
                    value = value.to(dtype)
                out[f"{name}.{key}"] = value.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                        model=None, clip=None) -> LoraNetwork:
        """Adapters from a file's tensors (kohya, LyCORIS, PEFT, diffusers or ComfyUI-trainer names); LoRAs of row
        ranges of a weight ComfyUI holds fused (diffusers Flux / SD3 q, k, v) are joined into one LoRA of it, exactly.

        With `model` / `clip`, each adapter is bound to the host weight it changes and renamed to
        our kohya name for it, ready to `attach` (to resume training) or save. Whatever cannot be
        read raises one ValueError naming every key or module concerned: unknown keys, modules
        without factors, factors that do not fit together, and (bound) modules that match no
        adaptable layer or whose shape differs from it.
        """
        modules, unknown = split_modules(tensors)
        problems = [f"{k}: not a LoRA/LoHa/LoKr tensor" for k in sorted(unknown)]
        bound = model is not None or clip is not None
        host = _host_layers(model, clip) if bound else {}
        key_map = lora_key_map(model, clip) if bound else {}
        adapters, keys = {}, {}
        fused: dict[str, list] = {}  # host weight key: [(first row, file module, adapter)] of its row ranges
        for name, parts in sorted(modules.items()):
            key = key_map.get(name)
            try:
                values = factor_problems(parts)
                if values:
                    raise ValueError("; ".join(values) + " (the file is damaged: re-download or re-export it)")
                if bound and isinstance(key, tuple):  # rows of a weight ComfyUI holds fused (diffusers q / k / v)
                    key, (dim, first, size) = key
                    if dim != 0 or key not in host:
                        raise ValueError(f"changes part of {key} along dimension {dim}, which no layer here has")
                    fused.setdefault(key, []).append((first, name, _read_adapter(parts, (size, *host[key][1][1:]))))
                    continue
                if bound and key not in host:
                    raise ValueError("no adaptable layer of this model has this name")
                our_name, shape = host[key] if bound else (name.replace(".", "_"), None)
                adapters[our_name] = _read_adapter(parts, shape)
            except ValueError as e:
                problems.append(f"{name}: {e}")
                continue
            if bound:
                keys[our_name] = key
        for key, pieces in fused.items():
            our_name, shape = host[key]
            try:
                if our_name in adapters:
                    raise ValueError(f"the file also changes {our_name}, the whole fused weight")
                adapters[our_name], keys[our_name] = stacked_lora(pieces, shape), key
            except ValueError as e:
                problems.append(f"{', '.join(name for _, name, _ in pieces)}: {e}")
        if problems:
            shown = "; ".join(problems[:20]) + (f"; ... ({len(problems) - 20} more)" if len(problems) > 20 else "")
            raise ValueError(f"cannot read this adapter file ({len(problems)} problems): {shown}")
        config = None
        if metadata and "lora_foundry_config" in metadata:
            config = NetworkConfig.from_json(metadata["lora_foundry_config"])
        return cls(adapters, keys, config)

    def at_rank(self, rank: int) -> LoraNetwork:
        """DyLoRA export: every DyLoRA adapter sliced to its leading `rank` ranks (others stay whole)."""
        adapters = {n: a.at_rank(rank) for n, a in self.adapters.items()}
        return LoraNetwork(adapters, self.weight_keys, self.config)

    def num_params(self) -> int:
        return sum(a.num_params() for a in self.adapters.values())

    def deltas(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: a.delta() for name, a in self.adapters.items()}


def read_network(path, model=None, clip=None) -> LoraNetwork:
    """An adapter file as a LoraNetwork with its metadata; bound (names made ours) when model / clip are given."""
    tensors, metadata = read_safetensors(path)
    try:
        network = LoraNetwork.from_state_dict(tensors, metadata, model=model, clip=clip)
    except ValueError as e:
        raise AdapterFileError(f"{path}: {e}") from e
    network.metadata = metadata
    return network
