"""Train LoRA: train an adapter on the loaded MODEL with a dataset, inside the graph."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from ..lora_core.apply import apply_lora
from ..lora_core.network import LoraNetwork, NetworkConfig
from ..training.configs.run_config import GRAPH_SECTIONS
from ..training.data.captions import CaptionOptions
from ..training.engine.plots import loss_graph
from ..training.engine.trainer import TrainConfig, Trainer
from ..training.run import expert_name, run_folders, settings, train
from .inputs import CATEGORY, Lora, LoraDataset, LoraLoss, Node, TrainingConfig, setting_inputs
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
                    "keep_best", "patience", "ema_decay", "ema_every", "ema_warmup", "ema_output", "optimizer_args",
                    "epochs", "expert", "expert_boundary", "preservation_class",
                    "preservation_weight", "slider_positive", "slider_negative", "slider_target", "slider_anchor",
                    "slider_guidance", "base_quantization", "blank_preservation_weight", "debiased_estimation",
                    "prior_target"]
SETTINGS = (NetworkConfig, TrainConfig, CaptionOptions)


def node_inputs() -> dict[str, io.Input]:
    """Widgets that are the node's, not the engine's."""
    return {
        "output_name": io.String.Input("output_name", default="my_lora", tooltip="The run's name: its resume "
                                       "state goes to output/lora_foundry_runs/<name>/, checkpoints to "
                                       "loras/<name>/; Save LoRA writes the LoRA itself."),
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
        bar.update_absolute(info["step"], info["total"], ("PNG", preview, None) if preview is not None else None)
        event = TRAINING_LOG.record(node, info, preview)  # kept for a page reloaded mid-run
        try:
            from server import PromptServer

            PromptServer.instance.send_sync("lora_foundry.train", {"node": node_id, **event})
        except (ImportError, AttributeError):
            pass  # headless use without a server

    return report


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
                    *setting_inputs(OPTIONAL_WIDGETS, SETTINGS, node_inputs(), optional=True),
                    TrainingConfig.Input("config", optional=True, tooltip="Settings from Load Training Config: "
                                         "they replace the widgets' values (the summary lists them).")],
            outputs=[Lora.Output(display_name="lora"), io.Model.Output(display_name="model"),
                     LoraLoss.Output(display_name="loss"), io.Image.Output(display_name="loss_graph"),
                     io.String.Output(display_name="summary"), io.Clip.Output(display_name="clip")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, output_name, resume=False, config=None, **inputs) -> io.NodeOutput:
        import folder_paths

        if config is not None:  # a Load Training Config: its settings replace the widgets'
            inputs.update(config.inputs(*GRAPH_SECTIONS))
            output_name = config.values.get("run", {}).get("output_name", output_name)
            resume = config.values.get("run", {}).get("resume", resume)
        network_config, train_config = settings(inputs)
        folders = run_folders(folder_paths.get_folder_paths("loras")[0], folder_paths.get_output_directory(),
                              expert_name(output_name, train_config.expert), resume)
        network, trainer, result = train(model, clip, vae, dataset, network_config, train_config, folders,
                                         on_step=progress_reporter(cls.hidden.unique_id, train_config.steps))
        trained_model, trained_clip, _ = apply_lora(model, clip, network.state_dict_kohya(), 1.0, 1.0)
        history = {"loss": result.losses, "validation": result.validation}
        summary = run_summary(network, trainer, result)
        if config is not None:
            summary += "\n" + config.describe()
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
    if trainer.data.image_input is not None:
        summary += f"; the model is given each sample's {trainer.data.image_input}"
    if trainer.config.slider:
        summary += (f"; a concept slider: +1 toward {trainer.config.slider_positive!r}, -1 toward "
                    f"{trainer.config.slider_negative!r}")
    if trainer.config.expert != "all":
        summary += f"; the {trainer.config.expert} expert (sigma boundary {trainer.step.expert_boundary()})"
    if trainer.context.plan is not None:
        summary += f"; {trainer.context.plan.describe()}"
    if result.validation:
        summary += f"; validation {result.validation[0][1]:.4f} -> {result.validation[-1][1]:.4f}"
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


NODES = [TrainLoRA]
