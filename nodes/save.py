"""Save LoRA: write an adapter as a kohya/LyCORIS-compatible safetensors file with metadata."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..lora_core.files import numbered_path, path_inside, write_safetensors
from .inputs import CATEGORY, Lora, Node

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class SaveLoRA(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundrySaveLoRA", display_name="Save LoRA", category=CATEGORY, is_output_node=True,
            description="Save an adapter into models/loras (where LoRA loaders list it) or output/. A counter is "
                        "added to the name; an existing file is only replaced when overwrite is on.",
            inputs=[Lora.Input("lora"),
                    io.String.Input("filename_prefix", default="lora_foundry/my_lora"),
                    io.Combo.Input("precision", options=list(DTYPES), default="fp16"),
                    io.Combo.Input("folder", options=["loras", "output"], default="loras"),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Write exactly <prefix>.safetensors, replacing it.")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, lora, filename_prefix, precision, folder, overwrite) -> io.NodeOutput:
        import folder_paths

        base = folder_paths.get_folder_paths("loras")[0] if folder == "loras" else folder_paths.get_output_directory()
        if overwrite:
            path = path_inside(base, filename_prefix + ".safetensors")
        else:
            path = numbered_path(base, filename_prefix)
        metadata = dict(getattr(lora, "metadata", None) or {})
        metadata["ss_output_name"] = path.stem
        write_safetensors(lora.state_dict_kohya(DTYPES[precision]), path, metadata)
        return io.NodeOutput(str(path), ui={"text": [str(path)]})


NODES = [SaveLoRA]
