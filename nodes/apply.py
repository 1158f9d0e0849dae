"""Apply LoRA: patch MODEL and CLIP with a LoRA file, reporting every key that did not match."""

from __future__ import annotations

import logging

from ..lora_core.apply import apply_lora
from ..lora_core.files import read_safetensors

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


NODE_CLASS_MAPPINGS = {"LoraFoundryApplyLoRA": ApplyLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraFoundryApplyLoRA": "Apply LoRA"}
