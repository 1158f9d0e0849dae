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
from .optim import STATE_FLOATS, build_optimizer, build_scheduler, lora_plus_groups
from .state import load_state, save_state

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_CACHES = ("memory", "disk")


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what)."""


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 1
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # None: the UNet's learning rate
    optimizer: str = "AdamW"
    weight_decay: float = 0.01
    scheduler: str = "constant"
    warmup_steps: int = 0
    lora_plus_ratio: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    loss: str = "mse"
    huber_delta: float = 1.0
    min_snr_gamma: float = 5.0  # eps / v models only: kohya applies none to flow matching
    noise_offset: float = 0.0
    timestep_sampling: str = "uniform"
    timestep_shift: str = "model"  # flow models: model | none | fixed | resolution (objective.sigmas_for)
    shift: float = 3.0  # the shift for timestep_shift "fixed"
    guidance: float = TRAINING_GUIDANCE  # fed to guidance-distilled models (Flux.1-dev, HunyuanVideo) only
    min_timestep: int = 0
    max_timestep: int = 1000
    flip: bool = False
    save_every: int = 0
    latent_cache: str = "memory"  # "disk": also keep latents next to the images for the next run
    validation_every: int = 0
    sample_every: int = 0  # a preview image every N steps (0: never)
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 12
    sample_cfg: float = 3.0
    attach: str = "bypass"  # bypass: adapters add their output in each layer's forward; weights: W + dW
    vram_budget_gb: float = 0.0  # device memory the run may use; 0: the device's free memory
    offload_activations: bool = False  # what autograd keeps for the backward pass waits in RAM
    compile_blocks: bool = False  # torch.compile each block (the first steps compile; pays on long GPU runs)
    captions: CaptionOptions = field(default_factory=CaptionOptions)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps: must be at least 1, got {self.steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.latent_cache not in LATENT_CACHES:
            raise ValueError(f"latent_cache: {self.latent_cache!r} is not one of {', '.join(LATENT_CACHES)}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError("min_timestep / max_timestep: need 0 <= min < max <= 1000")
        if self.attach not in ATTACH_MODES:
            raise ValueError(f"attach: {self.attach!r} is not one of {', '.join(ATTACH_MODES)}")
        if self.vram_budget_gb < 0:
            raise ValueError(f"vram_budget_gb: must be 0 (auto) or more, got {self.vram_budget_gb}")
        if self.timestep_shift not in objective.TIMESTEP_SHIFTS:
            raise ValueError(f"timestep_shift: {self.timestep_shift!r} is not one of "
                             f"{', '.join(objective.TIMESTEP_SHIFTS)}")


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
        for setting, unused in (("timestep_shift", config.timestep_shift != "model" and self.kind != "flow"),
                                ("min_snr_gamma", config.min_snr_gamma and self.kind == "flow")):
            if unused:
                logging.info("Train LoRA: %s does not apply to %s models; ignored", setting, self.kind)
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.text: dict[str, list] = {}  # host conditioning of captions that never change
        self.checkpoints: list[Path] = []
        self.train_clip = None  # the CLIP clone carrying text-encoder adapters, while training them
        self.compute_dtype: torch.dtype | None = None  # what the model computes in, once training runs
        self._disk_cache: LatentCache | None = None
        self.guidance: float | None = None
        self.plan: memory.MemoryPlan | None = None  # device memory, estimated before step 1
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
        rng = random.Random(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        train_te = any(name.startswith("lora_te") for name in self.network.adapters)
        memory.release([self.vae.patcher] + ([self.clip.patcher] if not train_te and not self.captions_change() else []))
        patched, self.train_clip = self.network.attach(self.model, self.clip if train_te else None, mode=cfg.attach)
        patchers = [patched] + ([self.train_clip.patcher] if train_te else [])
        device = patched.load_device
        autocast_dtype = PRECISIONS[cfg.precision]
        blocks = BlockOptions(checkpointing=cfg.gradient_checkpointing, compiled=cfg.compile_blocks)
        groups = []
        for part, lr in (("unet", cfg.learning_rate), ("te", cfg.text_encoder_lr or cfg.learning_rate)):
            named = [(f"{n}.{p}", t) for n, a in self.network.adapters.items()
                     if n.startswith("lora_te") == (part == "te") for p, t in a.named_parameters()]
            if named:
                groups += lora_plus_groups(named, lr, cfg.lora_plus_ratio, cfg.weight_decay)
        diffusion_model = patched.model.diffusion_model
        trained_encoders = [encoder for name, encoder in text_encoders(self.train_clip.cond_stage_model).items()
                            if is_trainable_text_encoder(name)] if self.train_clip is not None else []
        try:
            with torch.inference_mode(False), torch.enable_grad(), training_blocks(diffusion_model, blocks), \
                    text_encoder_layers(trained_encoders):
                self.plan = self.plan_memory(patched, blocks, device, autocast_dtype)
                streamed = memory.load(patched, patchers[1:], self.plan.resident_weights
                                       if self.plan.budget is not None else None)
                if streamed and not blocks.checkpointing:
                    blocks.checkpointing = True  # streamed weights must not stay on the device until backward
                    logging.info("Train LoRA: weights stream from RAM, so every block is checkpointed")
                for patcher in patchers:
                    normal_tensors_(patcher.model, device)
                self.network.to(device)
                self.network.train()
                return self.train_loop(patched, blocks, groups, device, autocast_dtype, start, rng, gen)
        finally:
            memory.release(patchers)  # the host undoes the clones' patches; the next user loads the model afresh
            self.network.eval()
            self.network.requires_grad_(False)
            self.network.to("cpu")
            self.train_clip = None

    def train_loop(self, patched, blocks, groups, device, autocast_dtype, start, rng, gen) -> TrainResult:
        """Steps from the resumed state (or 0) to the last, on the loaded model."""
        import comfy.model_management as mm

        cfg = self.config
        optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay)
        scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.steps, cfg.warmup_steps)
        params = [p for g in groups for p in g["params"]]
        good = [p.detach().clone() for p in params]  # the adapter that last gave a finite loss
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
                            path = self.save_checkpoint(step - 1, "last-good")  # the adapter steps 1..step-1 made
                            raise TrainingError(
                                f"loss became {loss.item()} at step {step}; training stopped. The last adapter "
                                f"that gave a finite loss is kept at {path}. Lower the learning rate or use fp32/bf16.")
                        with torch.no_grad():
                            torch._foreach_copy_(good, params)
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
                    scaler.step(optimizer)
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
            with torch.no_grad():
                torch._foreach_copy_(params, good)
            path = self.save_checkpoint(loop["step"], "last-good")
            raise TrainingError(f"out of device memory at step {loop['step'] + 1} ({self.plan.describe()}); the "
                                f"adapter of the last finished step is kept at {path}. To fit: {self.plan.hint()}"
                                ) from error
        return TrainResult(self.network, losses, [tuple(v) for v in validation], loop["step"],
                           time.monotonic() - start, self.checkpoints)

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
        try:
            with memory.adapters_in_place(patchers):
                try:
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
            "ss_steps": str(step), "ss_learning_rate": str(cfg.learning_rate), "ss_unet_lr": str(cfg.learning_rate),
            "ss_optimizer": cfg.optimizer, "ss_lr_scheduler": cfg.scheduler, "ss_lr_warmup_steps": str(cfg.warmup_steps),
            "ss_max_train_steps": str(cfg.steps), "ss_mixed_precision": cfg.precision,
            "ss_num_train_images": str(len(self.dataset.items)), "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum), "ss_max_grad_norm": str(cfg.grad_clip),
            "ss_min_snr_gamma": str(cfg.min_snr_gamma), "ss_noise_offset": str(cfg.noise_offset),
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing), "ss_seed": str(cfg.seed),
            "ss_caption_dropout_rate": str(cfg.captions.caption_dropout), "ss_keep_tokens": str(cfg.captions.keep_tokens),
            "ss_shuffle_caption": str(cfg.captions.shuffle_tags), "ss_flip_aug": str(cfg.flip),
            "ss_network_dropout": str(self.network.config.network_dropout if self.network.config else 0.0),
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
