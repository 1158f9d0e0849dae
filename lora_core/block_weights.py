"""Block weights: a per-block multiplier for a LoRA, in the vector notation of A1111's "LoRA Block
Weight" extension for UNets and one value per transformer block for DiTs.

UNet blocks are named after ComfyUI's (ldm) layout: BASE (the text encoders), IN00-IN11
(`input_blocks.N`), MID (`middle_block`), OUT00-OUT11 (`output_blocks.N`); SDXL has IN00-IN08 and
OUT00-OUT08. The short vector lists BASE and the blocks that hold attention layers, the ones a
plain LoRA changes (SD1.x/2.x 17 values, SDXL 12); the long vector lists every block (26 / 20).
With a short vector, a block it leaves out (convolutions only: LoCon changes them) takes the
weight of the nearest listed block on its side of the UNet, the earlier one on a tie, so that
all-ones and all-zeros keep their meaning for LoCon files too. The stem (time / label
embeddings) goes with IN00, the final norm and conv with the last OUT block.

DiTs (SD3, Flux, Chroma, Qwen-Image, Z-Image, Wan, ...) are read from the model itself: each list
of blocks gets a letter (Flux: D for double_blocks, S for single_blocks), every block an id (D00,
S37); the long vector is BASE and every block, the short one BASE and one value per list. Layers
outside every block (embedders, final layer) keep weight 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .targets import block_lists


@dataclass(frozen=True)
class Layout:
    """The blocks of one UNet family, and which of them are deep (lowest-resolution attention level)."""

    family: str
    inputs: int  # number of input_blocks (= output_blocks)
    attention_in: tuple[int, ...]
    attention_out: tuple[int, ...]
    deep_in: tuple[int, ...]
    deep_out: tuple[int, ...]

    @property
    def all_ids(self) -> list[str]:
        return ["BASE", *(f"IN{i:02d}" for i in range(self.inputs)), "MID",
                *(f"OUT{i:02d}" for i in range(self.inputs))]

    @property
    def short_ids(self) -> list[str]:
        return ["BASE", *(f"IN{i:02d}" for i in self.attention_in), "MID", *(f"OUT{i:02d}" for i in self.attention_out)]

    def describe(self) -> str:
        short, full = self.short_ids, self.all_ids
        return (f"an {self.family} UNet takes {len(short)} values ({', '.join(short)}) "
                f"or {len(full)} ({full[0]}, {full[1]}-{full[self.inputs]}, MID, {full[self.inputs + 2]}-{full[-1]})")

    def block(self, path: str) -> str | None:
        """Block id of a module path under the UNet (ldm or diffusers names); None outside every block."""
        return _unet_block(path, self)

    def expand(self, short: list[float]) -> dict[str, float]:
        """Short vector -> every block: a block left out takes its side's nearest listed block (earlier on a tie)."""
        given = dict(zip(self.short_ids, short, strict=True))
        out = {"BASE": given["BASE"], "MID": given["MID"]}
        for side, listed in (("IN", self.attention_in), ("OUT", self.attention_out)):
            for i in range(self.inputs):
                nearest = min(listed, key=lambda j, i=i: (abs(j - i), j))
                out[f"{side}{i:02d}"] = given[f"{side}{nearest:02d}"]
        return out

    def preset_vector(self, name: str) -> list[float]:
        """The short vector of a preset."""
        groups, value = PRESET_GROUPS[name]
        return [value if _group(self, block) in groups else 0.0 for block in self.short_ids]


