"""Resize LoRA: truncate an adapter to a lower (fixed or dynamic) rank; also the inputs the toolbox nodes share."""

from __future__ import annotations

from ..lora_core.resize import resize_lora
from ..lora_core.toolbox import DYNAMIC_METHODS, RankRule, SvdOptions, read_network

CATEGORY = "Lora Foundry"
NONE = "None"


def lora_choices() -> list[str]:
    import folder_paths

    return [NONE, *folder_paths.get_filename_list("loras")]


def read_lora(name: str, model=None, clip=None):
    """A file of the loras folder as a LoraNetwork (names bound to `model` / `clip` when given)."""
    import folder_paths

    return read_network(folder_paths.get_full_path_or_raise("loras", name), model, clip)


def rank_inputs(rank: int, tooltip: str) -> dict:
    return {
        "rank": ("INT", {"default": rank, "min": 1, "max": 4096, "tooltip": tooltip}),
        "dynamic": (("off", *DYNAMIC_METHODS), {
            "default": "off",
            "tooltip": "Choose each layer's rank from its singular values S (rank is then the maximum). sv_ratio: "
                       "keep S > S[0] / param (param > 1). sv_cumulative: keep the fewest S whose sum reaches param of "
                       "their total (0-1). sv_fro: keep param (0-1) of the Frobenius norm of the change.",
        }),
        "dynamic_param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.001}),
    }


def rank_rule(rank: int, dynamic: str, dynamic_param: float) -> RankRule:
    return RankRule(rank) if dynamic == "off" else RankRule(rank, dynamic, dynamic_param)


def device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def comfy_progress():
    """A progress callback for the engine: ComfyUI's progress bar, and the Cancel button honoured."""
    import comfy.model_management
    import comfy.utils

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return update


class ResizeLoRA:
    DESCRIPTION = ("Resize a LoRA / LoCon / LoHa / LoKr to a lower rank by SVD of each module's change. The report "
                   "gives each layer's rank and the fraction of its change (energy, ||dW||^2) kept.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA", "STRING")
    RETURN_NAMES = ("lora", "report")
    FUNCTION = "resize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (lora_choices(), {"tooltip": "A file in models/loras (the lora input wins when connected)."}),
                **rank_inputs(16, "The new rank (the maximum with a dynamic method)."),
            },
            "optional": {"lora": ("LORA", {"tooltip": "An adapter from another node, instead of a file."})},
        }

    def resize(self, lora_name, rank, dynamic, dynamic_param, lora=None):
        if lora is None:
            if lora_name == NONE:
                raise ValueError("Resize LoRA: choose a lora_name or connect a lora")
            lora = read_lora(lora_name)
        resized, report = resize_lora(lora, rank_rule(rank, dynamic, dynamic_param), SvdOptions(),
                                      comfy_progress(), device())
        return (resized, report.summary())


NODE_CLASS_MAPPINGS = {"LoraFoundryResizeLoRA": ResizeLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraFoundryResizeLoRA": "Resize LoRA"}
