"""Apply LoRA (one file) and the LoRA stack (LoRA Stack, Apply LoRA Stack), reporting every key that did not match."""

from __future__ import annotations

import logging

from ..lora_core.apply import apply_lora
from ..lora_core.files import read_safetensors
from ..lora_core.stack import apply_stack, parse_rows

CATEGORY = "Lora Foundry"
log = logging.getLogger("lora_foundry")


class ApplyLoRA:
    DESCRIPTION = "Apply a LoRA / LoCon / LoHa / LoKr file to MODEL and CLIP with separate strengths."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A file in models/loras."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            },
            "optional": {"clip": ("CLIP",)},
        }

    def apply(self, model, lora_name, strength_model, strength_clip, clip=None):
        import folder_paths

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        tensors, _ = read_safetensors(path)
        model, clip, report = apply_lora(model, clip, tensors, strength_model, strength_clip)
        if not report.ok:
            log.warning("Apply LoRA %s: %s", lora_name, report.summary())
        return (model, clip, f"{lora_name}: {report.summary()}")


LORAS_HELP = ('A JSON list of rows: [{"on": true, "lora": "sub/name.safetensors", "strength_model": 1.0, '
              '"strength_clip": 1.0, "block_weights": ""}]; strength_clip defaults to strength_model, block_weights '
              "to all ones (a preset such as OUTD, or 17 values for SD1.x/2.x, 12 for SDXL: BASE, IN..., MID, OUT...).")
LORAS_INPUT = ("STRING", {"default": "[]", "multiline": True, "tooltip": LORAS_HELP})


def _rows(loras: str, lora_stack) -> list[dict]:
    """Upstream rows first, then this node's; all checked, as plain dicts."""
    upstream = parse_rows(lora_stack or [], source="lora_stack row")
    return [row.to_dict() for row in upstream + parse_rows(loras)]


class LoraStack:
    DESCRIPTION = "A list of LoRAs with on/off, model / clip strengths and block weights, to chain or apply."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_STACK",)
    RETURN_NAMES = ("lora_stack",)
    FUNCTION = "stack"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"loras": LORAS_INPUT},
                "optional": {"lora_stack": ("LORA_STACK", {"tooltip": "Rows from an upstream stack; they come first."})}}

    def stack(self, loras, lora_stack=None):
        return (_rows(loras, lora_stack),)


class ApplyLoraStack:
    DESCRIPTION = ("Apply a stack of LoRAs to MODEL and CLIP in order, like a chain of LoRA loaders, with "
                   "per-row on/off, strengths and block weights; reports unmatched keys by name.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "LORA_STACK", "STRING")
    RETURN_NAMES = ("model", "clip", "lora_stack", "report")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL",), "loras": LORAS_INPUT},
            "optional": {"clip": ("CLIP",),
                         "lora_stack": ("LORA_STACK", {"tooltip": "Rows from an upstream stack; applied first."})},
        }

    def apply(self, model, loras, clip=None, lora_stack=None):
        rows = _rows(loras, lora_stack)
        model, clip, report = apply_stack(model, clip, parse_rows(rows))
        if not report.ok:
            log.warning("Apply LoRA Stack: %s", report.summary())
        return (model, clip, rows, report.summary())

NODE_CLASS_MAPPINGS = {
    "LoraFoundryApplyLoRA": ApplyLoRA,
    "LoraFoundryLoraStack": LoraStack,
    "LoraFoundryApplyLoraStack": ApplyLoraStack,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraFoundryApplyLoRA": "Apply LoRA",
    "LoraFoundryLoraStack": "LoRA Stack",
    "LoraFoundryApplyLoraStack": "Apply LoRA Stack",
}
