"""Merge LoRA: several adapters into one LoRA (exact or concat), or into MODEL / CLIP (and a checkpoint)."""

from __future__ import annotations

import json

from comfy_api.latest import io

from ..lora_core.ema import average_files, power_ema_weights, run_checkpoints
from ..lora_core.files import numbered_path, read_safetensors
from ..lora_core.merge import merge_concat, merge_exact, merge_into_model, save_checkpoint
from ..lora_core.network import LoraNetwork
from ..lora_core.svd import SvdOptions
from .host import comfy_progress, device
from .inputs import CATEGORY, Lora, Node, rank_inputs, rank_rule
from .loras import NONE, lora_choices, lora_file, read_lora

MODES = ("exact", "concat", "into model", "post-hoc ema")
SLOTS = 4


def slot_inputs() -> list[io.Input]:
    choices = lora_choices()
    slots = []
    for i in range(1, SLOTS + 1):
        slots += [io.Combo.Input(f"lora_{i}", options=choices, default=NONE,
                                 tooltip="A file in models/loras (lora_in wins)."),
                  io.Float.Input(f"ratio_{i}", default=1.0, min=-100.0, max=100.0, step=0.01)]
    return slots


class MergeLoRA(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryMergeLoRA", display_name="Merge LoRA", category=CATEGORY, is_output_node=True,
            description="Merge up to 4 LoRAs with ratios (dW = sum ratio_i * dW_i). exact: the sum, truncated by SVD "
                        "to a rank (any LoRA/LoCon/LoHa/LoKr mix; the report gives the energy kept). concat: "
                        "LoRA/LoCon only, ranks side by side, exact at rank = sum of ranks. into model: patch "
                        "MODEL/CLIP like chained LoRA loaders and optionally save a checkpoint (the lora output is "
                        "then empty). post-hoc ema: lora_1's run checkpoints (save_every) averaged as a power-function "
                "EMA at lora_1's step.",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="exact"),
                *rank_inputs(32, "exact: the merged rank (the maximum with a dynamic method)."),
                *slot_inputs(),
                *(Lora.Input(f"lora_in_{i}", optional=True, tooltip=f"An adapter from another node, used as slot {i}.")
                  for i in range(1, SLOTS + 1)),
                io.Model.Input("model", optional=True, tooltip="into model: the model to patch. exact / concat: names "
                               "LoRA modules after this model's layers (any file naming)."),
                io.Clip.Input("clip", optional=True, tooltip="into model: the text encoders to patch. exact / concat: "
                              "needed with model when the LoRAs change the text encoder."),
                io.Vae.Input("vae", optional=True, tooltip="into model: included in the saved checkpoint."),
                io.String.Input("checkpoint_prefix", default="", optional=True, tooltip="into model: save a "
                                "checkpoint as models/checkpoints/<prefix>_00001.safetensors; empty = no file."),
                io.Float.Input("ema_sigma_rel", default=0.1, min=0.01, max=0.27, step=0.01, optional=True,
                               tooltip="post-hoc ema: the average's width relative to the run (EDM2's sigma_rel; "
                                       "smaller = nearer the last checkpoint)."),
            ],
            outputs=[Lora.Output(display_name="lora"), io.Model.Output(display_name="model"),
                     io.Clip.Output(display_name="clip"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, mode, rank, dynamic, dynamic_param, model=None, clip=None, vae=None, checkpoint_prefix="",
                ema_sigma_rel=0.1, **slots) -> io.NodeOutput:
        if mode == "post-hoc ema":
            return cls.post_hoc_ema(slots["lora_1"], ema_sigma_rel, model, clip)
        chosen = []
        for i in range(1, SLOTS + 1):
            network, name = slots.get(f"lora_in_{i}"), slots[f"lora_{i}"]
            if network is not None or name != NONE:
                chosen.append((i, network, name, slots[f"ratio_{i}"]))
        if not chosen:
            raise ValueError("Merge LoRA: choose at least one lora_N file or connect a lora_in_N")
        labels = [f"{name if network is None else f'lora_in_{i}'} x {ratio:g}" for i, network, name, ratio in chosen]
        if mode == "into model":
            return cls.into_model(chosen, labels, model, clip, vae, checkpoint_prefix)
        inputs = [(network if network is not None else read_lora(name, model, clip), ratio)
                  for _, network, name, ratio in chosen]
        if mode == "concat":
            merged, report = merge_concat(inputs, comfy_progress())
        else:
            merged, report = merge_exact(inputs, rank_rule(rank, dynamic, dynamic_param), SvdOptions(),
                                         comfy_progress(), device())
        summary = report.summary()
        text = "inputs: " + ", ".join(labels) + "\n" + summary
        return io.NodeOutput(merged, model, clip, text, ui={"text": [summary.split("\n", 1)[0]]})

    @staticmethod
    def post_hoc_ema(name: str, sigma_rel: float, model, clip) -> io.NodeOutput:
        if name == NONE:
            raise ValueError("Merge LoRA: post-hoc ema averages the checkpoints of lora_1's run; choose its last "
                             "step checkpoint (<name>-stepNNNNNN, in the run's folder) as lora_1")
        checkpoints = run_checkpoints(lora_file(name))
        weights = power_ema_weights([step for step, _ in checkpoints], sigma_rel)
        tensors, metadata = average_files([path for _, path in checkpoints], weights)
        metadata = {**metadata, "lora_foundry_post_hoc_ema": json.dumps(
            {"sigma_rel": sigma_rel, "checkpoints": {path.name: round(w, 6) for (_, path), w in
                                                     zip(checkpoints, weights, strict=True)}})}
        network = LoraNetwork.from_state_dict(tensors, metadata, model=model, clip=clip)
        network.metadata = metadata
        text = f"post-hoc EMA (sigma_rel {sigma_rel:g}) of {len(checkpoints)} checkpoints: " + ", ".join(
            f"step {step} x {w:.3f}" for (step, _), w in zip(checkpoints, weights, strict=True))
        return io.NodeOutput(network, model, clip, text, ui={"text": [text]})

    @staticmethod
    def into_model(chosen, labels, model, clip, vae, checkpoint_prefix):
        if model is None:
            raise ValueError("Merge LoRA: mode 'into model' needs the model input (and clip to merge text encoders)")
        loras = []
        for _, network, name, ratio in chosen:
            if network is not None:
                tensors = network.state_dict_kohya()
            else:
                tensors, _ = read_safetensors(lora_file(name))
            loras.append((tensors, ratio, ratio))
        model, clip, reports = merge_into_model(model, clip, loras)
        lines = [f"{label}: {report.summary()}" for label, report in zip(labels, reports, strict=True)]
        if checkpoint_prefix.strip():
            import folder_paths

            path = numbered_path(folder_paths.get_folder_paths("checkpoints")[0], checkpoint_prefix.strip())
            save_checkpoint(path, model, clip, vae, {"lora_foundry_merge": json.dumps(labels)})
            lines.append(f"saved {path}")
        text = "\n".join(lines)
        return io.NodeOutput(None, model, clip, text, ui={"text": [text]})


NODES = [MergeLoRA]
