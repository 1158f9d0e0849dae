"""Merge LoRA: several adapters into one LoRA (exact or concat), or into MODEL / CLIP (and a checkpoint)."""

from __future__ import annotations

import json

from ..lora_core.files import numbered_path, read_safetensors
from ..lora_core.merge import merge_concat, merge_exact, merge_into_model, save_checkpoint
from ..lora_core.toolbox import SvdOptions
from .resize import CATEGORY, NONE, comfy_progress, device, lora_choices, rank_inputs, rank_rule, read_lora

MODES = ("exact", "concat", "into model")
SLOTS = 4


class MergeLoRA:
    DESCRIPTION = (
        "Merge up to 4 LoRAs with ratios (dW = sum ratio_i * dW_i). exact: the sum, truncated by SVD to a rank (any "
        "LoRA/LoCon/LoHa/LoKr mix; the report gives the energy kept). concat: LoRA/LoCon only, ranks side by side, "
        "exact at rank = sum of ranks. into model: patch MODEL/CLIP like chained LoRA loaders and optionally save a "
        "checkpoint (the lora output is then empty)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA", "MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("lora", "model", "clip", "report")
    FUNCTION = "merge"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        choices = lora_choices()
        slots = {}
        for i in range(1, SLOTS + 1):
            slots[f"lora_{i}"] = (choices, {"default": NONE, "tooltip": "A file in models/loras (lora_in wins)."})
            slots[f"ratio_{i}"] = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})
        optional = {f"lora_in_{i}": ("LORA", {"tooltip": f"An adapter from another node, used as slot {i}."})
                    for i in range(1, SLOTS + 1)}
        return {
            "required": {
                "mode": (MODES, {"default": "exact"}),
                **rank_inputs(32, "exact: the merged rank (the maximum with a dynamic method)."),
                **slots,
            },
            "optional": {
                **optional,
                "model": ("MODEL", {"tooltip": "into model: the model to patch. exact / concat: names LoRA modules "
                                               "after this model's layers (any file naming)."}),
                "clip": ("CLIP", {"tooltip": "into model: the text encoders to patch. exact / concat: needed with "
                                             "model when the LoRAs change the text encoder."}),
                "vae": ("VAE", {"tooltip": "into model: included in the saved checkpoint."}),
                "checkpoint_prefix": ("STRING", {"default": "", "tooltip": "into model: save a checkpoint as "
                                                 "models/checkpoints/<prefix>_00001.safetensors; empty = no file."}),
            },
        }

    def merge(self, mode, rank, dynamic, dynamic_param, model=None, clip=None, vae=None, checkpoint_prefix="",
              **slots):
        chosen = []
        for i in range(1, SLOTS + 1):
            network, name = slots.get(f"lora_in_{i}"), slots[f"lora_{i}"]
            if network is not None or name != NONE:
                chosen.append((i, network, name, slots[f"ratio_{i}"]))
        if not chosen:
            raise ValueError("Merge LoRA: choose at least one lora_N file or connect a lora_in_N")
        labels = [f"{name if network is None else f'lora_in_{i}'} x {ratio:g}" for i, network, name, ratio in chosen]
        if mode == "into model":
            return self._into_model(chosen, labels, model, clip, vae, checkpoint_prefix)
        inputs = [(network if network is not None else read_lora(name, model, clip), ratio)
                  for _, network, name, ratio in chosen]
        if mode == "concat":
            merged, report = merge_concat(inputs, comfy_progress())
        else:
            merged, report = merge_exact(inputs, rank_rule(rank, dynamic, dynamic_param), SvdOptions(),
                                         comfy_progress(), device())
        summary = report.summary()
        text = "inputs: " + ", ".join(labels) + "\n" + summary
        return {"ui": {"text": [summary.split("\n", 1)[0]]}, "result": (merged, model, clip, text)}

    def _into_model(self, chosen, labels, model, clip, vae, checkpoint_prefix):
        if model is None:
            raise ValueError("Merge LoRA: mode 'into model' needs the model input (and clip to merge text encoders)")
        loras = []
        for _, network, name, ratio in chosen:
            if network is not None:
                tensors = network.state_dict_kohya()
            else:
                import folder_paths

                tensors, _ = read_safetensors(folder_paths.get_full_path_or_raise("loras", name))
            loras.append((tensors, ratio, ratio))
        model, clip, reports = merge_into_model(model, clip, loras)
        lines = [f"{label}: {report.summary()}" for label, report in zip(labels, reports, strict=True)]
        if checkpoint_prefix.strip():
            import folder_paths

            path = numbered_path(folder_paths.get_folder_paths("checkpoints")[0], checkpoint_prefix.strip())
            save_checkpoint(path, model, clip, vae, {"lora_foundry_merge": json.dumps(labels)})
            lines.append(f"saved {path}")
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (None, model, clip, text)}


NODE_CLASS_MAPPINGS = {"LoraFoundryMergeLoRA": MergeLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraFoundryMergeLoRA": "Merge LoRA"}
