"""Load Dataset: a folder of images + captions (kohya layout) into buckets, with a report."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..lora_core.settings import from_inputs
from ..training.dataset import load_dataset
from ..training.dataset_options import DatasetOptions
from .inputs import CATEGORY, LoraDataset, Node, setting_inputs

REQUIRED_WIDGETS = ["folder", "resolution", "min_side", "max_side", "bucket_step", "no_upscale", "caption_extension",
                    "validation_split", "seed"]
OPTIONAL_WIDGETS = ["reg_folder", "prior_loss_weight", "mask_folder", "alpha_mask", "reg_empty_prompt"]


def resolve_folder(folder: str) -> Path:
    """An absolute path as given; a relative one inside ComfyUI's input folder."""
    import folder_paths

    path = Path(folder.strip()).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


class LoadDataset(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryLoadDataset", display_name="Load Dataset", category=CATEGORY,
            description="Images (png/jpg/webp) with .txt captions; kohya folders `N_trigger words` set repeats and "
                        "the caption of images without one. Images are bucketed by aspect ratio, never squashed.",
            inputs=[*setting_inputs(REQUIRED_WIDGETS, (DatasetOptions,), {}),
                    *setting_inputs(OPTIONAL_WIDGETS, (DatasetOptions,), {}, optional=True)],
            outputs=[LoraDataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        options = from_inputs(DatasetOptions, inputs)
        dataset = load_dataset(**options.load_arguments(resolve_folder))
        return io.NodeOutput(dataset, dataset.report.summary())


NODES = [LoadDataset]
