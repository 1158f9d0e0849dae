"""Load Dataset's settings, declared once (lora_core.settings): the node's inputs and load_dataset's arguments."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ...lora_core.settings import check_choices, setting
from .dataset import load_dataset
from .video import EXTRACTIONS


@dataclass
class DatasetOptions:
    folder: str = setting("lora_dataset", "Absolute path, or a folder inside ComfyUI/input.", kohya="train_data_dir")
    resolution: int = setting(512, "Training resolution: buckets hold about resolution^2 pixels.", min=32, max=4096,
                              step=32, kohya="resolution")
    min_side: int = setting(256, "The smallest bucket side.", min=32, max=4096, step=32, kohya="min_bucket_reso")
    max_side: int = setting(1024, "The largest bucket side.", min=32, max=8192, step=32, kohya="max_bucket_reso")
    bucket_step: int = setting(64, "Bucket sides are multiples of this.", min=8, max=256, step=8,
                               kohya="bucket_reso_steps")
    no_upscale: bool = setting(False, "Never enlarge an image to fill its bucket.", kohya="bucket_no_upscale")
    caption_extension: str = setting(".txt", "Caption file extensions, comma separated.", kohya="caption_extension")
    validation_split: float = setting(0.0, "Fraction of the images held out to measure validation loss.", min=0.0,
                                      max=0.5, step=0.01, kohya="validation_split")
    seed: int = setting(0, "Seed of the validation split.", min=0, max=2**31 - 1, kohya="validation_seed")
    reg_folder: str = setting("", "Regularisation (prior) images; empty for none.", kohya="reg_data_dir")
    prior_loss_weight: float = setting(1.0, "Loss weight of the regularisation images.", min=0.0, max=10.0, step=0.05,
                                       kohya="prior_loss_weight")
    reg_empty_prompt: bool = setting(False, "Train the regularisation images with the empty prompt, their captions "
                                     "unused: the prior then anchors what the model makes with no prompt (the "
                                     "sampler's empty negative).")
    mask_folder: str = setting("", "Masked loss: a folder of masks with the images' file names (white = learn, black = "
                               "ignore); absolute, or inside ComfyUI/input. Empty for none.",
                               kohya="conditioning_data_dir")
    alpha_mask: bool = setting(False, "Masked loss: an image's alpha channel is its mask (transparent = ignore).",
                               kohya="alpha_mask")

    repeats: int = setting(1, "Repeats of each image whose folder name sets none (kohya's num_repeats; a folder "
                           "named `10_name` repeats its images 10 times).", min=1, max=10_000, kohya="num_repeats")
    frames: int = setting(17, "Video: frames per clip sample (musubi-tuner's target_frames); must be k * "
                          "frame_multiple + 1 (17, 33, 49, 81 with 4). Clips shorter than this give fewer.", min=1,
                          max=1025)
    frame_extraction: str = setting("head", "Video: which frames of a clip become samples (musubi-tuner's "
                                    "frame_extraction): head = its first `frames`, uniform = `frames` spread over "
                                    "the whole clip, chunk = one sample per consecutive `frames`.", choices=EXTRACTIONS)
    frame_rate: float = setting(0.0, "Video: resample clips to this many frames per second before taking frames "
                                "(Wan trains at 16); 0 keeps each clip's own rate. Also the rate of frame folders "
                                "(16 when 0).", min=0.0, max=240.0, step=0.5)
    frame_multiple: int = setting(4, "Video: the model's temporal compression; clip samples have k * frame_multiple "
                                  "+ 1 frames (4 for Wan and HunyuanVideo, 8 for LTX-Video).", min=1, max=64)
    control_folder: str = setting("", "Edit models (Flux Kontext, Qwen-Image-Edit): the source images, with the "
                                  "training images' file names (any image extension); absolute, or inside "
                                  "ComfyUI/input. Empty: the dataset's `control` sub-folder when there is one.")

    resolutions: str = setting("", "Multi-resolution: every image is also bucketed at each of these resolutions "
                               "(comma separated, e.g. 512, 768), so one run trains it at several sizes; batches "
                               "keep one size, latents are cached per size. Empty = resolution only.")

    def caption_extensions(self) -> tuple[str, ...]:
        extensions = tuple(e.strip() if e.strip().startswith(".") else "." + e.strip()
                           for e in self.caption_extension.split(",") if e.strip())
        return extensions or (".txt",)

    def __post_init__(self):
        check_choices(self)
        self.extra_resolutions()  # a bad list fails here, naming the setting

    def extra_resolutions(self) -> tuple[int, ...]:
        """The sizes of `resolutions` other than `resolution`."""
        sizes = []
        for part in self.resolutions.replace(";", ",").split(","):
            if not part.strip():
                continue
            try:
                size = int(part.strip())
            except ValueError:
                size = 0
            if not 32 <= size <= 4096:
                raise ValueError(f"resolutions: {part.strip()!r} is not a resolution from 32 to 4096; write sizes "
                                 "separated by commas, e.g. 512, 768, 1024")
            sizes.append(size)
        return tuple(s for s in dict.fromkeys(sizes) if s != self.resolution)

    def load_arguments(self, resolve: Callable[[str, str], os.PathLike]) -> dict:
        """load_dataset's arguments, with folder names turned into paths by `resolve(name, setting)`."""
        return dict(
            folder=resolve(self.folder, "folder"), caption_extensions=self.caption_extensions(), resolution=self.resolution,
            min_side=self.min_side, max_side=self.max_side, bucket_step=self.bucket_step, no_upscale=self.no_upscale,
            reg_folder=resolve(self.reg_folder, "reg_folder") if self.reg_folder.strip() else None,
            prior_loss_weight=self.prior_loss_weight, validation_split=self.validation_split, seed=self.seed,
            mask_folder=resolve(self.mask_folder, "mask_folder") if self.mask_folder.strip() else None, alpha_mask=self.alpha_mask,
            reg_empty_prompt=self.reg_empty_prompt, default_repeats=self.repeats, frames=self.frames,
            frame_extraction=self.frame_extraction, frame_rate=self.frame_rate, frame_multiple=self.frame_multiple,
            control_folder=resolve(self.control_folder, "control_folder") if self.control_folder.strip() else None,
            resolutions=self.extra_resolutions(),
        )

    def load(self, resolve: Callable[[str, str], os.PathLike]):
        """The dataset these options describe (folder names turned into paths by `resolve`)."""
        dataset = load_dataset(**self.load_arguments(resolve))
        dataset.options = asdict(self)
        return dataset
