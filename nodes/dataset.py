"""Load Dataset: a folder of images + captions (kohya layout) into buckets, with a report."""

from __future__ import annotations

from comfy_api.latest import io

from ..lora_core.settings import from_inputs
from ..training.data.dataset_options import DatasetOptions
from ..training.run import resolve_input_folder
from .inputs import CATEGORY, LoraDataset, Node, TrainingConfig, setting_inputs

REQUIRED_WIDGETS = ["folder", "resolution", "min_side", "max_side", "bucket_step", "no_upscale", "caption_extension",
                    "validation_split", "seed"]
OPTIONAL_WIDGETS = ["reg_folder", "prior_loss_weight", "mask_folder", "alpha_mask", "reg_empty_prompt", "repeats",
                    "frames", "frame_extraction", "frame_rate", "frame_multiple", "control_folder",
                    "resolutions"]


class LoadDataset(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryLoadDataset", display_name="Load Dataset", category=CATEGORY,
            description="Images (png/jpg/webp) and video clips (mp4/webm/mov/mkv/avi, or folders of numbered "
                        "frames) with .txt captions; kohya folders `N_trigger words` set repeats and the caption of "
                        "files without one. Images are bucketed by aspect ratio, never squashed.",
            inputs=[*setting_inputs(REQUIRED_WIDGETS, (DatasetOptions,), {}),
                    *setting_inputs(OPTIONAL_WIDGETS, (DatasetOptions,), {}, optional=True),
                    TrainingConfig.Input("config", optional=True, tooltip="Settings from Load Training Config: its "
                                         "[dataset] values replace the widgets'.")],
            outputs=[LoraDataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, config=None, **inputs) -> io.NodeOutput:
        if config is not None:
            inputs.update(config.inputs("dataset"))
        options = from_inputs(DatasetOptions, inputs)
        dataset = options.load(resolve_input_folder)
        return io.NodeOutput(dataset, dataset.report.summary())


NODES = [LoadDataset]
