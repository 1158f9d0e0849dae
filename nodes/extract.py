"""Extract LoRA: the low-rank difference between a tuned model and its base, as a LoRA."""

from __future__ import annotations

from comfy_api.latest import io

from ..lora_core.extract import extract_lora
from ..lora_core.ranks import RankRule
from ..lora_core.svd import SVD_METHODS, SvdOptions
from ..lora_core.targets import PRESETS
from .host import comfy_progress, device
from .inputs import CATEGORY, Lora, Node, rank_inputs, rank_rule


class ExtractLoRA(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryExtractLoRA", display_name="Extract LoRA", category=CATEGORY,
            description="Extract a LoRA (LoCon for kxk convolutions) from a fine-tuned model and its base: per "
                        "layer, a truncated SVD of W_tuned - W_base. Randomized SVD with an accuracy check (full SVD "
                        "where the check fails). The report lists ranks, kept energy, skipped and fallen-back layers.",
            inputs=[
                io.Model.Input("model_base"),
                io.Model.Input("model_tuned", tooltip="The fine-tuned model; LoRAs applied to it count as part of it."),
                io.Combo.Input("preset", options=list(PRESETS), default="kohya",
                               tooltip="Layers to extract: attention (q/k/v/out), kohya (transformer blocks), locon "
                                       "(+ ResBlock / resampler convs), all."),
                *rank_inputs(32, "Rank of linear / 1x1 layers (the maximum with a dynamic method)."),
                io.Int.Input("conv_rank", default=0, min=0, max=4096,
                             tooltip="Rank of kxk convolutions (presets locon / all); 0 = same as rank."),
                io.Float.Input("clamp_quantile", default=0.99, min=0.5, max=1.0, step=0.001,
                               tooltip="Clamp up/down values to this quantile of their absolute values, as kohya "
                                       "does; 1 = no clamp."),
                io.Float.Input("min_diff", default=1e-6, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip="Skip layers whose largest |W_tuned - W_base| is at most this."),
                io.Combo.Input("svd", options=list(SVD_METHODS), default="randomized"),
                io.Clip.Input("clip_base", optional=True),
                io.Clip.Input("clip_tuned", optional=True),
            ],
            outputs=[Lora.Output(display_name="lora"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model_base, model_tuned, preset, rank, dynamic, dynamic_param, conv_rank, clamp_quantile,
                min_diff, svd, clip_base=None, clip_tuned=None) -> io.NodeOutput:
        rule = rank_rule(rank, dynamic, dynamic_param)
        conv_rule = None if conv_rank == 0 else RankRule(conv_rank, rule.method, rule.param)
        lora, report = extract_lora(model_base, model_tuned, clip_base, clip_tuned, rule, conv_rule, preset,
                                    clamp_quantile, min_diff, SvdOptions(method=svd), comfy_progress(), device())
        return io.NodeOutput(lora, report.summary())


NODES = [ExtractLoRA]
