"""Train LoRA: train an adapter on the loaded MODEL with a dataset, inside the graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..lora_core.apply import apply_lora
from ..lora_core.files import path_inside
from ..lora_core.network import ATTACH_MODES, LoraNetwork, NetworkConfig
from ..lora_core.targets import PRESETS
from ..training.captions import CaptionOptions
from ..training.conditioning import TRAINING_GUIDANCE
from ..training.objective import LOSSES, TIMESTEP_SAMPLING, TIMESTEP_SHIFTS
from ..training.optim import OPTIMIZERS, SCHEDULERS
from ..training.plots import loss_graph
from ..training.trainer import LATENT_CACHES, PRECISIONS, TrainConfig, Trainer
from .live import TRAINING_LOG

CATEGORY = "Lora Foundry"
ALGORITHMS = ("lora", "locon", "loha", "lokr", "dylora")


def pil_to_image(img) -> torch.Tensor:
    """A Pillow image as a ComfyUI IMAGE batch [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def progress_reporter(node_id: str | None, total: int):
    """Advance ComfyUI's progress bar and send our live-training event for each step."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    node = str(node_id)
    TRAINING_LOG.start(node, total)

    def report(info: dict) -> None:
        preview = info.pop("preview", None)
        bar.update_absolute(info["step"], total, ("PNG", preview, None) if preview is not None else None)
        event = TRAINING_LOG.record(node, info, preview)  # kept for a page reloaded mid-run
        try:
            from server import PromptServer

            PromptServer.instance.send_sync("lora_foundry.train", {"node": node_id, **event})
        except (ImportError, AttributeError):
            pass  # headless use without a server

    return report


@dataclass
class RunFolders:
    loras: Path  # the run's adapters: final and intermediate LoRAs, listed by every LoRA loader
    states: Path  # the resume state: not a LoRA, so never inside a loras folder
    resume: Path | None  # the state to continue, or None for a new run

    @property
    def name(self) -> str:
        return self.loras.name


STATES_FOLDER = "lora_foundry_runs"


def run_folders(loras: str, output: str, output_name: str, resume: bool) -> RunFolders:
    """Where a run writes; a new run gets fresh folders, never used ones, and `resume` needs a saved state."""
    n = 1
    while True:
        name = output_name if n == 1 else f"{output_name}_{n}"
        folders = RunFolders(path_inside(loras, name), path_inside(output, f"{STATES_FOLDER}/{name}"), None)
        state = folders.states / f"{folders.name}-state.safetensors"
        if resume:
            earlier = folders.loras / state.name  # where earlier versions of the pack kept it
            if not state.is_file() and not earlier.is_file():
                raise ValueError(f"resume: no saved state at {state}; train once with this output_name first")
            folders.resume = state if state.is_file() else earlier
            return folders
        if not any(f.exists() and any(f.iterdir()) for f in (folders.loras, folders.states)):
            return folders
        n += 1


class TrainLoRA:
    DESCRIPTION = "Train a LoRA / LoCon / LoHa / LoKr / DyLoRA (optionally DoRA) adapter on MODEL with a dataset."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA", "MODEL", "LORA_LOSS", "IMAGE", "STRING", "CLIP")
    RETURN_NAMES = ("lora", "model", "loss", "loss_graph", "summary", "clip")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP", {"tooltip": "Encodes the captions (frozen)."}),
                "vae": ("VAE", {"tooltip": "Encodes the images (latents are cached once)."}),
                "dataset": ("LORA_DATASET",),
                "trigger_word": ("STRING", {"default": "", "tooltip": "Put in front of every caption."}),
                "output_name": ("STRING", {"default": "my_lora"}),
                "algorithm": (ALGORITHMS, {"default": "lora"}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 1024}),
                "alpha": ("FLOAT", {"default": 16.0, "min": 0.0, "max": 1024.0, "step": 0.5}),
                "targets": (PRESETS, {"default": "kohya"}),
                "dora": ("BOOLEAN", {"default": False}),
                "steps": ("INT", {"default": 300, "min": 1, "max": 1_000_000}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 10.0, "step": 1e-5, "round": False}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256}),
                "optimizer": (OPTIMIZERS, {"default": "AdamW"}),
                "scheduler": (SCHEDULERS, {"default": "constant"}),
                "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100_000}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "precision": (tuple(PRECISIONS), {"default": "fp32"}),
            },
            "optional": {
                "gradient_checkpointing": ("BOOLEAN", {"default": False}),
                "grad_accum": ("INT", {"default": 1, "min": 1, "max": 1024}),
                "grad_clip": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "lora_plus_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 64.0, "step": 1.0}),
                "loss": (LOSSES, {"default": "mse"}),
                "min_snr_gamma": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.5,
                                          "tooltip": "eps / v-prediction models; flow models train without it."}),
                "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "timestep_sampling": (TIMESTEP_SAMPLING, {"default": "uniform"}),
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "kxk convolutions; 0 = rank."}),
                "shuffle_tags": ("BOOLEAN", {"default": False}),
                "keep_tokens": ("INT", {"default": 1, "min": 0, "max": 64}),
                "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "flip": ("BOOLEAN", {"default": False}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": "0 = only at the end."}),
                "validation_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000}),
                "sample_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                         "tooltip": "A preview on the node every N steps (0 = never)."}),
                "sample_prompts": ("STRING", {"default": "", "multiline": True, "tooltip": "One prompt per line."}),
                "train_text_encoder": ("BOOLEAN", {"default": False}),
                "text_encoder_lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 1e-5, "round": False,
                                              "tooltip": "0 = the UNet's learning rate."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the saved state of output_name "
                                       "(same settings, more steps); otherwise a new run never overwrites one."}),
                "cache_latents": (LATENT_CACHES, {"default": "memory", "tooltip": "disk: also keep the latents in a "
                                  "hidden .lora_foundry_cache folder next to the images, so the next run skips the VAE."}),
                "use_tucker": ("BOOLEAN", {"default": False, "tooltip": "LoCon / LoHa: a Tucker core for kxk "
                               "convolutions (LyCORIS use_tucker)."}),
                "timestep_shift": (TIMESTEP_SHIFTS, {"default": "model", "tooltip": "Flow models (SD3, Flux, Qwen, "
                                   "Wan, ...): model = the model's own shift, as it samples; none; fixed = the shift "
                                   "below; resolution = kohya's flux_shift."}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 100.0, "step": 0.05,
                                    "tooltip": "The shift for timestep_shift = fixed."}),
                "guidance": ("FLOAT", {"default": TRAINING_GUIDANCE, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Distilled guidance while training (Flux.1-dev, HunyuanVideo); "
                                       "other models ignore it. kohya and ai-toolkit train Flux-dev at 1.0."}),
                "attach": (ATTACH_MODES, {"default": "bypass", "tooltip": "bypass: each adapter adds its output in "
                           "the layer's forward, the base weight untouched (fp8 and streamed bases); weights: the "
                           "layer computes with W + dW (can be faster for LoHa / LoKr when the model fits)."}),
                "network_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "kohya's network_dropout: dropout on the adapters' "
                                              "activations (attach = bypass)."}),
                "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                             "tooltip": "Device memory the run may use; 0 = the free memory. Weights "
                                             "that do not fit stay in RAM and stream in at each use (blocks are "
                                             "then checkpointed). The estimate is logged before step 1."}),
                "offload_activations": ("BOOLEAN", {"default": False, "tooltip": "Keep what the backward pass needs "
                                        "in RAM (with gradient checkpointing: only the blocks' inputs)."}),
                "compile_blocks": ("BOOLEAN", {"default": False, "tooltip": "torch.compile each diffusion block "
                                   "(the first steps compile, later ones run faster on a GPU; blocks that add in "
                                   "place, Flux / Chroma, stay eager)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, dataset, trigger_word, output_name, algorithm, rank, alpha, targets, dora,
              steps, learning_rate, batch_size, optimizer, scheduler, warmup_steps, seed, precision,
              gradient_checkpointing=False, grad_accum=1, grad_clip=1.0, lora_plus_ratio=0.0, loss="mse",
              min_snr_gamma=5.0, noise_offset=0.0, timestep_sampling="uniform", conv_rank=0, shuffle_tags=False,
              keep_tokens=1, caption_dropout=0.0, flip=False, save_every=0, validation_every=0, sample_every=0, sample_prompts="",
              train_text_encoder=False,
              text_encoder_lr=0.0, resume=False, cache_latents="memory", use_tucker=False,
              timestep_shift="model", shift=3.0, guidance=TRAINING_GUIDANCE, attach="bypass", network_dropout=0.0,
              vram_budget_gb=0.0, offload_activations=False, compile_blocks=False, unique_id=None):
        import folder_paths

        network_config = NetworkConfig(algorithm=algorithm, rank=rank, alpha=alpha, preset=targets, dora=dora,
                                       conv_rank=conv_rank or None, text_encoder=train_text_encoder, seed=seed,
                                       use_tucker=use_tucker, network_dropout=network_dropout)
        captions = CaptionOptions(trigger_word=trigger_word.strip(), shuffle_tags=shuffle_tags,
                                  keep_tokens=keep_tokens, caption_dropout=caption_dropout)
        config = TrainConfig(
            steps=steps, batch_size=batch_size, learning_rate=learning_rate, text_encoder_lr=text_encoder_lr or None,
            optimizer=optimizer, scheduler=scheduler,
            warmup_steps=warmup_steps, lora_plus_ratio=lora_plus_ratio, grad_clip=grad_clip, grad_accum=grad_accum,
            seed=seed, precision=precision, gradient_checkpointing=gradient_checkpointing, loss=loss,
            min_snr_gamma=min_snr_gamma, noise_offset=noise_offset, timestep_sampling=timestep_sampling,
            timestep_shift=timestep_shift, shift=shift, guidance=guidance, attach=attach,
            vram_budget_gb=vram_budget_gb, offload_activations=offload_activations, compile_blocks=compile_blocks,
            flip=flip, save_every=save_every, latent_cache=cache_latents, validation_every=validation_every, captions=captions,
            sample_every=sample_every, sample_prompts=[p.strip() for p in sample_prompts.splitlines() if p.strip()],
        )
        folders = run_folders(folder_paths.get_folder_paths("loras")[0], folder_paths.get_output_directory(),
                              output_name, resume)
        with torch.inference_mode(False):
            network = LoraNetwork.create(network_config, model, clip)
            trainer = Trainer(model, clip, vae, dataset, network, config, output_dir=folders.loras,
                              name=folders.name, on_step=progress_reporter(unique_id, steps), resume=folders.resume,
                              state_dir=folders.states)
            result = trainer.run()
        network.metadata = trainer.metadata(result.steps)
        trained_model, trained_clip, _ = apply_lora(model, clip, network.state_dict_kohya(), 1.0, 1.0)
        history = {"loss": result.losses, "validation": result.validation}
        first, last = _mean(result.losses[:10]), _mean(result.losses[-10:])
        summary = (f"{algorithm} rank {rank} on {len(network.adapters)} layers ({network.num_params():,} parameters); "
                   f"{result.steps} steps in {result.seconds:.1f}s; loss {first:.4f} -> {last:.4f}")
        if trainer.plan is not None:
            summary += f"; {trainer.plan.describe()}"
        if result.validation:
            summary += f"; validation {result.validation[0][1]:.4f} -> {result.validation[-1][1]:.4f}"
        graph = pil_to_image(loss_graph(result.losses, result.validation))
        ui = {"text": [summary], "loss": result.losses, "validation": [list(v) for v in result.validation]}
        return {"ui": ui, "result": (network, trained_model, history, graph, summary, trained_clip)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


NODE_CLASS_MAPPINGS = {"LoraFoundryTrainLoRA": TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraFoundryTrainLoRA": "Train LoRA"}