@dataclass(frozen=True)
class DiTLayout:
    """The block lists of a transformer diffusion model: (module list name, id letter, number of blocks)."""

    family: str
    lists: tuple[tuple[str, str, int], ...]

    @property
    def all_ids(self) -> list[str]:
        return ["BASE", *(f"{letter}{i:02d}" for _, letter, count in self.lists for i in range(count))]

    @property
    def short_ids(self) -> list[str]:
        return ["BASE", *(letter for _, letter, _ in self.lists)]

    def describe(self) -> str:
        lists = ", ".join(f"{letter} = {name} ({count})" for name, letter, count in self.lists)
        return (f"a {self.family} model takes {len(self.short_ids)} values ({', '.join(self.short_ids)}: BASE and "
                f"one per block list) or {len(self.all_ids)} (BASE and every block); lists: {lists}")

    def block(self, path: str) -> str | None:
        for name, letter, _ in self.lists:
            if path.startswith((name + ".", name + "_")):
                index = re.match(r"\d+", path[len(name) + 1:])
                return f"{letter}{int(index.group()):02d}" if index else None
        return None

    def expand(self, short: list[float]) -> dict[str, float]:
        out = {"BASE": short[0]}
        for (_, letter, count), value in zip(self.lists, short[1:], strict=True):
            out.update({f"{letter}{i:02d}": value for i in range(count)})
        return out

    def preset_vector(self, name: str) -> list[float]:
        if name not in DIT_PRESETS:
            raise ValueError(f"preset {name} names UNet blocks; a {self.family} model takes {', '.join(DIT_PRESETS)} "
                             "or numbers")
        groups, value = PRESET_GROUPS[name]
        model = value if "MID" in groups else 0.0  # the presets that keep the UNet keep every DiT block
        return [value if "BASE" in groups else 0.0, *[model] * len(self.lists)]


SD1 = Layout("SD1.x/2.x", 12, (1, 2, 4, 5, 7, 8), tuple(range(3, 12)), (7, 8), (3, 4, 5))
SDXL = Layout("SDXL", 9, (4, 5, 7, 8), tuple(range(0, 6)), (7, 8), (0, 1, 2))
LAYOUTS = {"sd1": SD1, "sdxl": SDXL}

# Presets: which groups a LoRA keeps (weight 1); every other block gets 0. Shallow = the attention
# blocks above the deepest level, deep = the lowest-resolution attention level.
PRESET_GROUPS: dict[str, tuple[set[str], float]] = {
    "NONE": (set(), 1.0),
    "ALL": ({"BASE", "IN_S", "IN_D", "MID", "OUT_D", "OUT_S"}, 1.0),
    "ALL0.5": ({"BASE", "IN_S", "IN_D", "MID", "OUT_D", "OUT_S"}, 0.5),
    "TENC": ({"BASE"}, 1.0),
    "UNET": ({"IN_S", "IN_D", "MID", "OUT_D", "OUT_S"}, 1.0),
    "INALL": ({"BASE", "IN_S", "IN_D"}, 1.0),
    "INS": ({"BASE", "IN_S"}, 1.0),
    "IND": ({"BASE", "IN_D"}, 1.0),
    "MIDD": ({"BASE", "IN_D", "MID", "OUT_D"}, 1.0),
    "OUTD": ({"BASE", "OUT_D"}, 1.0),
    "OUTS": ({"BASE", "OUT_S"}, 1.0),
    "OUTALL": ({"BASE", "OUT_D", "OUT_S"}, 1.0),
}


DIT_PRESETS = ("NONE", "ALL", "ALL0.5", "TENC", "UNET")  # the presets that name no UNet block


def _group(layout: Layout, block: str) -> str:
    if block in ("BASE", "MID"):
        return block
    side, index = block[:-2], int(block[-2:])
    deep = layout.deep_in if side == "IN" else layout.deep_out
    return f"{side}_{'D' if index in deep else 'S'}"


def presets(layout) -> dict[str, str]:
    """{preset name: short vector as text}, for the front end."""
    names = DIT_PRESETS if isinstance(layout, DiTLayout) else PRESET_GROUPS
    return {name: ",".join(f"{v:g}" for v in layout.preset_vector(name)) for name in names}


@dataclass(frozen=True)
class BlockWeights:
    """A weight for every block of `layout`; `for_key` gives a model key's or LoRA module name's weight."""

    layout: Layout | DiTLayout
    weights: dict[str, float] = field(hash=False)

    @property
    def base(self) -> float:
        return self.weights["BASE"]

    def for_key(self, key: str) -> float:
        """The weight of a host weight key or LoRA module name; 1 for a UNet key outside every block."""
        return self.weights.get(block_of(key, self.layout), 1.0)


