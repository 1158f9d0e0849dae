"""Save LoRA: write an adapter as a kohya/LyCORIS-compatible safetensors file with metadata."""

from __future__ import annotations

import torch

from ..lora_core.files import numbered_path, path_inside, write_safetensors

CATEGORY = "Lora Foundry"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class SaveLoRA:
    DESCRIPTION = ("Save an adapter into models/loras (where LoRA loaders list it) or output/. A counter is added "
                   "to the name; an existing file is only replaced when overwrite is on.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": ("LORA",),
                "filename_prefix": ("STRING", {"default": "lora_foundry/my_lora"}),
                "precision": (tuple(DTYPES), {"default": "fp16"}),
                "folder": (("loras", "output"), {"default": "loras"}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Write exactly <prefix>.safetensors, replacing it."}),
            },
        }

    def save(self, lora, filename_prefix, precision, folder, overwrite):
        import folder_paths

        base = folder_paths.get_folder_paths("loras")[0] if folder == "loras" else folder_paths.get_output_directory()
        if overwrite:
            path = path_inside(base, filename_prefix + ".safetensors")
        else:
            path = numbered_path(base, filename_prefix)
        metadata = dict(getattr(lora, "metadata", None) or {})
        metadata["ss_output_name"] = path.stem
        write_safetensors(lora.state_dict_kohya(DTYPES[precision]), path, metadata)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


NODE_CLASS_MAPPINGS = {"LoraFoundrySaveLoRA": SaveLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraFoundrySaveLoRA": "Save LoRA"}
