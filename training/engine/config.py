"""Train LoRA's training settings, declared once (lora_core.settings), and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...lora_core.network import ATTACH_MODES, LoraNetwork
from ...lora_core.settings import check_choices, setting
from ..data.captions import CaptionOptions
from .conditioning import TRAINING_GUIDANCE
from .objective import LOSSES, TIMESTEP_SAMPLING, TIMESTEP_SHIFTS
from .optim import OPTIMIZERS, SCHEDULERS, parse_optimizer_args
from .quantize import QUANTIZATIONS

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_CACHES = ("memory", "disk")
EMA_OUTPUTS = ("beside", "instead")
# Wan 2.2 A14B's two experts: the high-noise one denoises above the boundary, the low-noise one below it.
EXPERTS = ("all", "high_noise", "low_noise")
PRIOR_TARGETS = ("image", "base")
WAN22_BOUNDARIES = {"text-to-video": 0.875, "image-to-video": 0.9}  # the sigma where Wan 2.2's experts switch


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what)."""


@dataclass
class TrainConfig:
    """How a run trains: every setting declared once (lora_core.settings), node inputs and metadata derived."""

    steps: int = setting(300, "Optimizer steps.", min=1, max=1_000_000, kohya="max_train_steps",
                         ss=("ss_max_train_steps",))
    epochs: int = setting(0, "Train this many epochs instead (every image times its repeats once per epoch): the "
                          "steps follow from the dataset, batch and accumulation; 0 = steps decide.", min=0,
                          max=100_000, kohya="max_train_epochs")
    batch_size: int = setting(1, "Images per micro-batch.", min=1, max=256, kohya="train_batch_size",
                              ss=("ss_batch_size_per_device",))
    learning_rate: float = setting(1e-4, "The adapters' learning rate (UNet / DiT).", min=0.0, max=10.0, step=1e-5,
                                   kohya="learning_rate", ss=("ss_learning_rate", "ss_unet_lr"))
    text_encoder_lr: float | None = setting(None, "0 = the UNet's learning rate.", min=0.0, max=10.0, step=1e-5,
                                            zero_is_none=True, kohya="text_encoder_lr")
    optimizer: str = setting("AdamW", "AdamW8bit keeps its state in 8 bits; Prodigy finds its own step size "
                             "(learning rate about 1.0).", choices=OPTIMIZERS, kohya="optimizer_type",
                             ss=("ss_optimizer",))
    optimizer_args: list[str] = setting([], "Optimizer options, key=value (kohya's optimizer_args), e.g. "
                                        "betas=0.9,0.99 or decouple=True d_coef=2 for Prodigy.", multiline=True,
                                        kohya="optimizer_args")
    weight_decay: float = setting(0.01, "Decoupled weight decay.", min=0.0, max=1.0, step=0.001)
    scheduler: str = setting("constant", "Learning-rate schedule after the warm-up.", choices=SCHEDULERS,
                             kohya="lr_scheduler", ss=("ss_lr_scheduler",))
    warmup_steps: int = setting(0, "Steps of linear learning-rate warm-up.", min=0, max=100_000,
                                kohya="lr_warmup_steps", ss=("ss_lr_warmup_steps",))
    block_lrs: str = setting("", "Learning-rate multiplier per block, in block-weight notation (as Apply LoRA's "
                             "block_weights: short or long vector, BASE = text encoders) or a UNet's every-block "
                             "vector without BASE (kohya's block_dims form). Empty = 1 everywhere.")
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
    debiased_estimation: bool = setting(False, "eps / v-prediction models: weight each sample's loss by 1 / sqrt(SNR) "
                                        "(v: 1 / (SNR + 1)), so the high noise levels that set layout and colour "
                                        "count more (kohya's debiased_estimation_loss); flow models train without it.",
                                        kohya="debiased_estimation_loss", ss=("ss_debiased_estimation",))
    noise_offset: float = setting(0.0, "Per-channel noise offset.", min=0.0, max=1.0, step=0.01,
                                  kohya="noise_offset", ss=("ss_noise_offset",))
    timestep_sampling: str = setting("auto", "How noise levels are drawn: uniform, logit_normal, or auto = the "
                                     "family's (logit_normal for flow models, uniform for eps / v).",
                                     choices=TIMESTEP_SAMPLING, kohya="timestep_sampling")
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
    mask_floor: float = setting(0.0, "Masked loss (a dataset with masks): the loss weight where a mask is black "
                                "(0 = that area teaches nothing).", min=0.0, max=1.0, step=0.01)
    save_every: int = setting(0, "Save <name>-stepNNNNNN every N steps and at the last (for resume and post-hoc "
                              "EMA); 0 = none.", min=0, max=1_000_000, kohya="save_every_n_steps")
    latent_cache: str = setting("memory", "disk: also keep the latents in a hidden .lora_foundry_cache folder next "
                                "to the images, and the text encoders' outputs of fixed captions in the dataset's, "
                                "so the next run skips the VAE and the text encoders.", input="cache_latents",
                                choices=LATENT_CACHES)
    validation_every: int = setting(0, "Held-out loss every N steps (0 = never).", min=0, max=1_000_000,
                                    kohya="validate_every_n_steps")
    keep_best: bool = setting(False, "Save the adapter with the lowest held-out loss so far as <name>-best "
                              "(needs validation_every and a validation_split).")
    patience: int = setting(0, "Stop when the held-out loss has not improved for this many validations (0 = never).",
                            min=0, max=10_000)
    ema_decay: float = setting(0.0, "Also keep an exponential moving average of the adapter (e.g. 0.99 for short "
                               "runs, 0.999 for long ones; 0 = off).", min=0.0, max=0.99999, step=0.0001)
    ema_every: int = setting(1, "Update the average every N steps.", min=1, max=10_000)
    ema_warmup: bool = setting(True, "The average's decay rises as (1 + n) / (10 + n) over its first updates.")
    ema_output: str = setting("beside", "beside: the average is saved as <name>-ema next to the adapter; instead: "
                              "the node's adapter is the average.", choices=EMA_OUTPUTS)
    sample_every: int = setting(0, "Sample the prompts at step 0, every N steps and at the end: PNGs in "
                                "output/lora_foundry_runs/<name>/samples/ and a preview on the node (0 = never).",
                                min=0, max=1_000_000, kohya="sample_every_n_steps")
    sample_prompts: list[str] = setting([], "One prompt per line, kohya's options after it: --n negative --w width "
                                        "--h height --s steps --l CFG --d seed (unset: the settings below, the first "
                                        "bucket's size, seed + the prompt's index, no negative). # starts a comment.",
                                        multiline=True)
    sample_steps: int = setting(12, "Sampler steps of a preview.", min=1, max=200)
    sample_cfg: float = setting(3.0, "CFG of a preview.", min=0.0, max=30.0, step=0.1)
    attach: str = setting("bypass", "bypass: each adapter adds its output in the layer's forward, the base weight "
                          "untouched (fp8 and streamed bases); weights: the layer computes with W + dW (can be "
                          "faster for LoHa / LoKr when the model fits).", choices=ATTACH_MODES)
    base_quantization: str = setting("none", "nf4: the diffusion model's Linear weights held in 4 bits (NF4, "
                                     "bitsandbytes; QLoRA, OneTrainer's NF4) on the device while the run trains, "
                                     "computed in the precision above, for cards where even fp8 does not fit; the "
                                     "model itself is untouched. Needs attach = bypass.", choices=QUANTIZATIONS)
    vram_budget_gb: float = setting(0.0, "Device memory the run may use; 0 = the free memory. Weights that do not "
                                    "fit stay in RAM and stream in at each use (blocks are then checkpointed). The "
                                    "estimate is logged before step 1.", min=0.0, max=1024.0, step=0.5)
    offload_activations: bool = setting(False, "Keep what the backward pass needs in RAM (with gradient "
                                        "checkpointing: only the blocks' inputs).")
    compile_blocks: bool = setting(False, "torch.compile each diffusion block (the first steps compile, later ones "
                                   "run faster on a GPU; blocks that add in place, Flux / Chroma, stay eager).")
    expert: str = setting("all", "Mixture-of-experts models (Wan 2.2 A14B): train the model given as the high_noise "
                          "expert (noise levels above expert_boundary) or the low_noise one (below it); the file "
                          "name gets _high_noise / _low_noise. all = every noise level.", choices=EXPERTS)
    expert_boundary: float = setting(0.0, "The noise level (sigma, 0-1) where the experts switch; 0 = Wan 2.2's: "
                                     "0.875 for text-to-video, 0.9 for image-to-video models.", min=0.0, max=0.99,
                                     step=0.005)
    preservation_class: str = setting("", "Output preservation without regularisation images (ai-toolkit's "
                                      "differential output preservation): each batch is also shown with the trigger "
                                      "word said as this class (e.g. woman), and the adapter learns to give the base "
                                      "model's own prediction there, so the class keeps looking as before. One class "
                                      "per line: each sample of a batch is said as one of them, drawn at random "
                                      "(woman / man, or whole prompts when the captions are the trigger alone). Needs "
                                      "trigger_word. Empty = off.", multiline=True)
    preservation_weight: float = setting(1.0, "How much output preservation counts beside the training loss (each "
                                         "step then costs about twice the compute).", min=0.0, max=10.0, step=0.05)
    blank_preservation_weight: float = setting(0.0, "Blank prompt preservation (ai-toolkit's): each batch is also "
                                               "shown with the empty prompt, and the adapter learns to give the base "
                                               "model's own prediction there, so what the model draws unprompted (the "
                                               "negative side of classifier-free guidance) stays as before. How much it "
                                               "counts beside the training loss; each step costs one more pass. "
                                               "0 = off.", min=0.0, max=10.0, step=0.05)
    prior_target: str = setting("image", "What the regularisation (prior) images teach: image = the image itself "
                                "(kohya's prior preservation); base = the base model's own prediction for it, so they "
                                "only keep their prompts as the base draws them and add no noise of their own to the "
                                "steps (ai-toolkit's; one more forward pass without gradient per step).",
                                choices=PRIOR_TARGETS)
    slider_positive: str = setting("", "Concept slider (the Concept Sliders method, ai-toolkit's slider): what "
                                   "+1 strength moves toward, e.g. old. Each caption is also said with slider_target "
                                   "as this (or with this added where the caption lacks slider_target), and the "
                                   "adapter learns the base model's prediction for the caption moved by "
                                   "slider_guidance x (positive - negative) at +1, and the other way at -1, instead "
                                   "of the images themselves. Set slider_negative too. Empty = off.")
    slider_negative: str = setting("", "Concept slider: what -1 strength moves toward, e.g. young.")
    slider_target: str = setting("", "Concept slider: the word in the captions that the two sides replace (e.g. "
                                 "person: 'a person outdoors' becomes 'an old person outdoors'); empty = the two "
                                 "sides are added to each caption.")
    slider_anchor: str = setting("", "Concept slider: a prompt the slider must leave as the base draws it at either "
                                 "strength (e.g. a cat, for a slider about people). Empty = none.")
    slider_guidance: float = setting(1.0, "Concept slider: how far +1 moves, in multiples of the base model's "
                                     "difference between the two sides (ai-toolkit's guidance_strength, its default "
                                     "3).", min=0.0, max=20.0, step=0.05)
    captions: CaptionOptions = field(default_factory=CaptionOptions)

    @property
    def slider(self) -> bool:
        """Whether this run trains a concept slider instead of learning the images."""
        return bool(self.slider_positive or self.slider_negative)

    @property
    def preservation_classes(self) -> list[str]:
        """Output preservation's classes: preservation_class's lines, blank ones left out."""
        return [line.strip() for line in self.preservation_class.splitlines() if line.strip()]

    def __post_init__(self):
        check_choices(self)
        own = sorted(set(parse_optimizer_args(self.optimizer_args)) & {"lr", "weight_decay", "params"})
        if own:
            raise ValueError(f"optimizer_args: {', '.join(own)} are settings of their own (learning_rate, "
                             "weight_decay); set them there")
        if self.steps < 1:
            raise ValueError(f"steps: must be at least 1, got {self.steps}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError("min_timestep / max_timestep: need 0 <= min < max <= 1000")
        if self.patience and not self.validation_every:
            raise ValueError("patience: early stopping watches the held-out loss; set validation_every too")
        if self.keep_best and not self.validation_every:
            raise ValueError("keep_best: the best adapter is judged by the held-out loss; set validation_every too")
        self.preservation_class = "\n".join(self.preservation_classes)
        if self.preservation_class and not self.captions.trigger_word:
            raise ValueError("preservation_class: preservation says the trigger word as the class, and no trigger_word "
                             "is set; set trigger_word (the word your captions name the subject by)")
        for name in ("slider_positive", "slider_negative", "slider_target", "slider_anchor"):
            setattr(self, name, getattr(self, name).strip())
        if self.slider and not (self.slider_positive and self.slider_negative):
            raise ValueError("slider_positive / slider_negative: a slider moves between two sides; set both (e.g. old "
                             "and young)")
        if self.slider and self.slider_positive == self.slider_negative:
            raise ValueError(f"slider_positive / slider_negative: both are {self.slider_positive!r}; the slider "
                             "learns their difference, so they must differ")
        if self.slider_anchor and not self.slider:
            raise ValueError("slider_anchor: only a concept slider has an anchor; set slider_positive and "
                             "slider_negative too")
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
