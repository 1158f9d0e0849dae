"""The training loop: adapters on the host's ModelPatcher, the model's own objective, checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..lora_core.files import write_safetensors
from ..lora_core.metadata import kohya_metadata
from ..lora_core.network import ATTACH_MODES, LoraNetwork, is_trainable_text_encoder
from ..lora_core.settings import check_choices, setting, ss_metadata
from ..lora_core.targets import text_encoders
from . import memory, objective
from .blocks import INPLACE_ERROR, BlockOptions, InPlaceAsNew, text_encoder_layers, training_blocks
from .buckets import cover_size
from .captions import CaptionOptions, process_caption
from .conditioning import (
    TRAINING_GUIDANCE,
    ImageGeometry,
    apply_model,
    encode_caption,
    model_inputs,
    to_device,
    training_guidance,
)
from .dataset import Dataset
from .latent_cache import LatentCache, vae_fingerprint
from .objective import LOSSES, TIMESTEP_SAMPLING, TIMESTEP_SHIFTS
from .optim import OPTIMIZERS, SCHEDULERS, STATE_FLOATS, build_optimizer, build_scheduler, lora_plus_groups
from .state import load_state, save_state

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_CACHES = ("memory", "disk")


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what)."""


@dataclass
class TrainConfig:
    """How a run trains: every setting declared once (lora_core.settings), node inputs and metadata derived."""

    steps: int = setting(300, "Optimizer steps.", min=1, max=1_000_000, kohya="max_train_steps",
                         ss=("ss_max_train_steps",))
    batch_size: int = setting(1, "Images per micro-batch.", min=1, max=256, kohya="train_batch_size",
                              ss=("ss_batch_size_per_device",))
    learning_rate: float = setting(1e-4, "The adapters' learning rate (UNet / DiT).", min=0.0, max=10.0, step=1e-5,
                                   kohya="learning_rate", ss=("ss_learning_rate", "ss_unet_lr"))
    text_encoder_lr: float | None = setting(None, "0 = the UNet's learning rate.", min=0.0, max=10.0, step=1e-5,
                                            zero_is_none=True, kohya="text_encoder_lr")
    optimizer: str = setting("AdamW", "AdamW8bit keeps its state in 8 bits; Prodigy finds its own step size "
                             "(learning rate about 1.0).", choices=OPTIMIZERS, kohya="optimizer_type",
                             ss=("ss_optimizer",))
    weight_decay: float = setting(0.01, "Decoupled weight decay.", min=0.0, max=1.0, step=0.001)
    scheduler: str = setting("constant", "Learning-rate schedule after the warm-up.", choices=SCHEDULERS,
                             kohya="lr_scheduler", ss=("ss_lr_scheduler",))
    warmup_steps: int = setting(0, "Steps of linear learning-rate warm-up.", min=0, max=100_000,
                                kohya="lr_warmup_steps", ss=("ss_lr_warmup_steps",))
    lora_plus_ratio: float = setting(0.0, "LoRA+: the zero-initialised factors learn this many times faster "
                                     "(0 = off).", min=0.0, max=64.0, step=1.0, kohya="loraplus_lr_ratio")
    grad_clip: float = setting(1.0, "Clip the gradient norm (0 = off).", min=0.0, max=100.0, step=0.1,
                               kohya="max_grad_norm", ss=("ss_max_grad_norm",))
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", min=1, max=1024,
                              kohya="gradient_accumulation_steps", ss=("ss_gradient_accumulation_steps",))
    seed: int = setting(0, "Seeds the adapters' initial values, the data order and the noise.", min=0,
                        max=2**31 - 1, kohya="seed", ss=("ss_seed",))
    precision: str = setting("fp32", "The compute dtype while training (autocast); the adapter stays fp32.",
                             choices=tuple(PRECISIONS), kohya="mixed_precision", ss=("ss_mixed_precision",))
    gradient_checkpointing: bool = setting(False, "Recompute each block in the backward pass: far less memory, "
                                           "about a third more time.", kohya="gradient_checkpointing",
                                           ss=("ss_gradient_checkpointing",))
    loss: str = setting("mse", "Loss on the model's prediction.", choices=LOSSES, kohya="loss_type")
    huber_delta: float = setting(1.0, "The Huber loss's delta.", min=0.0, max=100.0, step=0.01, kohya="huber_c")
    min_snr_gamma: float = setting(5.0, "eps / v-prediction models; flow models train without it.", min=0.0,
                                   max=100.0, step=0.5, kohya="min_snr_gamma", ss=("ss_min_snr_gamma",))
    noise_offset: float = setting(0.0, "Per-channel noise offset.", min=0.0, max=1.0, step=0.01,
                                  kohya="noise_offset", ss=("ss_noise_offset",))
    timestep_sampling: str = setting("uniform", "How noise levels are drawn.", choices=TIMESTEP_SAMPLING,
                                     kohya="timestep_sampling")
    timestep_shift: str = setting("model", "Flow models (SD3, Flux, Qwen, Wan, ...): model = the model's own "
                                  "shift, as it samples; none; fixed = the shift below; resolution = kohya's "
                                  "flux_shift.", choices=TIMESTEP_SHIFTS)
    shift: float = setting(3.0, "The shift for timestep_shift = fixed.", min=0.1, max=100.0, step=0.05,
                           kohya="discrete_flow_shift")
    guidance: float = setting(TRAINING_GUIDANCE, "Distilled guidance while training (Flux.1-dev, HunyuanVideo); "
                              "other models ignore it. kohya and ai-toolkit train Flux-dev at 1.0.", min=0.0,
                              max=100.0, step=0.1, kohya="guidance_scale")
    min_timestep: int = setting(0, "Lowest timestep drawn (of 1000).", min=0, max=999, kohya="min_timestep")
    max_timestep: int = setting(1000, "Highest timestep drawn (of 1000).", min=1, max=1000, kohya="max_timestep")
    flip: bool = setting(False, "Also train on mirrored images.", kohya="flip_aug", ss=("ss_flip_aug",))
    save_every: int = setting(0, "0 = only at the end.", min=0, max=1_000_000, kohya="save_every_n_steps")
    latent_cache: str = setting("memory", "disk: also keep the latents in a hidden .lora_foundry_cache folder next "
                                "to the images, so the next run skips the VAE.", input="cache_latents",
                                choices=LATENT_CACHES)
    validation_every: int = setting(0, "Held-out loss every N steps (0 = never).", min=0, max=1_000_000,
                                    kohya="validate_every_n_steps")
    sample_every: int = setting(0, "A preview on the node every N steps (0 = never).", min=0, max=1_000_000,
                                kohya="sample_every_n_steps")
    sample_prompts: list[str] = setting([], "One prompt per line.", multiline=True)
    sample_steps: int = setting(12, "Sampler steps of a preview.", min=1, max=200)
    sample_cfg: float = setting(3.0, "CFG of a preview.", min=0.0, max=30.0, step=0.1)
    attach: str = setting("bypass", "bypass: each adapter adds its output in the layer's forward, the base weight "
                          "untouched (fp8 and streamed bases); weights: the layer computes with W + dW (can be "
                          "faster for LoHa / LoKr when the model fits).", choices=ATTACH_MODES)
    vram_budget_gb: float = setting(0.0, "Device memory the run may use; 0 = the free memory. Weights that do not "
                                    "fit stay in RAM and stream in at each use (blocks are then checkpointed). The "
                                    "estimate is logged before step 1.", min=0.0, max=1024.0, step=0.5)
    offload_activations: bool = setting(False, "Keep what the backward pass needs in RAM (with gradient "
                                        "checkpointing: only the blocks' inputs).")
    compile_blocks: bool = setting(False, "torch.compile each diffusion block (the first steps compile, later ones "
                                   "run faster on a GPU; blocks that add in place, Flux / Chroma, stay eager).")
    captions: CaptionOptions = field(default_factory=CaptionOptions)

    def __post_init__(self):
        check_choices(self)
        if self.steps < 1:
            raise ValueError(f"steps: must be at least 1, got {self.steps}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError("min_timestep / max_timestep: need 0 <= min < max <= 1000")
        if self.vram_budget_gb < 0:
            raise ValueError(f"vram_budget_gb: must be 0 (auto) or more, got {self.vram_budget_gb}")


@dataclass
class TrainResult:
    network: LoraNetwork
    losses: list[float]
    validation: list[tuple[int, float]]
    steps: int
    seconds: float
    checkpoints: list[Path]


def normal_tensors_(module: torch.nn.Module, device: torch.device) -> None:
    """Replace inference-mode parameters and buffers on `device` with equal normal tensors.

    ComfyUI loads models under torch.inference_mode(); autograd refuses to save such tensors
    for the backward pass, and every frozen layer between an adapter and the loss needs to.
    Weights the host streams from RAM are left alone (pinned by the host): each use copies them.
    """
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if torch.is_inference(param) and param.device.type == device.type:
                sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and torch.is_inference(buf) and buf.device.type == device.type:
                sub._buffers[name] = buf.clone()


class Trainer:
    """Trains `network` (created on `model`) on `dataset`; the host's CLIP and VAE encode the data.

    Adapter files go to `output_dir` (a loras folder: they are LoRAs); the resume state, which
    is not, goes to `state_dir` (default: `output_dir`).
    """

    def __init__(self, model, clip, vae, dataset: Dataset, network: LoraNetwork, config: TrainConfig,
                 output_dir: Path | None = None, name: str = "lora",
                 on_step: Callable[[dict], None] | None = None, resume: Path | None = None,
                 state_dir: Path | None = None):
        self.model, self.clip, self.vae = model, clip, vae
        self.dataset, self.network, self.config = dataset, network, config
        self.output_dir, self.name, self.on_step, self.resume = output_dir, name, on_step, resume
        self.state_dir = state_dir if state_dir is not None else output_dir
        if config.attach == "weights" and getattr(model.model.model_config, "scaled_fp8", None) is not None:
            raise ValueError("attach: this model stores scaled fp8 weights, which the host scales inside each "
                             "layer's forward, so W + dW would be scaled as well; use attach = bypass")
        if network.config is not None and network.config.network_dropout and config.attach != "bypass":
            raise ValueError("network_dropout: drops adapter activations, which only attach = bypass computes")
        self.kind = objective.prediction(model.get_model_object("model_sampling"))
        for option, unused in (("timestep_shift", config.timestep_shift != "model" and self.kind != "flow"),
                               ("min_snr_gamma", config.min_snr_gamma and self.kind == "flow")):
            if unused:
                logging.info("Train LoRA: %s does not apply to %s models; ignored", option, self.kind)
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.text: dict[str, list] = {}  # host conditioning of captions that never change
        self.checkpoints: list[Path] = []
        self.train_clip = None  # the CLIP clone carrying text-encoder adapters, while training them
        self.compute_dtype: torch.dtype | None = None  # what the model computes in, once training runs
        self._disk_cache: LatentCache | None = None
        self.guidance: float | None = None
        self.plan: memory.MemoryPlan | None = None  # device memory, estimated before step 1
        self.streamed = False  # whether some weights stream from RAM in this run
        self.check_model()

    # --- data --------------------------------------------------------------------------------
    def encode_images(self, items, validation: bool = False, batch: int = 16) -> None:
        """Encode every image (and its mirror when flipping) once, in the model's latent space.

        Images of one bucket go through the VAE together: each host encode call has a fixed cost.
        A video VAE reads a batch of images as the frames of one clip, so there each image is
        encoded alone, as a one-frame clip.
        With the disk cache, latents found next to the images are read instead, and new ones written.
        """
        disk = self.disk_cache()
        flips = (False, True) if self.config.flip and not validation else (False,)
        if getattr(self.vae, "latent_dim", 2) == 3:
            batch = 1
        todo: dict[tuple, list[tuple[int, bool]]] = {}
        for index, item in enumerate(items):
            for flip in flips:
                key = (index if not validation else -1 - index, flip)
                if key in self.latents:
                    continue
                cached = disk.load(item, flip) if disk else None
                if cached is not None:
                    self.latents[key] = self.model.model.process_latent_in(cached).float()[0]
                else:
                    todo.setdefault((tuple(item.bucket), flip), []).append((index, key))
        for (_, flip), entries in todo.items():
            for start in range(0, len(entries), batch):
                chunk = entries[start:start + batch]
                pixels = torch.stack([self.dataset.load_image(items[i], crop="center", flip=flip) for i, _ in chunk])
                with torch.no_grad():
                    raw = self.vae.encode(pixels[..., :3]).float().cpu()
                    latents = self.model.model.process_latent_in(raw).float()
                for (index, key), latent, raw_latent in zip(chunk, latents, raw, strict=True):
                    self.latents[key] = latent
                    if disk:
                        disk.save(items[index], flip, raw_latent.unsqueeze(0))

    def disk_cache(self) -> LatentCache | None:
        if self.config.latent_cache != "disk":
            return None
        if self._disk_cache is None:
            self._disk_cache = LatentCache(vae_fingerprint(self.vae))
        return self._disk_cache

    def encode_text(self, caption: str, cache: bool = True) -> list:
        """The frozen text encoder's host conditioning for `caption` (on the CPU), kept when `cache`."""
        if caption in self.text:
            return self.text[caption]
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
            self.encode_text(process_caption(item.caption, self.caption_options(item), rng))

    def caption_options(self, item, options: CaptionOptions | None = None) -> CaptionOptions:
        """Regularisation images keep their own captions: the trigger word is what they must not learn."""
        options = options or self.config.captions
        return replace(options, trigger_word="") if item.is_reg else options

    def fixed_caption(self, item) -> str:
        """The caption with trigger word, prefix and suffix, and nothing random (for validation)."""
        c = replace(self.config.captions, shuffle_tags=False, caption_dropout=0.0, tag_dropout=0.0)
        return process_caption(item.caption, self.caption_options(item, c), random.Random(0))

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Encode the data, plan the device memory, load the model to fit it, and train."""
        cfg = self.config
        start = time.monotonic()
        self.encode_images(self.dataset.items)
        self.encode_images(self.dataset.validation, validation=True)
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
                self.plan = self.plan_memory(patched, blocks, device, autocast_dtype)
                may_stream = self.plan.budget is not None and (
                    not self.plan.estimated or self.plan.resident_weights < patched.model_size())
                with memory.synchronous_streaming(may_stream):
                    try:
                        self.streamed = memory.load(patched, patchers[1:], self.plan)
                        if self.streamed and not blocks.checkpointing:
                            blocks.checkpointing = True  # streamed weights must not stay on the device until backward
                            logging.info("Train LoRA: weights stream from RAM, so every block is checkpointed")
                        for patcher in patchers:
                            normal_tensors_(patcher.model, device)
                        self.network.to(device)
                        self.network.train()
                        return self.train_loop(patched, patchers, blocks, device, autocast_dtype, start)
                    finally:
                        memory.release(patchers)  # the host undoes the clones' patches (inside the block wrappers)
        finally:
            self.network.eval()
            self.network.requires_grad_(False)
            self.network.to("cpu")
            self.train_clip = None

    def param_groups(self) -> list[dict]:
        """Optimizer groups: UNet and text-encoder adapters at their learning rates, each split for LoRA+."""
        cfg = self.config
        groups = []
        for part, lr in (("unet", cfg.learning_rate), ("te", cfg.text_encoder_lr or cfg.learning_rate)):
            named = [(f"{n}.{p}", t) for n, a in self.network.adapters.items()
                     if n.startswith("lora_te") == (part == "te") for p, t in a.named_parameters()]
            if named:
                groups += lora_plus_groups(named, lr, cfg.lora_plus_ratio, cfg.weight_decay)
        return groups

    def train_loop(self, patched, patchers, blocks, device, autocast_dtype, start) -> TrainResult:
        """Steps from the resumed state (or 0) to the last, on the loaded model."""
        import comfy.model_management as mm

        cfg = self.config
        rng = random.Random(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        groups = self.param_groups()
        optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay)
        scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.steps, cfg.warmup_steps)
        params = [p for g in groups for p in g["params"]]
        good = [p.detach().clone() for p in params]  # the adapter that last gave a finite loss, and its steps
        # "fp32" means no autocast, but the host computes in the base's own dtype: scale whenever that is fp16.
        self.compute_dtype = autocast_dtype or patched.model.manual_cast_dtype or patched.model.get_dtype()
        if self.compute_dtype != (autocast_dtype or torch.float32):
            logging.warning("Train LoRA: precision %s asked, but the base model computes in %s (its weights' dtype)",
                            cfg.precision, self.compute_dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=self.compute_dtype == torch.float16)
        loop = {"step": 0, "epoch": 0, "order": [], "losses": [], "validation": []}
        if self.resume is not None:
            loop = load_state(self.resume, self.network, optimizer, scheduler, rng, gen)
        losses, validation, order = loop["losses"], loop["validation"], loop["order"]
        state = (optimizer, scheduler, loop, rng, gen)
        good_step = loop["step"]
        updating = False  # inside the optimizer's update: an error there may leave the adapter half-changed
        backward_done = False
        activations = (torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
                       if cfg.offload_activations else contextlib.nullcontext())
        try:
            with activations:
                for step in range(loop["step"] + 1, cfg.steps + 1):
                    mm.throw_exception_if_processing_interrupted()
                    step_loss = 0.0
                    for _ in range(cfg.grad_accum):
                        if not order:
                            order.extend(self.dataset.epoch_order(loop["epoch"], cfg.seed, cfg.batch_size))
                            loop["epoch"] += 1
                        batch = order.pop(0)
                        self.network.new_step()
                        draws = (rng.getstate(), gen.get_state())  # what batch_loss draws from
                        loss = self.batch_loss(patched, batch, rng, gen, device, autocast_dtype)
                        if not torch.isfinite(loss):
                            with torch.no_grad():
                                torch._foreach_copy_(params, good)
                            path = self.save_checkpoint(good_step, "last-good")
                            raise TrainingError(
                                f"loss became {loss.item()} at step {step}; training stopped. The last adapter "
                                f"that gave a finite loss is kept at {path}. Lower the learning rate or use fp32/bf16.")
                        with torch.no_grad():
                            torch._foreach_copy_(good, params)
                        good_step = loop["step"]
                        try:
                            scaler.scale(loss / cfg.grad_accum).backward()
                        except RuntimeError as error:
                            if INPLACE_ERROR not in str(error) or backward_done:
                                raise
                            # The model's blocks add residuals in place (Flux, Chroma), found at the run's
                            # first backward: sum them out of place from now on and run this micro-batch
                            # again with the same draws (the adapters keep this step's), so a resumed run
                            # draws exactly what an uninterrupted one does.
                            logging.info("Train LoRA: %s adds residuals in place; training sums them out of place",
                                         type(patched.model.diffusion_model).__name__)
                            blocks.out_of_place = True
                            optimizer.zero_grad(set_to_none=True)
                            rng.setstate(draws[0])
                            gen.set_state(draws[1])
                            loss = self.batch_loss(patched, batch, rng, gen, device, autocast_dtype)
                            scaler.scale(loss / cfg.grad_accum).backward()
                        backward_done = True
                        step_loss += loss.item() / cfg.grad_accum
                    if cfg.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    updating = True
                    scaler.step(optimizer)
                    updating = False
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(step_loss)
                    loop["step"] = step
                    if cfg.validation_every and self.dataset.validation and (
                            step % cfg.validation_every == 0 or step == cfg.steps):
                        validation.append((step, held_out_loss(self, patched, device)))
                    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                        self.save_checkpoint(step)
                        self.save_state(*state)
                    if self.on_step is not None:
                        preview = None
                        if cfg.sample_every and cfg.sample_prompts and (step % cfg.sample_every == 0 or step == cfg.steps):
                            preview = self.sample(patched, step)
                            self.after_preview(patched, patchers)
                        elapsed = time.monotonic() - start
                        self.on_step({"step": step, "total": cfg.steps, "loss": step_loss,
                                      "lr": scheduler.get_last_lr()[0],
                                      "validation": validation[-1][1] if validation else None,
                                      "elapsed": elapsed, "eta": elapsed / step * (cfg.steps - step),
                                      "memory_gb": round(self.plan.peak / memory.GB, 2) if self.plan else None,
                                      "preview": preview})
            self.save_state(*state)
        except mm.InterruptProcessingException:
            self.save_checkpoint(loop["step"], "interrupted")
            self.save_state(*state)
            raise
        except torch.OutOfMemoryError as error:
            if updating:  # the update stopped half-way: back to the adapter it started from
                with torch.no_grad():
                    torch._foreach_copy_(params, good)
            path = self.save_checkpoint(loop["step"], "last-good")
            raise TrainingError(f"out of device memory at step {loop['step'] + 1} ({self.plan.describe()}); the "
                                f"adapter of the last finished step is kept at {path}. To fit: {self.plan.hint()}"
                                ) from error
        return TrainResult(self.network, losses, [tuple(v) for v in validation], loop["step"],
                           time.monotonic() - start, self.checkpoints)

    def after_preview(self, patched, patchers) -> None:
        """Sampling loaded the VAE and, with free memory, more of the model: back to the planned device memory."""
        memory.release([self.vae.patcher])
        if self.streamed:
            memory.load(patched, patchers[1:], self.plan)

    def plan_memory(self, patched, blocks: BlockOptions, device, autocast_dtype) -> memory.MemoryPlan:
        """The run's device memory, from a simulated micro-batch; checkpointing is turned on when the weights must
        stream from RAM. Fails with what to change when even streaming every weight would not fit."""
        cfg = self.config
        budget = memory.device_budget(device, cfg.vram_budget_gb)
        # fp32 parameters, the last-good copy and the optimizer's state; gradients are in the simulation.
        adapter = self.network.num_params() * 4 * (2 + STATE_FLOATS[cfg.optimizer])
        encoders = self.train_clip.patcher.model_size() if self.train_clip is not None else 0

        def plan() -> memory.MemoryPlan:
            activations, flops = self.simulate_step(patched, blocks, device, autocast_dtype)
            return memory.MemoryPlan(patched.model_size(), adapter + encoders, activations, budget,
                                     blocks.checkpointing, flops)

        result = plan()
        if budget is not None and result.total > budget and not blocks.checkpointing:
            blocks.checkpointing = True
            result = plan()
        logging.info("Train LoRA: %s", result.describe())
        if not result.fits:
            raise TrainingError(f"this run does not fit the device: {result.describe()}. To fit: {result.hint()}")
        return result

    def simulate_step(self, patched, blocks: BlockOptions, device, autocast_dtype) -> tuple[int, int]:
        """Peak device bytes and FLOPs of one micro-batch of the largest bucket (forward and backward), counted
        on storage-less tensors; (0, 0) when the model does something the simulation cannot follow."""
        items = self.dataset.items
        largest = max(range(len(items)), key=lambda i: items[i].bucket[0] * items[i].bucket[1])
        patchers = [patched] + ([self.train_clip.patcher] if self.train_clip is not None else [])
        # The model's sampling schedule stays real: timesteps are drawn from its values.
        modules = [patched.model.diffusion_model, self.network] + [p.model for p in patchers[1:]]

        # Drawn and prepared on the CPU: the simulation puts every tensor on `device` itself.
        x0, noise, sigma, captions, geometries, weights = self.draw_batch(
            patched, [largest] * self.config.batch_size, random.Random(0), torch.Generator().manual_seed(0), "cpu")
        if self.train_clip is None:  # host code that reads values (attention masks) runs on real tensors
            inputs = self.model_call(patched, x0, noise, sigma, self.conditioning(captions, "cpu"), geometries)

            def step(x, inputs, x0, sigma, weights):
                self.prediction_loss(patched, x, x0, sigma, inputs, weights, autocast_dtype).backward()

            args = (*inputs, x0, sigma, weights)
        else:
            def step(x0, noise, sigma, weights):
                self.loss(patched, x0, noise, sigma, self.conditioning(captions, device), geometries, weights,
                          autocast_dtype).backward()

            args = (x0, noise, sigma, weights)

        self.network.eval()  # no dropout draws: training's random choices stay as they are
        in_place = InPlaceAsNew if blocks.out_of_place else contextlib.nullcontext
        try:
            with memory.adapters_in_place(patchers), self.encoders_left_alone():
                try:
                    with in_place():
                        return memory.simulate(modules, device, step, *args)
                except RuntimeError as error:
                    if INPLACE_ERROR not in str(error) or blocks.out_of_place:
                        raise
                    logging.info("Train LoRA: %s adds residuals in place; training sums them out of place",
                                 type(patched.model.diffusion_model).__name__)
                    blocks.out_of_place = True
                    with InPlaceAsNew():
                        return memory.simulate(modules, device, step, *args)
        except Exception as error:  # the plan is advice: a model the simulation cannot run still trains
            logging.warning("Train LoRA: no memory estimate (a simulated step failed: %s)", error)
            return 0, 0
        finally:
            self.network.train()

    @contextlib.contextmanager
    def encoders_left_alone(self):
        """The trained text encoders do not ask the host to load them: in a simulated step their weights are fakes."""
        if self.train_clip is None:
            yield
            return
        self.train_clip.load_model = lambda: self.train_clip.patcher
        try:
            yield
        finally:
            del self.train_clip.load_model

    def check_model(self) -> None:
        """Build the model's inputs once, before anything is encoded: this fails with a message if the model
        needs inputs training cannot give it, and finds the guidance it trains with."""
        latent_format = self.model.get_model_object("latent_format")
        frames = [1] if getattr(latent_format, "latent_dimensions", 2) == 3 else []
        noise = torch.zeros(1, latent_format.latent_channels, *frames, 8, 8)
        self.guidance = training_guidance(self.model.model, self.encode_text(""), noise, self.config.guidance)

    def sample(self, patched, step: int):
        """A preview grid (one image per sample prompt) from the model with the adapter as it is now.

        Exactly what KSampler (euler, normal, seed + i) on an empty latent of the first bucket's size,
        with CLIPTextEncode prompts and an empty negative, then VAEDecode would give.
        """
        import comfy.sample
        from PIL import Image

        cfg = self.config
        width, height = self.dataset.items[0].bucket
        empty = torch.zeros((1, *self.latents[(0, False)].shape))
        self.network.eval()
        images = []
        try:
            with torch.no_grad():
                negative = self.conditioning([""], "cpu")[0]
                for i, prompt in enumerate(cfg.sample_prompts):
                    positive = self.conditioning([prompt], "cpu")[0]
                    latent = comfy.sample.fix_empty_latent_channels(patched, empty)
                    noise = comfy.sample.prepare_noise(latent, cfg.seed + i)
                    out = comfy.sample.sample(patched, noise, cfg.sample_steps, cfg.sample_cfg, "euler", "normal",
                                              positive, negative, latent, seed=cfg.seed + i, disable_pbar=True)
                    pixels = self.vae.decode(out)  # sample() already returns latents in the VAE's space
                    pixels = pixels.reshape(-1, *pixels.shape[-3:])[0].clamp(0, 1)
                    images.append(Image.fromarray((pixels.float().cpu().numpy() * 255).round().astype("uint8")))
        finally:
            self.network.train()
        grid = Image.new("RGB", (width * len(images), height))
        for i, img in enumerate(images):
            grid.paste(img, (i * width, 0))
        return grid

    def conditioning(self, captions: list[str], device) -> list[list]:
        """Host conditioning per caption; through the text-encoder adapters (uncached) while they train."""
        if self.train_clip is not None:
            return [to_device(encode_caption(self.train_clip, c), device) for c in captions]
        cache = not self.captions_change()
        return [to_device(self.encode_text(c, cache), device) for c in captions]

    def draw_batch(self, patched, batch: list[int], rng, gen, device) -> tuple:
        """One micro-batch's x0, noise, sigma, captions, geometries and loss weights, drawn from `rng` and `gen`."""
        cfg = self.config
        items = [self.dataset.items[i] for i in batch]
        flips = [cfg.flip and rng.random() < 0.5 for _ in batch]
        keys = list(zip(batch, flips, strict=True))
        x0 = torch.stack([self.latents[key] for key in keys]).to(device)
        captions = [process_caption(item.caption, self.caption_options(item), rng) for item in items]
        levels = objective.sample_noise_levels(len(batch), rng, cfg.timestep_sampling,
                                               cfg.min_timestep / 1000, cfg.max_timestep / 1000)
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((*x0.shape[:2], *[1] * (x0.dim() - 2)), generator=gen)
        weights = torch.tensor([item.loss_weight for item in items], device=device)
        geometries = [image_geometry(item, flip) for item, flip in zip(items, flips, strict=True)]
        return x0, noise.to(device), self.sigmas(patched, levels, x0), captions, geometries, weights

    def batch_loss(self, patched, batch: list[int], rng, gen, device, autocast_dtype) -> torch.Tensor:
        x0, noise, sigma, captions, geometries, weights = self.draw_batch(patched, batch, rng, gen, device)
        return self.loss(patched, x0, noise, sigma, self.conditioning(captions, device), geometries, weights,
                         autocast_dtype, min_snr=self.config.min_snr_gamma)

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
                                               self.config.huber_delta, sigma_data)
        if min_snr and self.kind != "flow":
            per_sample = per_sample * objective.min_snr_weight(self.kind, sigma, min_snr, sigma_data)
        return (per_sample * weights).mean()

    # --- files -------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, str]:
        cfg = self.config
        info = {
            **ss_metadata(cfg), **ss_metadata(cfg.captions),
            **(ss_metadata(self.network.config) if self.network.config is not None else {}),
            "ss_steps": str(step), "ss_num_train_images": str(len(self.dataset.items)),
            "lora_foundry_training": _json(asdict(cfg)),
        }
        return kohya_metadata(self.network.config, self.model.model.model_config, self.name, info,
                              self.dataset.tag_frequency())

    @property
    def state_path(self) -> Path | None:
        return Path(self.state_dir) / f"{self.name}-state.safetensors" if self.state_dir is not None else None

    def save_state(self, optimizer, scheduler, loop, rng, gen) -> None:
        """Write the full training state next to the checkpoints (to resume with `resume=state_path`)."""
        if self.state_path is not None:
            save_state(self.state_path, self.network, optimizer, scheduler, loop, rng, gen)

    def save_checkpoint(self, step: int, tag: str | None = None) -> Path | None:
        """Write the adapter as it is now into the output folder (atomic); None without a folder."""
        if self.output_dir is None:
            return None
        suffix = tag or f"step{step:06d}"
        path = Path(self.output_dir) / f"{self.name}-{suffix}.safetensors"
        write_safetensors(self.network.state_dict_kohya(), path, self.metadata(step))
        self.checkpoints.append(path)
        return path


