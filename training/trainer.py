"""A training run: the data encoded once, adapters on the host's ModelPatcher, the model's own objective, files.

The step loop is in loop.py, the memory plan in planning.py, previews and held-out loss in evaluation.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..lora_core.block_weights import block_of, block_values, layout_of
from ..lora_core.files import write_safetensors
from ..lora_core.metadata import kohya_metadata
from ..lora_core.network import LoraNetwork, is_trainable_text_encoder
from ..lora_core.settings import ss_metadata
from ..lora_core.targets import text_encoders
from . import memory, objective
from .blocks import BlockOptions, text_encoder_layers, training_blocks
from .captions import CaptionOptions, process_caption
from .conditioning import (
    apply_model,
    encode_caption,
    image_geometry,
    model_inputs,
    to_device,
    training_guidance,
    with_values,
)
from .config import PRECISIONS, WAN22_BOUNDARIES, TrainConfig, TrainingError, TrainResult
from .dataset import Dataset
from .distributed import SINGLE, Processes
from .evaluation import sample_prompts
from .image_inputs import REFERENCE, START_FRAME, image_input, reference_values, start_frame_values
from .latent_cache import LatentCache, vae_fingerprint
from .latent_store import LatentStore
from .loop import TrainLoop
from .masks import LossMasks
from .optim import lora_plus_groups
from .planning import plan_memory
from .state import check_resumable, save_state

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingError"]

# Network settings a resumed run may change: they do not shape the adapters or their scale.
RESUMABLE_NETWORK_SETTINGS = ("rank_dropout", "module_dropout", "network_dropout", "seed")


class Trainer:
    """Trains `network` (created on `model`) on `dataset`; the host's CLIP and VAE encode the data.

    Adapter files go to `output_dir` (a loras folder: they are LoRAs); the resume state, which
    is not, goes to `state_dir` (default: `output_dir`). Under torchrun, `processes` says which process this is.
    """

    def __init__(self, model, clip, vae, dataset: Dataset, network: LoraNetwork, config: TrainConfig,
                 output_dir: Path | None = None, name: str = "lora",
                 on_step: Callable[[dict], None] | None = None, resume: Path | None = None,
                 state_dir: Path | None = None, processes: Processes = SINGLE):
        self.model, self.clip, self.vae = model, clip, vae
        self.processes = processes  # this process among the run's (torchrun); only the first writes files
        self.dataset, self.network, self.config = dataset, network, config
        self.output_dir, self.name, self.on_step, self.resume = output_dir, name, on_step, resume
        self.state_dir = state_dir if state_dir is not None else output_dir
        if config.attach == "weights" and getattr(model.model.model_config, "scaled_fp8", None) is not None:
            raise ValueError("attach: this model stores scaled fp8 weights, which the host scales inside each "
                             "layer's forward, so W + dW would be scaled as well; use attach = bypass")
        if network.config is not None and network.config.network_dropout and config.attach != "bypass":
            raise ValueError("network_dropout: drops adapter activations, which only attach = bypass computes")
        if config.epochs:
            self.config = config = replace(config, steps=self.epoch_steps(config.epochs))
        self.kind = objective.prediction(model.get_model_object("model_sampling"))
        if config.expert != "all" and self.kind != "flow":
            raise ValueError(f"expert: the experts split the noise levels of a flow model (Wan 2.2 A14B); this model "
                             f"predicts {self.kind}; set expert = all")
        self.timestep_sampling = objective.family_sampling(config.timestep_sampling, self.kind)
        for option, unused in (("timestep_shift", config.timestep_shift != "model" and self.kind != "flow"),
                               ("min_snr_gamma", config.min_snr_gamma and self.kind == "flow")):
            if unused:
                logging.info("Train LoRA: %s does not apply to %s models; ignored", option, self.kind)
        self.latents = LatentStore()
        self.image_input: str | None = None  # the image the model is conditioned on besides the caption (check_model)
        self.image_values: dict[tuple[bool, int, bool], dict] = {}  # its conditioning values by (held out, item, flip)
        self.masks = LossMasks(config.mask_floor)
        self.text: dict[str, list] = {}  # host conditioning of captions that never change
        self.checkpoints: list[Path] = []
        self.train_clip = None  # the CLIP clone carrying text-encoder adapters, while training them
        self.compute_dtype: torch.dtype | None = None  # what the model computes in, once training runs
        self._disk_cache: LatentCache | None = None
        self.guidance: float | None = None
        self.plan: memory.MemoryPlan | None = None  # device memory, estimated before step 1
        self.streamed = False  # whether some weights stream from RAM in this run
        self.samples = sample_prompts(self)  # parsed before anything is encoded: a bad line fails the run's start
        layout = layout_of(model) if config.block_lrs else None
        self.block_lrs = (layout, block_values(config.block_lrs, layout, "block_lrs") if layout else {})
        if (config.keep_best or config.patience) and not dataset.validation:
            raise ValueError("keep_best / patience: judged by the held-out loss, but the dataset holds no image out; "
                             "set validation_split in Load Dataset")
        self.identity = self.run_identity()  # kept in the resume state
        if resume is not None:  # before anything is encoded: a run that cannot continue says so at once
            check_resumable(resume, self.identity, self.config.batch_size, processes.world)
        self.check_model()

    def epoch_steps(self, epochs: int) -> int:
        """Optimizer steps in `epochs` epochs: global batches per epoch over the accumulation, rounded up."""
        cfg = self.config
        batches = len(self.dataset.epoch_order(0, cfg.seed, cfg.batch_size * self.processes.world))
        return max(1, math.ceil(epochs * batches / cfg.grad_accum))

    # --- data --------------------------------------------------------------------------------
    def encode_images(self, items, validation: bool = False, batch: int = 16) -> None:
        """Encode every image (and its mirror when flipping) once, in the model's latent space.

        Images of one bucket go through the VAE together: each host encode call has a fixed cost.
        A video VAE reads a batch of images as the frames of one clip, so there each image is
        encoded alone, as a one-frame clip.
        With the disk cache, latents found next to the images are read instead, and new ones written.
        """
        disk = self.disk_cache()
        flips = self.flips(validation)
        if getattr(self.vae, "latent_dim", 2) == 3:
            batch = 1
        todo: dict[tuple, list[tuple[int, bool]]] = {}
        for index, item in enumerate(items):
            for flip in flips:
                if self.latents.has(index, flip, validation):
                    continue
                # A start-frame model's conditioning comes from the pixels: they are read (and encoded) anyway.
                cached = disk.load(item, flip) if disk and self.image_input != START_FRAME else None
                if cached is not None:
                    self.latents.put(index, flip, validation, self.model.model.process_latent_in(cached).float()[0])
                else:
                    todo.setdefault((tuple(item.bucket), flip), []).append(index)
        import comfy.model_management as mm

        for (_, flip), indices in todo.items():
            for start in range(0, len(indices), batch):
                mm.throw_exception_if_processing_interrupted()  # Cancel: what was cached so far stays, whole
                chunk = indices[start:start + batch]
                pixels = torch.stack([self.dataset.load_image(items[i], crop="center", flip=flip) for i in chunk])
                if pixels.dim() == 5:  # one clip [1, T, H, W, 3]: the video VAE reads the frames as its batch
                    pixels = pixels[0]
                with torch.no_grad():
                    raw = self.vae.encode(pixels[..., :3]).float().cpu()
                    latents = self.model.model.process_latent_in(raw).float()
                    if self.image_input == START_FRAME:
                        self.image_values[(validation, chunk[0], flip)] = start_frame_values(self.vae, pixels)
                for index, latent, raw_latent in zip(chunk, latents, raw, strict=True):
                    self.latents.put(index, flip, validation, latent)
                    if disk:
                        disk.save(items[index], flip, raw_latent.unsqueeze(0))

    def encode_control(self, items, validation: bool = False) -> None:
        """The edit model's source image of every item (mirrored with it), as ReferenceLatent conditions on it."""
        if self.image_input != REFERENCE:
            return
        import comfy.model_management as mm

        for index, item in enumerate(items):
            for flip in self.flips(validation):
                mm.throw_exception_if_processing_interrupted()
                with torch.no_grad():
                    values = reference_values(self.vae, self.dataset.load_control(item, flip=flip))
                self.image_values[(validation, index, flip)] = values

    def sample_values(self, indices: list[int], flips: list[bool], validation: bool = False) -> list[dict]:
        """The image conditioning values of each sample (empty for a model conditioned on text alone)."""
        if self.image_input is None:
            return [{} for _ in indices]
        return [self.image_values[(validation, i, flip)] for i, flip in zip(indices, flips, strict=True)]

    def flips(self, validation: bool) -> tuple[bool, ...]:
        return (False, True) if self.config.flip and not validation else (False,)

    def disk_cache(self) -> LatentCache | None:
        if self.config.latent_cache != "disk":
            return None
        if self._disk_cache is None:
            self._disk_cache = LatentCache(vae_fingerprint(self.vae))
        return self._disk_cache

    def encode_text(self, caption: str, cache: bool = True) -> list:
        """The frozen text encoder's host conditioning for `caption` (on the CPU), kept when `cache`. Cancel is
        honoured before each caption: encoding a dataset's captions up front is a long loop."""
        if caption in self.text:
            return self.text[caption]
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        with torch.no_grad():
            conditioning = to_device(encode_caption(self.clip, caption), "cpu")
        if cache:
            self.text[caption] = conditioning
        return conditioning

    def captions_change(self) -> bool:
        c = self.config.captions
        return bool(c.shuffle_tags or c.caption_dropout or c.tag_dropout)

    def encode_fixed_captions(self) -> None:
        """Encode captions up front when they never change, so the text encoder and UNet don't alternate."""
        if self.captions_change():
            return
        rng = random.Random(0)
        for item in self.dataset.items:
            self.encode_text(self.caption(item, self.config.captions, rng))

    def caption(self, item, options: CaptionOptions, rng: random.Random) -> str:
        """The caption an item trains with: regularisation images keep their own (no trigger word: it is what they
        must not learn), or the empty prompt with reg_empty_prompt (what the sampler's empty negative encodes)."""
        if item.is_reg and self.dataset.reg_empty_prompt:
            return ""
        return process_caption(item.caption, replace(options, trigger_word="") if item.is_reg else options, rng)

    def fixed_caption(self, item) -> str:
        """The caption with trigger word, prefix and suffix, and nothing random (for validation)."""
        c = replace(self.config.captions, shuffle_tags=False, caption_dropout=0.0, tag_dropout=0.0)
        return self.caption(item, c, random.Random(0))

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Encode the data, plan the device memory, load the model to fit it, and train."""
        cfg = self.config
        start = time.monotonic()
        self.encode_images(self.dataset.items)
        self.encode_images(self.dataset.validation, validation=True)
        self.encode_control(self.dataset.items)
        self.encode_control(self.dataset.validation, validation=True)
        self.masks.encode(self.dataset.items, self.latents, self.flips(False))
        self.masks.encode(self.dataset.validation, self.latents, self.flips(True), validation=True)
        self.encode_fixed_captions()
        for item in self.dataset.validation:
            self.encode_text(self.fixed_caption(item))
        train_te = any(name.startswith("lora_te") for name in self.network.adapters)
        memory.release([self.vae.patcher] + ([self.clip.patcher] if not train_te and not self.captions_change() else []))
        patched, self.train_clip = self.network.attach(self.model, self.clip if train_te else None, mode=cfg.attach)
        patchers = [patched] + ([self.train_clip.patcher] if train_te else [])
        device = patched.load_device
        autocast_dtype = PRECISIONS[cfg.precision]
        blocks = BlockOptions(checkpointing=cfg.gradient_checkpointing, compiled=cfg.compile_blocks)
        diffusion_model = patched.model.diffusion_model
        trained_encoders = [encoder for name, encoder in text_encoders(self.train_clip.cond_stage_model).items()
                            if is_trainable_text_encoder(name)] if self.train_clip is not None else []
        try:
            with torch.inference_mode(False), torch.enable_grad(), training_blocks(diffusion_model, blocks), \
                    text_encoder_layers(trained_encoders):
                self.plan = plan_memory(self, patched, blocks, device, autocast_dtype)
                may_stream = self.plan.budget is not None and (
                    not self.plan.estimated or self.plan.resident_weights < patched.model_size())
                with memory.synchronous_streaming(may_stream):
                    try:
                        self.streamed = memory.load(patched, patchers[1:], self.plan)
                        if self.streamed and not blocks.checkpointing:
                            blocks.checkpointing = True  # streamed weights must not stay on the device until backward
                            logging.info("Train LoRA: weights stream from RAM, so every block is checkpointed")
                        for patcher in patchers:
                            memory.normal_tensors_(patcher.model, device)
                        self.network.to(device)
                        self.network.train()
                        return TrainLoop(self, patched, patchers, blocks, device, autocast_dtype, start).run()
                    finally:
                        memory.release(patchers)  # the host undoes the clones' patches (inside the block wrappers)
        finally:
            self.network.eval()
            self.network.requires_grad_(False)
            self.network.to("cpu")
            self.train_clip = None

    def run_identity(self) -> dict:
        """What a resumed run must share with the saved one: the adapters' shapes and scales, the optimizer, and
        the images (names, repeats, which are held out or prior), as JSON values."""
        network = asdict(self.network.config) if self.network.config is not None else {}
        shaping = {k: v for k, v in network.items() if k not in RESUMABLE_NETWORK_SETTINGS}
        root = Path(self.dataset.root)
        files = [[str(_relative(item.path, root)), item.repeats, item.is_reg, held_out]
                 for held_out, items in ((False, self.dataset.items), (True, self.dataset.validation))
                 for item in items]
        digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
        return {"network": shaping, "optimizer": self.config.optimizer,
                "dataset": {"images": len(files), "folder": str(root), "files": digest}}

    def param_groups(self) -> list[dict]:
        """Optimizer groups: UNet and text-encoder adapters at their learning rates (times their block's block_lrs
        multiplier), each split for LoRA+."""
        cfg = self.config
        layout, multipliers = self.block_lrs
        by_lr: dict[tuple[bool, float], list] = {}  # UNet groups first, as resumed states expect
        for name, adapter in self.network.adapters.items():
            te = name.startswith("lora_te")
            lr = (cfg.text_encoder_lr or cfg.learning_rate) if te else cfg.learning_rate
            if layout is not None:
                lr *= multipliers.get(block_of(name, layout), 1.0)
            by_lr.setdefault((te, lr), []).extend((f"{name}.{p}", t) for p, t in adapter.named_parameters())
        groups = []
        for (_, lr), named in sorted(by_lr.items(), key=lambda entry: entry[0][0]):
            groups += lora_plus_groups(named, lr, cfg.lora_plus_ratio, cfg.weight_decay)
        return groups

    def after_preview(self, patched, patchers) -> None:
        """Sampling loaded the VAE and, with free memory, more of the model: back to the planned device memory."""
        memory.release([self.vae.patcher])
        if self.streamed:
            memory.load(patched, patchers[1:], self.plan)

    def check_model(self) -> None:
        """Build the model's inputs once, before anything is encoded: this fails with a message if the model
        needs inputs training cannot give it, and finds the guidance it trains with."""
        latent_format = self.model.get_model_object("latent_format")
        video = getattr(latent_format, "latent_dimensions", 2) == 3
        self.check_clips(video)
        noise = torch.zeros(1, latent_format.latent_channels, *([1] if video else []), 8, 8)
        empty = self.encode_text("")
        self.image_input = image_input(self.model.model, empty, noise, self.dataset.has_control)
        if self.image_input == START_FRAME:  # what the model takes when it is given no start frame
            empty = with_values(empty, {"concat_latent_image": torch.zeros_like(noise)}, "cpu")
        self.guidance = training_guidance(self.model.model, empty, noise, self.config.guidance)

    def check_clips(self, video: bool) -> None:
        """Clips need a video model, and frame counts its VAE can encode (4n + 1 for Wan's)."""
        clips = [item for item in self.dataset.items + self.dataset.validation if item.is_clip]
        if not clips:
            return
        if not video:
            raise ValueError(f"dataset: {len(clips)} clip(s) (e.g. {clips[0].path}) but this is an image model; train "
                             "clips on a video model (Wan, HunyuanVideo, ...), or remove them from the folder")
        down, up = self.vae.downscale_ratio[0], self.vae.upscale_ratio[0]
        multiple = up(2) - up(1)
        for item in clips:
            if up(down(item.frame_count)) != item.frame_count:
                raise ValueError(f"frame_multiple: {item.path} trains {item.frame_count} frames, which this VAE does "
                                 f"not encode as they are; its clips take {multiple}n + 1 frames: set frame_multiple "
                                 f"to {multiple} and frames to one of {multiple + 1}, {2 * multiple + 1}, ...")

    def conditioning(self, captions: list[str], device, values: list[dict] | None = None) -> list[list]:
        """Host conditioning per caption (with each sample's image values); through the text-encoder adapters
        (uncached) while they train."""
        if self.train_clip is not None:
            conditionings = [to_device(encode_caption(self.train_clip, c), device) for c in captions]
        else:
            cache = not self.captions_change()
            conditionings = [to_device(self.encode_text(c, cache), device) for c in captions]
        values = values or [{} for _ in captions]
        return [with_values(c, v, device) for c, v in zip(conditionings, values, strict=True)]

    def draw_batch(self, patched, batch: list[int], rng, gen, device,
                   share: tuple[int, int] | None = None) -> tuple | None:
        """One micro-batch's x0, noise, sigma, captions, geometries and loss weights, drawn from `rng` and `gen`;
        with `share`, what is drawn for the whole batch is cut to that part (this process's, see distributed.py)."""
        cfg = self.config
        items = [self.dataset.items[i] for i in batch]
        flips = [cfg.flip and rng.random() < 0.5 for _ in batch]
        x0 = torch.stack([self.latents.get(i, flip) for i, flip in zip(batch, flips, strict=True)])
        captions = [self.caption(item, cfg.captions, rng) for item in items]
        low, high = self.expert_levels(patched, x0)
        low, high = max(low, cfg.min_timestep / 1000), min(high, cfg.max_timestep / 1000)
        if low >= high:
            raise ValueError(f"min_timestep / max_timestep leave no noise level to the {cfg.expert} expert")
        levels = objective.sample_noise_levels(len(batch), rng, self.timestep_sampling, low, high)
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((*x0.shape[:2], *[1] * (x0.dim() - 2)), generator=gen)
        start, end = share or (0, len(batch))
        if start == end:
            return None  # this process has no part of the batch: it only kept its draws in step
        part = slice(start, end)
        x0 = x0[part].to(device)
        weights = self.masks.weights(items[part], batch[part], flips[part], False, self.latents, device)
        geometries = [image_geometry(item, flip) for item, flip in zip(items[part], flips[part], strict=True)]
        return (x0, noise[part].to(device), self.sigmas(patched, levels[part], x0), captions[part], geometries,
                weights, self.sample_values(batch[part], flips[part]))

    def batch_loss(self, patched, batch: list[int], rng, gen, device, autocast_dtype,
                   share: tuple[int, int] | None = None) -> torch.Tensor:
        x0, noise, sigma, captions, geometries, weights, values = self.draw_batch(patched, batch, rng, gen, device,
                                                                                  share)
        return self.loss(patched, x0, noise, sigma, self.conditioning(captions, device, values), geometries, weights,
                         autocast_dtype, min_snr=self.config.min_snr_gamma)

    def expert_boundary(self) -> float:
        """The sigma where the experts switch: the setting, or Wan 2.2's for this kind of model."""
        task = "image-to-video" if self.image_input == START_FRAME else "text-to-video"
        return self.config.expert_boundary or WAN22_BOUNDARIES[task]

    def expert_levels(self, patched, x0: torch.Tensor) -> tuple[float, float]:
        """The noise levels (0-1) the expert trained here denoises: all of them, or one side of the boundary."""
        cfg = self.config
        if cfg.expert == "all":
            return 0.0, 1.0
        boundary = objective.level_at_sigma(patched.get_model_object("model_sampling"), self.expert_boundary(),
                                            cfg.timestep_shift, cfg.shift, tokens=x0[0, 0].numel() // 4)
        return (boundary, 1.0) if cfg.expert == "high_noise" else (0.0, boundary)

    def sigmas(self, patched, levels: list[float], x0: torch.Tensor) -> torch.Tensor:
        """The model's noise levels (sigmas) for `levels` in [0, 1], with the configured timestep shift."""
        cfg = self.config
        return objective.sigmas_for(patched.get_model_object("model_sampling"), levels, cfg.timestep_shift, cfg.shift,
                                    tokens=x0[0, 0].numel() // 4).to(x0.device)

    def loss(self, patched, x0, noise, sigma, conditionings, geometries, weights, autocast_dtype,
             min_snr: float = 0.0) -> torch.Tensor:
        """The weighted native-space loss of the model's prediction for x0 noised to `sigma`."""
        x, inputs = self.model_call(patched, x0, noise, sigma, conditionings, geometries)
        return self.prediction_loss(patched, x, x0, sigma, inputs, weights, autocast_dtype, min_snr)

    def model_call(self, patched, x0, noise, sigma, conditionings, geometries) -> tuple:
        """The noisy latent and the model's keyword inputs, as the host builds them for sampling."""
        x = patched.get_model_object("model_sampling").noise_scaling(sigma.view(-1, *[1] * (x0.dim() - 1)), noise, x0)
        return x, model_inputs(patched.model, conditionings, x, geometries, self.guidance,
                               patched.model_options.get("transformer_options"))

    def prediction_loss(self, patched, x, x0, sigma, inputs, weights, autocast_dtype, min_snr: float = 0.0):
        """The weighted loss of the model's prediction from the noisy latent `x` of `x0`."""
        model_sampling = patched.get_model_object("model_sampling")
        sigma_data = float(getattr(model_sampling, "sigma_data", 1.0))
        with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            denoised = apply_model(patched.model, x, sigma, inputs)
        per_sample = objective.prediction_loss(self.kind, denoised, x0, sigma, self.config.loss,
                                               self.config.huber_delta, sigma_data, weights)
        if min_snr and self.kind != "flow":
            per_sample = per_sample * objective.min_snr_weight(self.kind, sigma, min_snr, sigma_data)
        return per_sample.mean()

    # --- files -------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, str]:
        cfg = self.config
        info = {
            **ss_metadata(cfg), **ss_metadata(cfg.captions),
            **(ss_metadata(self.network.config) if self.network.config is not None else {}),
            "ss_steps": str(step), "ss_num_train_images": str(len(self.dataset.items)),
            "ss_masked_loss": str(len(self.masks) > 0),
            "lora_foundry_dataset": _json({"masks": self.dataset.report.masks,
                                           "masked_images": self.dataset.report.masks_found,
                                           "reg_empty_prompt": self.dataset.reg_empty_prompt}),
            "lora_foundry_training": _json(asdict(cfg)),
        }
        if self.dataset.options is not None:
            info["lora_foundry_dataset_options"] = _json(self.dataset.options)
        return kohya_metadata(self.network.config, self.model.model.model_config, self.name, info,
                              self.dataset.tag_frequency())

    @property
    def state_path(self) -> Path | None:
        return Path(self.state_dir) / f"{self.name}-state.safetensors" if self.state_dir is not None else None

    def save_state(self, optimizer, scheduler, loop, rng, gen, ema=None) -> None:
        """Write the full training state next to the checkpoints (to resume with `resume=state_path`)."""
        if self.state_path is not None and self.processes.writes:
            save_state(self.state_path, self.network, optimizer, scheduler, loop, rng, gen, ema)

    def save_checkpoint(self, step: int, tag: str | None = None, finite_only: bool = False) -> Path | None:
        """Write the adapter as it is now into the output folder (atomic); None without a folder, and with
        `finite_only` when a value of it is NaN or infinite (no loader should list such an adapter as good)."""
        if self.output_dir is None or not self.processes.writes:
            return None
        suffix = tag or f"step{step:06d}"
        path = Path(self.output_dir) / f"{self.name}-{suffix}.safetensors"
        tensors = self.network.state_dict_kohya()
        if finite_only and not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
            logging.warning("Train LoRA: the adapter of step %d has NaN or infinite values; %s not written", step,
                            path.name)
            return None
        write_safetensors(tensors, path, self.metadata(step))
        self.checkpoints.append(path)
        return path


def _json(value) -> str:
    return json.dumps(value, default=str)


def _relative(path: Path, root: Path) -> Path:
    """`path` relative to the dataset's root, or as it is (a prior image lives in another folder)."""
    try:
        return Path(path).relative_to(root)
    except ValueError:
        return Path(path)
