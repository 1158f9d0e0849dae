"""Resize LoRA: truncate an adapter to a lower (fixed or dynamic) rank."""

from __future__ import annotations

from comfy_api.latest import io

from ..lora_core.resize import resize_lora
from ..lora_core.svd import SvdOptions
from .host import comfy_progress, device
from .inputs import CATEGORY, Lora, Node, rank_inputs, rank_rule
from .loras import NONE, lora_choices, read_lora


class ResizeLoRA(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryResizeLoRA", display_name="Resize LoRA", category=CATEGORY,
            description="Resize a LoRA / LoCon / LoHa / LoKr to a lower rank by SVD of each module's change. The "
                        "report gives each layer's rank and the fraction of its change (energy, ||dW||^2) kept.",
            inputs=[io.Combo.Input("lora_name", options=lora_choices(),
                                   tooltip="A file in models/loras (the lora input wins when connected)."),
                    *rank_inputs(16, "The new rank (the maximum with a dynamic method)."),
                    Lora.Input("lora", optional=True, tooltip="An adapter from another node, instead of a file.")],
            outputs=[Lora.Output(display_name="lora"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, lora_name, rank, dynamic, dynamic_param, lora=None) -> io.NodeOutput:
        if lora is None:
            if lora_name == NONE:
                raise ValueError("Resize LoRA: choose a lora_name or connect a lora")
            lora = read_lora(lora_name)
        resized, report = resize_lora(lora, rank_rule(rank, dynamic, dynamic_param), SvdOptions(),
                                      comfy_progress(), device())
        return io.NodeOutput(resized, report.summary())


NODES = [ResizeLoRA]