def held_out_loss(trainer: Trainer, patched, device, levels=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 1234) -> float:
    """Mean native-space MSE over the validation images at fixed noise levels and noise seeds."""
    items = trainer.dataset.validation
    if not items:
        return math.nan
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    training = trainer.network.training
    trainer.network.eval()  # the whole adapter: no dropout, DyLoRA at full rank
    with torch.no_grad():
        for index, item in enumerate(items):
            key = (-1 - index, False)
            x0 = trainer.latents[key][None].to(device)
            conditioning = trainer.conditioning([trainer.fixed_caption(item)], device)
            for level in levels:
                noise = torch.randn(x0.shape, generator=gen).to(device)
                loss = trainer.loss(patched, x0, noise, trainer.sigmas(patched, [level], x0), conditioning,
                                    [image_geometry(item)], torch.ones(1, device=device), None)
                total += loss.item()
                count += 1
    trainer.network.train(training)
    return total / count


def image_geometry(item, flip: bool = False) -> ImageGeometry:
    """Original size, centre-crop corner and bucket of a dataset item (the crop mirrored with the image)."""
    bucket = tuple(item.bucket)
    resized = cover_size(tuple(item.size), bucket)
    top, left = (resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2
    if flip:
        left = resized[0] - bucket[0] - left
    return ImageGeometry(*item.size, top, left, *bucket)


def _json(value) -> str:
    import json

    return json.dumps(value, default=str)
