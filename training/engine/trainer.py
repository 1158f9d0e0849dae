"""A training run: its parts built from what it was given, the data encoded once, adapters on the host's
ModelPatcher, the device memory planned, then the loop.

The parts: the captions' conditioning (text.py), the encoded data (preparation.py), the micro-batch's loss
(step.py), the files (outputs.py), the previews and held-out loss (evaluation.py); the plan (planning.py) and the
loop (loop.py) get the run's context (context.py), never the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ...lora_core.block_weights import block_of, block_values, layout_of
from ...lora_core.network import LoraNetwork, is_trainable_text_encoder
from ...lora_core.targets import text_encoders
from ..data.captions import SliderSides
from ..data.dataset import Dataset
from ..data.text_cache import TextCache, encoder_fingerprint
from . import memory, objective
from .blocks import BlockOptions, text_encoder_layers, training_blocks
from .conditioning import training_guidance, with_values
from .config import PRECISIONS, TrainConfig, TrainingError, TrainResult
from .context import RunContext
from .distributed import SINGLE, Processes
from .evaluation import Previews, sample_prompts
from .image_inputs import START_FRAME, image_input
from .loop import TrainLoop
from .optim import lora_plus_groups
from .outputs import RunFiles
from .planning import plan_memory
from .preparation import EncodedData
from .quantize import quantize_base
from .state import check_resumable
from .step import TrainingStep
from .text import TextConditioning

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingError"]

# Network settings a resumed run may change: they do not shape the adapters or their scale.
RESUMABLE_NETWORK_SETTINGS = ("rank_dropout", "module_dropout", "network_dropout", "seed")


class Trainer:
    """Trains `network` (created on `model`) on `dataset`; the host's CLIP and VAE encode the data.

    Adapter files go to `output_dir` (a loras folder: they are LoRAs); the resume state, which
    is not, goes to `state_dir` (default: `output_dir`). Under torchrun, `processes` says which process this is.
    """

    # The parts that read the data through the host's encoders; a subclass may give others (the benches give
    # random latents and conditioning of the model's shapes).
    text_conditioning: type[TextConditioning] = TextConditioning
    encoded_data: type[EncodedData] = EncodedData

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
        if config.base_quantization != "none" and config.attach != "bypass":
            raise ValueError(f"base_quantization {config.base_quantization}: the 4-bit weights are computed by each "
                             "layer's forward, where bypass adapters add their output; set attach = bypass")
        if network.config is not None and network.config.network_dropout and config.attach != "bypass":
            raise ValueError("network_dropout: drops adapter activations, which only attach = bypass computes")
        nonlinear = sorted({a.algorithm for a in network.adapters.values() if not a.linear_in_strength})
        if config.slider and nonlinear:
            raise ValueError(f"slider_positive / slider_negative: a slider's -1 must undo its +1, and ComfyUI applies "
                             f"{' / '.join(t.upper() for t in nonlinear)} at a negative strength as no reverse of the "
                             "positive (OFT squares the strength); choose lora, loha or lokr for a slider")
        if config.epochs:
            self.config = config = replace(config, steps=self.epoch_steps(config.epochs))
        kind = objective.prediction(model.get_model_object("model_sampling"))
        if config.expert != "all" and kind != "flow":
            raise ValueError(f"expert: the experts split the noise levels of a flow model (Wan 2.2 A14B); this model "
                             f"predicts {kind}; set expert = all")
        for option, unused in (("timestep_shift", config.timestep_shift != "model" and kind != "flow"),
                               ("min_snr_gamma", config.min_snr_gamma and kind == "flow")):
            if unused:
                logging.info("Train LoRA: %s does not apply to %s models; ignored", option, kind)
        slider = (SliderSides(config.slider_positive, config.slider_negative, config.slider_target) if config.slider
                  else None)
        self.text = self.text_conditioning(clip, config.captions, dataset.reg_empty_prompt,
                                            config.preservation_classes, self.text_cache(clip, dataset, config), slider,
                                            blank=bool(config.blank_preservation_weight))
        self.data = self.encoded_data(dataset, model, vae, config)
        self.samples = sample_prompts(config, dataset, vae)  # parsed before anything is encoded: a bad line fails
        layout = layout_of(model) if config.block_lrs else None
        self.block_lrs = (layout, block_values(config.block_lrs, layout, "block_lrs") if layout else {})
        if (config.keep_best or config.patience) and not dataset.validation:
            raise ValueError("keep_best / patience: judged by the held-out loss, but the dataset holds no image out; "
                             "set validation_split in Load Dataset")
        self.identity = self.run_identity()  # kept in the resume state
        if resume is not None:  # before anything is encoded: a run that cannot continue says so at once
            check_resumable(resume, self.identity, self.config.batch_size, processes.world)
        guidance = self.check_model()
        self.step = TrainingStep(self.config, dataset, self.data, self.text, kind,
                                 objective.family_sampling(config.timestep_sampling, kind), guidance, network)
        self.files: RunFiles | None = None  # the run's files, once it runs
        self.context: RunContext | None = None  # the last run's context (its plan, its compute dtype)

    @staticmethod
    def text_cache(clip, dataset: Dataset, config: TrainConfig) -> TextCache | None:
        """The disk cache of the text encoders' outputs, with latent_cache = disk and a CLIP it can tell apart."""
        encoders = encoder_fingerprint(clip) if config.latent_cache == "disk" and hasattr(clip, "patcher") else None
        if encoders is None:
            return None
        return TextCache(Path(dataset.root), encoders)

    def epoch_steps(self, epochs: int) -> int:
        """Optimizer steps in `epochs` epochs: global batches per epoch over the accumulation, rounded up."""
        cfg = self.config
        batches = len(self.dataset.epoch_order(0, cfg.seed, cfg.batch_size * self.processes.world))
        return max(1, math.ceil(epochs * batches / cfg.grad_accum))

    def run(self) -> TrainResult:
        """Encode the data, plan the device memory, load the model to fit it, and train."""
        cfg = self.config
        start = time.monotonic()
        self.data.encode(self.text)
        train_te = any(name.startswith("lora_te") for name in self.network.adapters)
        memory.release([self.vae.patcher] + ([self.clip.patcher] if not train_te and not self.text.changes else []))
        patched, train_clip = self.network.attach(self.model, self.clip if train_te else None, mode=cfg.attach)
        self.text.train_clip = train_clip
        quantized = quantize_base(patched, patched.load_device) if cfg.base_quantization == "nf4" else 0
        run = self.run_context(patched, train_clip,
                               BlockOptions(checkpointing=cfg.gradient_checkpointing, compiled=cfg.compile_blocks,
                                            recompute_as=self.network.as_now),
                               PRECISIONS[cfg.precision], start)
        run.quantized = quantized
        trained_encoders = [encoder for name, encoder in text_encoders(train_clip.cond_stage_model).items()
                            if is_trainable_text_encoder(name)] if train_clip is not None else []
        try:
            with torch.inference_mode(False), torch.enable_grad(), \
                    training_blocks(patched.model.diffusion_model, run.blocks), text_encoder_layers(trained_encoders):
                run.plan = plan_memory(run)
                may_stream = run.plan.budget is not None and (
                    not run.plan.estimated or run.plan.resident_weights < run.plan.weights)
                with memory.synchronous_streaming(may_stream):
                    try:
                        run.streamed = memory.load(patched, run.patchers[1:], run.plan)
                        if run.streamed and not run.blocks.checkpointing:
                            run.blocks.checkpointing = True  # streamed weights must not stay on the device until backward
                            logging.info("Train LoRA: weights stream from RAM, so every block is checkpointed")
                        for patcher in run.patchers:
                            memory.normal_tensors_(patcher.model, run.device)
                        self.network.to(run.device)
                        self.network.train()
                        return TrainLoop(run, self.param_groups()).run()
                    finally:
                        memory.release(run.patchers)  # the host undoes the clones' patches (inside the block wrappers)
        finally:
            self.network.eval()
            self.network.requires_grad_(False)
            self.network.to("cpu")
            self.text.train_clip = None
            run.train_clip = None

    def run_context(self, patched, train_clip, blocks: BlockOptions, autocast_dtype: torch.dtype | None,
                    start: float = 0.0, device: torch.device | None = None) -> RunContext:
        """The context of a run on `patched` (the model with the adapters attached): its files and previews too;
        on the model's load device unless `device` says otherwise."""
        self.files = RunFiles(self.network, self.config, self.dataset, self.data.masks, self.model.model.model_config,
                              self.name, self.output_dir, self.state_dir, self.processes.writes)
        run = self.context = RunContext(
            self.config, self.network, self.dataset, self.step, self.files, self.processes, self.vae, patched,
            [patched] + ([train_clip.patcher] if train_clip is not None else []), blocks, device or patched.load_device,
            autocast_dtype, train_clip=train_clip, on_step=self.on_step, resume=self.resume, identity=self.identity,
            start=start)
        if self.samples:
            run.previews = Previews(self.samples, self.step, self.network, self.vae, self.state_dir, self.name,
                                    self.on_step is not None, run.after_preview)
        return run

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

    def check_model(self) -> float | None:
        """Build the model's inputs once, before anything is encoded: this fails with a message if the model
        needs inputs training cannot give it, finds the image it is conditioned on besides the caption, and
        returns the guidance it trains with."""
        latent_format = self.model.get_model_object("latent_format")
        video = getattr(latent_format, "latent_dimensions", 2) == 3
        self.check_clips(video)
        noise = torch.zeros(1, latent_format.latent_channels, *([1] if video else []), 8, 8)
        empty = self.text.encode("")
        self.data.image_input = image_input(self.model.model, empty, noise, self.dataset.has_control)
        if self.data.image_input == START_FRAME:  # what the model takes when it is given no start frame
            empty = with_values(empty, {"concat_latent_image": torch.zeros_like(noise)}, "cpu")
        return training_guidance(self.model.model, empty, noise, self.config.guidance)

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


def _relative(path: Path, root: Path) -> Path:
    """`path` relative to the dataset's root, or as it is (a prior image lives in another folder)."""
    try:
        return Path(path).relative_to(root)
    except ValueError:
        return Path(path)
