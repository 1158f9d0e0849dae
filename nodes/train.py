"""Train LoRA: train an adapter on the loaded MODEL with a dataset, inside the graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

from ..lora_core.apply import apply_lora
from ..lora_core.files import path_inside
from ..lora_core.network import LoraNetwork, NetworkConfig
from ..lora_core.settings import from_inputs
from ..training.captions import CaptionOptions
from ..training.plots import loss_graph
from ..training.sample_prompts import check_sample_prompts
from ..training.trainer import TrainConfig, Trainer
from .inputs import CATEGORY, Lora, LoraDataset, LoraLoss, Node, setting_inputs
from .live import TRAINING_LOG

# Train LoRA's widgets in order (saved workflows store values by position): declared settings, and node_inputs().
REQUIRED_WIDGETS = ["trigger_word", "output_name", "algorithm", "rank", "alpha", "targets", "dora", "steps",
                    "learning_rate", "batch_size", "optimizer", "scheduler", "warmup_steps", "seed", "precision"]
OPTIONAL_WIDGETS = ["gradient_checkpointing", "grad_accum", "grad_clip", "lora_plus_ratio", "loss", "min_snr_gamma",
                    "noise_offset", "timestep_sampling", "conv_rank", "shuffle_tags", "keep_tokens",
                    "caption_dropout", "flip", "save_every", "validation_every", "sample_every", "sample_prompts",
                    "train_text_encoder", "text_encoder_lr", "resume", "cache_latents", "use_tucker",
                    "timestep_shift", "shift", "guidance", "attach", "network_dropout", "vram_budget_gb",
                    "offload_activations", "compile_blocks", "mask_floor", "block_ranks", "block_alphas", "block_lrs",
                    "keep_best", "patience", "ema_decay", "ema_every", "ema_warmup", "ema_output"]
SETTINGS = (NetworkConfig, TrainConfig, CaptionOptions)


def node_inputs() -> dict[str, io.Input]:
    """Widgets that are the node's, not the engine's."""
    return {
        "output_name": io.String.Input("output_name", default="my_lora", tooltip="The file name in "
                                       "loras/lora_foundry/."),
        "resume": io.Boolean.Input("resume", default=False, tooltip="Continue the saved state of output_name (same "
                                   "settings, more steps); otherwise a new run never overwrites one."),
    }


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


class TrainLoRA(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryTrainLoRA", display_name="Train LoRA", category=CATEGORY,
            description="Train a LoRA / LoCon / LoHa / LoKr / DyLoRA (optionally DoRA) adapter on MODEL with a "
                        "dataset.",
            inputs=[io.Model.Input("model"),
                    io.Clip.Input("clip", tooltip="Encodes the captions (frozen)."),
                    io.Vae.Input("vae", tooltip="Encodes the images (latents are cached once)."),
                    LoraDataset.Input("dataset"),
                    *setting_inputs(REQUIRED_WIDGETS, SETTINGS, node_inputs()),
                    *setting_inputs(OPTIONAL_WIDGETS, SETTINGS, node_inputs(), optional=True)],
            outputs=[Lora.Output(display_name="lora"), io.Model.Output(display_name="model"),
                     LoraLoss.Output(display_name="loss"), io.Image.Output(display_name="loss_graph"),
                     io.String.Output(display_name="summary"), io.Clip.Output(display_name="clip")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, output_name, resume=False, **inputs) -> io.NodeOutput:
        import folder_paths

        check_sample_prompts(inputs.get("sample_prompts") or "")  # line numbers as typed, blank lines included
        network_config = from_inputs(NetworkConfig, inputs)
        config = from_inputs(TrainConfig, inputs, captions=from_inputs(CaptionOptions, inputs))
        folders = run_folders(folder_paths.get_folder_paths("loras")[0], folder_paths.get_output_directory(),
                              output_name, resume)
        with torch.inference_mode(False):
            network = LoraNetwork.create(network_config, model, clip)
            trainer = Trainer(model, clip, vae, dataset, network, config, output_dir=folders.loras,
                              name=folders.name, on_step=progress_reporter(cls.hidden.unique_id, config.steps),
                              resume=folders.resume, state_dir=folders.states)
            result = trainer.run()
        network.metadata = trainer.metadata(result.steps)
        trained_model, trained_clip, _ = apply_lora(model, clip, network.state_dict_kohya(), 1.0, 1.0)
        history = {"loss": result.losses, "validation": result.validation}
        summary = run_summary(network, trainer, result)
        graph = pil_to_image(loss_graph(result.losses, result.validation))
        ui = {"text": [summary], "loss": result.losses, "validation": [list(v) for v in result.validation]}
        return io.NodeOutput(network, trained_model, history, graph, summary, trained_clip, ui=ui)


def run_summary(network: LoraNetwork, trainer: Trainer, result) -> str:
    """One line on what was trained, how long it took and how the losses moved."""
    config = network.config
    first, last = _mean(result.losses[:10]), _mean(result.losses[-10:])
    summary = (f"{config.algorithm} rank {config.rank} on {len(network.adapters)} layers "
               f"({network.num_params():,} parameters); "
               f"{result.steps} steps in {result.seconds:.1f}s; loss {first:.4f} -> {last:.4f}")
    if trainer.plan is not None:
        summary += f"; {trainer.plan.describe()}"
    if result.validation:
        summary += f"; validation {result.validation[0][1]:.4f} -> {result.validation[-1][1]:.4f}"
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


NODES = [TrainLoRA]
