"""Caption Images: caption a dataset with a local tagger or captioner, edit the captions, write .txt sidecars."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

from ..training.captioning.autocaption import MODES, WRITES, caption_items, needs_model, open_image, with_captions
from ..training.captioning.captioner import (
    CaptionerSettings,
    CaptionModelError,
    find_captioners,
    load_captioner,
    model_folder_help,
)
from ..training.captioning.edit import EditOptions, parse_replacements, parse_tag_list
from ..training.captioning.preview import caption_tile, preview_tiles
from ..training.data.dataset import load_dataset
from ..training.data.report import capped
from ..training.run import resolve_input_folder
from .inputs import CATEGORY, LoraDataset, Node
from .shown_captions import CAPTION_EDITS

MODELS_FOLDER = "captioners"
NO_MODEL = "none"


def captioner_bases() -> list[str]:
    """The folders models/captioners/<name>/ are looked up in (registered with ComfyUI's folder_paths)."""
    import folder_paths

    folder_paths.add_model_folder_path(MODELS_FOLDER, os.path.join(folder_paths.models_dir, MODELS_FOLDER))
    return folder_paths.get_folder_paths(MODELS_FOLDER)


def images_tensor(tiles) -> torch.Tensor:
    """Same-sized Pillow images as a ComfyUI IMAGE batch [N, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(t.convert("RGB"), dtype=np.float32) / 255.0 for t in tiles]))


def save_temp_previews(tiles) -> list[dict]:
    """PNG files in ComfyUI's temp folder, in the form a node's UI shows images."""
    import folder_paths

    folder = Path(folder_paths.get_temp_directory())
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"lora_foundry_captions_{uuid.uuid4().hex[:8]}"
    shown = []
    for i, tile in enumerate(tiles):
        name = f"{stem}_{i:03d}.png"
        tile.save(folder / name, compress_level=1)
        shown.append({"filename": name, "subfolder": "", "type": "temp"})
    return shown


def _float(name: str, default: float) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01)


def _text(name: str, tooltip: str | None = None, multiline: bool = False, optional: bool = False) -> io.String.Input:
    return io.String.Input(name, default="", tooltip=tooltip, multiline=multiline, optional=optional)


def caption_inputs() -> list[io.Input]:
    bases = captioner_bases()
    names = list(find_captioners(bases))
    return [
        io.Combo.Input("model", options=[NO_MODEL, *names], default=names[0] if names else NO_MODEL,
                       tooltip="A folder in " + " or ".join(bases) + " holding model.onnx + selected_tags.csv (WD14 "
                       "tagger) or a transformers image-to-text model. Not needed for mode 'keep existing'."),
        io.Combo.Input("mode", options=list(MODES), default="caption missing", tooltip="caption missing: only "
                       "images without a caption file; keep existing: no model, edits only; re-caption all: every "
                       "image."),
        io.Combo.Input("write_files", options=list(WRITES), default="new files only", tooltip="new files only: write "
                       "captions of images that had no caption file; none: captions only go to the outputs; "
                       "overwrite existing: also replace existing caption files."),
        _float("general_threshold", 0.35), _float("character_threshold", 0.85),
        _text("trigger_word", "Put in front of every caption."),
        _text("class_word", "If set, the trigger word replaces this word where it occurs (captions without it get "
              "the trigger in front)."),
        _text("prefix"), _text("suffix"),
        _text("find_replace", "One 'old => new' per line; an empty new deletes.", multiline=True),
        _text("blacklist", "Tags to drop, comma or line separated; * and ? match anything.", multiline=True),
        io.Boolean.Input("deduplicate", default=True),
        io.Int.Input("max_tags", default=0, min=0, max=1000, tooltip="0 = no limit."),
        io.String.Input("caption_extension", default=".txt"),
        LoraDataset.Input("dataset", optional=True, tooltip="From Load Dataset; without it, `folder` is loaded."),
        _text("folder", "Absolute path, or a folder inside ComfyUI/input (used when no dataset is connected).",
              optional=True),
        _text("prompt", "Transformers captioners only: a text prompt (BLIP: 'a photo of'), or a task (Florence-2: "
              "'<DETAILED_CAPTION>').", optional=True),
        io.Int.Input("max_new_tokens", default=48, min=1, max=1024, optional=True),
        io.Int.Input("preview_count", default=16, min=0, max=256, optional=True,
                     tooltip="Image + caption tiles shown on the node and output."),
    ]


class CaptionImages(Node):
    CHECKED_AT_RUN = ("model",)  # checked when the node runs, with a message that says where to put one

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryCaptionImages", display_name="Caption Images", category=CATEGORY,
            is_output_node=True,
            description="Caption a dataset's images with a local WD14 tagger (ONNX) or transformers captioner from "
                        "models/captioners, edit the captions (trigger word, prefix/suffix, find/replace, blacklist, "
                        "de-duplication, max tags) and write .txt sidecars. Existing caption files are only replaced "
                        "with write_files = overwrite existing. Outputs the dataset with the new captions for Train "
                        "LoRA. The captions of the shown images can be edited and saved on the node.",
            inputs=caption_inputs(),
            outputs=[LoraDataset.Output(display_name="dataset"), io.String.Output(display_name="captions"),
                     io.Image.Output(display_name="preview"), io.String.Output(display_name="tag_stats")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, mode, write_files, general_threshold, character_threshold, trigger_word, class_word,
                prefix, suffix, find_replace, blacklist, deduplicate, max_tags, caption_extension, dataset=None,
                folder="", prompt="", max_new_tokens=48, preview_count=16) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        extension = "." + caption_extension.strip().lstrip(".") if caption_extension.strip() else ".txt"
        if dataset is None:
            if not folder.strip():
                raise ValueError("Caption Images: connect a dataset (Load Dataset) or give a folder")
            dataset = load_dataset(resolve_input_folder(folder), caption_extensions=(extension,))
        edit = EditOptions(trigger_word=trigger_word, class_word=class_word, prefix=prefix, suffix=suffix,
                           replacements=parse_replacements(find_replace), blacklist=parse_tag_list(blacklist),
                           deduplicate=deduplicate, max_tags=max_tags)
        # One per file: a clip's samples and an image at several resolutions share one caption.
        items = list({item.path: item for item in dataset.items + dataset.validation if not item.is_reg}.values())
        captioner = None
        if needs_model(items, mode, extension):
            settings = CaptionerSettings(general_threshold, character_threshold, prompt, max_new_tokens,
                                         str(mm.get_torch_device()))
            captioner = load_captioner(cls.model_folder(model, mode), settings)
        bar = comfy.utils.ProgressBar(len(items), node_id=cls.hidden.unique_id)
        try:
            run = caption_items(items, mode, write_files, edit, extension, captioner,
                                on_progress=lambda done, total: bar.update_absolute(done, total),
                                check_cancel=mm.throw_exception_if_processing_interrupted)
        finally:
            if captioner is not None:
                captioner.close()
                mm.soft_empty_cache()
        return cls.outputs(dataset, run, preview_count, extension)

    @classmethod
    def fingerprint_inputs(cls, **inputs) -> int:
        """Caption files saved from a node since the server started: after one, the next run reads them again."""
        return CAPTION_EDITS.generation

    @staticmethod
    def outputs(dataset, run, preview_count: int, extension: str = ".txt") -> io.NodeOutput:
        stats = run.summary()
        if dataset.report.skipped:
            stats += f"\nSkipped when the dataset was loaded ({len(dataset.report.skipped)}):\n" + "\n".join(
                capped([f"  {path}: {reason}" for path, reason in dataset.report.skipped]))
        shown = [(r.image, r.caption) for r in run.results[:preview_count]]
        tiles = preview_tiles(shown, open_image) or [caption_tile(None, "", placeholder="no preview")]
        listing = run.listing(dataset.root)
        token, names = CAPTION_EDITS.register(dataset.root, extension, [image for image, _ in shown])
        ui = {"images": save_temp_previews(tiles) if shown else [], "text": [stats, listing],
              "captions": [{"token": token, "image": names[image], "caption": caption}
                           for image, caption in shown if image in names]}
        return io.NodeOutput(with_captions(dataset, run.captions()), listing, images_tensor(tiles), stats, ui=ui)

    @staticmethod
    def model_folder(model: str, mode: str) -> Path:
        """The selected model's folder, or an error that says where to put one."""
        bases = captioner_bases()
        found = find_captioners(bases)
        if model in found:
            return found[model]
        if not found:
            problem = "no captioning model is installed"
        elif model == NO_MODEL:
            problem = f"no model is selected (installed: {', '.join(found)})"
        else:
            problem = f"model {model!r} is not installed (installed: {', '.join(found)})"
        raise CaptionModelError(f"Caption Images: mode {mode!r} needs a model, but {problem}; "
                                + model_folder_help(bases))


NODES = [CaptionImages]
