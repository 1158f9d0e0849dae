"""A LoRA stack: rows of (file, on/off, model and clip strength, block weights) applied in order.

Rows come as JSON text (what the stack widget saves and API users type) or as dicts from an
upstream stack. Each row is applied the way ComfyUI's LoraLoader applies a file, so a stack
equals a chain of LoraLoaders with the same files and strengths.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .apply import ApplyReport, apply_lora
from .block_weights import layout_of, parse_block_weights
from .files import read_safetensors


class StackError(ValueError):
    """A row that cannot be used; the message names the row and the field."""

    def __init__(self, row: int, name: str, message: str, source: str = "row"):
        super().__init__(f"{source} {row}, field '{name}': {message}")


@dataclass(frozen=True)
class StackRow:
    lora: str
    on: bool = True
    strength_model: float = 1.0
    strength_clip: float = 1.0
    block_weights: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        blocks = f", blocks {self.block_weights}" if self.block_weights else ""
        return f"{self.lora} (model {self.strength_model:g}, clip {self.strength_clip:g}{blocks})"


STRENGTH_LIMIT = 100.0  # a row's strengths, as Apply LoRA's strength inputs: -100 to 100


def _number(value, row: int, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StackError(row, name, f"expected a finite number, got {value!r}", source)
    if abs(value) > STRENGTH_LIMIT:
        raise StackError(row, name, f"{value} is outside its range; give a value from {-STRENGTH_LIMIT} to "
                                    f"{STRENGTH_LIMIT}", source)
    return float(value)


def parse_row(item, row: int, source: str = "row") -> StackRow:
    """One row from a dict (unknown fields ignored) or a (lora, strength_model, strength_clip) tuple."""
    if isinstance(item, StackRow):
        return item
    if isinstance(item, (list, tuple)) and len(item) == 3:  # the LORA_STACK of other packs
        item = dict(zip(("lora", "strength_model", "strength_clip"), item, strict=True))
    if not isinstance(item, dict):
        raise StackError(row, "lora", f"a row is an object such as {{\"lora\": \"name.safetensors\"}}, got {item!r}", source)
    lora = item.get("lora")
    if not isinstance(lora, str) or not lora.strip():
        raise StackError(row, "lora", f"expected a file name in the loras folders, got {lora!r}", source)
    on = item.get("on", True)
    if not isinstance(on, bool):
        raise StackError(row, "on", f"expected true or false, got {on!r}", source)
    strength_model = _number(item.get("strength_model", 1.0), row, "strength_model", source)
    strength_clip = _number(item.get("strength_clip", strength_model), row, "strength_clip", source)
    blocks = item.get("block_weights", "")
    if isinstance(blocks, (list, tuple)):
        blocks = ",".join(str(v) for v in blocks)
    if blocks is None:
        blocks = ""
    if not isinstance(blocks, str):
        raise StackError(row, "block_weights", f"expected a preset name or comma-separated numbers, got {blocks!r}", source)
    return StackRow(lora.strip(), on, strength_model, strength_clip, blocks.strip())


def parse_rows(value, source: str = "row") -> list[StackRow]:
    """Rows from JSON text ("" and "[]" are an empty stack) or an already decoded list."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"loras: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                             'expected a list such as [{"lora": "name.safetensors", "strength_model": 1.0}]') from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"loras: expected a JSON list of rows, got {type(value).__name__}")
    return [parse_row(item, i, source) for i, item in enumerate(value, start=1)]


@dataclass
class StackReport:
    """Per row of the stack: what was applied, or why not."""

    entries: list[tuple[int, StackRow, ApplyReport | None, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r is None or r.ok for _, _, r, _ in self.entries)

    def summary(self) -> str:
        if not self.entries:
            return "empty stack: nothing applied"
        lines = []
        for number, row, report, note in self.entries:
            head = f"{number}. {row.describe()}"
            if report is None:
                lines.append(f"{head}: {note}")
            else:
                lines.append(f"{head}: " + report.summary().replace("\n", "\n   "))
        return "\n".join(lines)


def apply_stack(model, clip, rows: list[StackRow], resolve: Callable[[str], Path],
                cache: dict | None = None):
    """(MODEL, CLIP, StackReport): every row that is on, in order, as ComfyUI's LoraLoader would apply it.

    Block weights scale each UNet layer's model strength by its block's weight, and the clip
    strength by BASE. `cache` ({path: tensors}) lets callers reuse files read before.
    """
    report = StackReport()
    layout = None
    cache = {} if cache is None else cache
    for number, row in enumerate(rows, start=1):
        if not row.on:
            report.entries.append((number, row, None, "off"))
            continue
        if row.strength_model == 0 and row.strength_clip == 0:
            report.entries.append((number, row, None, "strengths 0, skipped"))
            continue
        block_strength, strength_clip = None, row.strength_clip
        if row.block_weights:
            try:
                layout = layout or layout_of(model)
                weights = parse_block_weights(row.block_weights, layout)
            except ValueError as e:
                raise StackError(number, "block_weights", str(e), "stack row") from None
            if weights is not None:
                block_strength, strength_clip = weights.for_key, row.strength_clip * weights.base
        try:
            path = resolve(row.lora)
        except (FileNotFoundError, ValueError) as e:
            raise StackError(number, "lora", str(e), "stack row") from None
        if path not in cache:
            cache[path] = read_safetensors(path)[0]
        model, clip, applied = apply_lora(model, clip, cache[path], row.strength_model, strength_clip, block_strength)
        report.entries.append((number, row, applied, ""))
    return model, clip, report
