"""Load Dataset: a folder of images + captions (kohya layout) into buckets, with a report."""

from __future__ import annotations

from pathlib import Path

from ..training.dataset import load_dataset

CATEGORY = "Lora Foundry"


def resolve_folder(folder: str) -> Path:
    """An absolute path as given; a relative one inside ComfyUI's input folder."""
    import folder_paths

    path = Path(folder.strip()).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


class LoadDataset:
    DESCRIPTION = ("Images (png/jpg/webp) with .txt captions; kohya folders `N_trigger words` set repeats and the "
                   "caption of images without one. Images are bucketed by aspect ratio, never squashed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "lora_dataset", "tooltip": "Absolute path, or a folder inside ComfyUI/input."}),
                "resolution": ("INT", {"default": 512, "min": 32, "max": 4096, "step": 32}),
                "min_side": ("INT", {"default": 256, "min": 32, "max": 4096, "step": 32}),
                "max_side": ("INT", {"default": 1024, "min": 32, "max": 8192, "step": 32}),
                "bucket_step": ("INT", {"default": 64, "min": 8, "max": 256, "step": 8}),
                "no_upscale": ("BOOLEAN", {"default": False}),
                "caption_extension": ("STRING", {"default": ".txt"}),
                "validation_split": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.5, "step": 0.01}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            },
            "optional": {
                "reg_folder": ("STRING", {"default": "", "tooltip": "Regularisation (prior) images; empty for none."}),
                "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}),
            },
        }

    def load(self, folder, resolution, min_side, max_side, bucket_step, no_upscale, caption_extension,
             validation_split, seed, reg_folder="", prior_loss_weight=1.0):
        extensions = tuple(e.strip() if e.strip().startswith(".") else "." + e.strip()
                           for e in caption_extension.split(",") if e.strip())
        dataset = load_dataset(
            resolve_folder(folder), caption_extensions=extensions or (".txt",), resolution=resolution,
            min_side=min_side, max_side=max_side, bucket_step=bucket_step, no_upscale=no_upscale,
            reg_folder=resolve_folder(reg_folder) if reg_folder.strip() else None,
            prior_loss_weight=prior_loss_weight, validation_split=validation_split, seed=seed,
        )
        return (dataset, dataset.report.summary())


NODE_CLASS_MAPPINGS = {"LoraFoundryLoadDataset": LoadDataset}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraFoundryLoadDataset": "Load Dataset"}