def parse_block_weights(value, layout: Layout) -> BlockWeights | None:
    """A preset name, a comma-separated vector (or a list of numbers) as BlockWeights; None for "" (all ones).

    Raises ValueError saying what is wrong and what `layout` expects.
    """
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        if text.upper() in PRESET_GROUPS:
            return BlockWeights(layout, layout.expand(layout.preset_vector(text.upper())))
        if not re.fullmatch(r"[\s\d.,eE+-]+", text.strip("[]")):
            raise ValueError(f"{text!r} is neither a preset ({', '.join(PRESET_GROUPS)}) nor comma-separated numbers")
        items = [part.strip() for part in text.strip("[]").split(",")]
    numbers = []
    for i, item in enumerate(items, start=1):
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"value {i} ({item!r}) is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"value {i} ({item!r}) is not finite")
        numbers.append(number)
    if len(numbers) == len(layout.all_ids):
        return BlockWeights(layout, dict(zip(layout.all_ids, numbers, strict=True)))
    if len(numbers) != len(layout.short_ids):
        raise ValueError(f"{len(numbers)} values; {layout.describe()}")
    return BlockWeights(layout, layout.expand(numbers))


def block_values(value: str, layout: Layout | DiTLayout, setting: str) -> dict[str, float]:
    """Per-block values (ranks, learning-rate multipliers) by block id, written as block weights are (a preset, the
    short or the long vector) or, for a UNet, as kohya's block_dims (every block, without BASE); {} for "".
    A ValueError names `setting`."""
    text = str(value).strip()
    try:
        if text and isinstance(layout, Layout) and len(text.strip("[]").split(",")) == len(layout.all_ids) - 1:
            weights = parse_block_weights("0," + text.strip("[]"), layout).weights
            del weights["BASE"]
            return weights
        parsed = parse_block_weights(text, layout)
    except ValueError as error:
        raise ValueError(f"{setting}: {error}") from None
    return dict(parsed.weights) if parsed is not None else {}


def layout_of(model) -> Layout | DiTLayout:
    """The block layout of a ComfyUI MODEL: A1111's for SD1.x/2.x and SDXL UNets, else its block lists."""
    import comfy.supported_models as sm

    config = model.model.model_config
    if isinstance(config, (sm.SD15, sm.SD20)):
        return SD1
    if isinstance(config, sm.SDXL):
        return SDXL
    lists, letters = [], set()
    for name, blocks in block_lists(model.model.diffusion_model):
        letter = next(c for c in (name[0].upper(), name[:2].upper(), name.upper()) if c not in letters)
        letters.add(letter)
        lists.append((name, letter, len(blocks)))
    if not lists:
        raise ValueError(f"block weights need a model with blocks; {type(config).__name__} has no block lists")
    return DiTLayout(type(config).__name__, tuple(lists))


# --- which block a key belongs to ------------------------------------------------------------

_LDM = re.compile(r"^(input_blocks|output_blocks)[._](\d+)[._]")
_DIFFUSERS = re.compile(r"^(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)")
_STEM = ("time_embed", "label_emb", "time_embedding", "add_embedding", "class_embedding", "conv_in")
_HEAD = ("out.", "out_", "conv_out", "conv_norm_out")
_UNET_PREFIXES = ("diffusion_model.", "lora_unet_", "unet.", "unet_", "model.diffusion_model.")


def block_of(key: str, layout: Layout | DiTLayout = SD1) -> str | None:
    """Block id of a host weight key (`diffusion_model.input_blocks.4.1...`, a text-encoder key) or a LoRA
    module name (kohya `lora_unet_down_blocks_1_attentions_0_...` / `lora_unet_input_blocks_4_1_...`,
    `lora_te*_...`, PEFT `unet.down_blocks.1...`); None for a UNet key outside every block."""
    for prefix in _UNET_PREFIXES:
        if key.startswith(prefix):
            return layout.block(key[len(prefix):])
    return "BASE"  # text encoders: lora_te*, clip_l., clip_g., text_encoder., ...


def _unet_block(path: str, layout: Layout) -> str | None:
    if m := _LDM.match(path):
        return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    if path.startswith(("middle_block", "mid_block")):
        return "MID"
    if m := _DIFFUSERS.match(path.replace(".", "_")):
        level, kind, index = int(m.group(2)), m.group(3), int(m.group(4))
        if m.group(1) == "down":  # two res (+ attention) blocks per level, then the downsampler
            return f"IN{3 * level + (3 if kind == 'downsamplers' else index + 1):02d}"
        return f"OUT{3 * level + (2 if kind == 'upsamplers' else index):02d}"  # three per level, upsampler in the last
    if path.startswith(_STEM):
        return "IN00"
    if path.startswith(_HEAD):
        return f"OUT{layout.inputs - 1:02d}"
    return None
