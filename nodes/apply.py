"""Apply LoRA (one file) and the LoRA stack (LoRA Stack, Apply LoRA Stack), reporting every key that did not match."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..lora_core.apply import apply_lora
from ..lora_core.files import read_safetensors
from ..lora_core.stack import STRENGTH_LIMIT, apply_stack, parse_rows
from .inputs import CATEGORY, Node
from .inputs import LoraStack as LoraStackType
from .loras import lora_file, lora_names

log = logging.getLogger("lora_foundry")


def strength_input(name: str) -> io.Float.Input:
    return io.Float.Input(name, default=1.0, min=-STRENGTH_LIMIT, max=STRENGTH_LIMIT, step=0.01)


class ApplyLoRA(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryApplyLoRA", display_name="Apply LoRA", category=CATEGORY,
            description="Apply a LoRA / LoCon / LoHa / LoKr file to MODEL and CLIP with separate strengths.",
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("lora_name", options=lora_names(), tooltip="A file in models/loras."),
                    strength_input("strength_model"), strength_input("strength_clip"),
                    io.Clip.Input("clip", optional=True)],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, clip=None) -> io.NodeOutput:
        tensors, metadata = read_safetensors(lora_file(lora_name))
        model, clip, report = apply_lora(model, clip, tensors, strength_model, strength_clip, metadata=metadata)
        if not report.ok:
            log.warning("Apply LoRA %s: %s", lora_name, report.summary())
        return io.NodeOutput(model, clip, f"{lora_name}: {report.summary()}")


LORAS_HELP = ('A JSON list of rows: [{"on": true, "lora": "sub/name.safetensors", "strength_model": 1.0, '
              '"strength_clip": 1.0, "block_weights": ""}]; strength_clip defaults to strength_model, block_weights '
              "to all ones (a preset such as OUTD, or 17 values for SD1.x/2.x, 12 for SDXL: BASE, IN..., MID, OUT...).")


def loras_input() -> io.String.Input:
    return io.String.Input("loras", default="[]", multiline=True, tooltip=LORAS_HELP)


def _rows(loras: str, lora_stack) -> list[dict]:
    """Upstream rows first, then this node's; all checked, as plain dicts."""
    upstream = parse_rows(lora_stack or [], source="lora_stack row")
    return [row.to_dict() for row in upstream + parse_rows(loras)]


class LoraStack(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryLoraStack", display_name="LoRA Stack", category=CATEGORY,
            description="A list of LoRAs with on/off, model / clip strengths and block weights, to chain or apply.",
            inputs=[loras_input(),
                    LoraStackType.Input("lora_stack", optional=True, tooltip="Rows from an upstream stack; they come "
                                        "first.")],
            outputs=[LoraStackType.Output(display_name="lora_stack")],
        )

    @classmethod
    def execute(cls, loras, lora_stack=None) -> io.NodeOutput:
        return io.NodeOutput(_rows(loras, lora_stack))


class ApplyLoraStack(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryApplyLoraStack", display_name="Apply LoRA Stack", category=CATEGORY,
            description="Apply a stack of LoRAs to MODEL and CLIP in order, like a chain of LoRA loaders, with "
                        "per-row on/off, strengths and block weights; reports unmatched keys by name.",
            inputs=[io.Model.Input("model"), loras_input(), io.Clip.Input("clip", optional=True),
                    LoraStackType.Input("lora_stack", optional=True, tooltip="Rows from an upstream stack; applied "
                                        "first.")],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     LoraStackType.Output(display_name="lora_stack"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, loras, clip=None, lora_stack=None) -> io.NodeOutput:
        rows = _rows(loras, lora_stack)
        model, clip, report = apply_stack(model, clip, parse_rows(rows), resolve=lora_file)
        if not report.ok:
            log.warning("Apply LoRA Stack: %s", report.summary())
        return io.NodeOutput(model, clip, rows, report.summary())


NODES = [ApplyLoRA, LoraStack, ApplyLoraStack]
