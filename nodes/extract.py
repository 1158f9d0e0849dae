"""Extract LoRA: the low-rank difference between a tuned model and its base, as a LoRA."""

from __future__ import annotations

from ..lora_core.extract import extract_lora
from ..lora_core.targets import PRESETS
from ..lora_core.toolbox import SVD_METHODS, RankRule, SvdOptions
from .resize import CATEGORY, comfy_progress, device, rank_inputs, rank_rule


class ExtractLoRA:
    DESCRIPTION = ("Extract a LoRA (LoCon for kxk convolutions) from a fine-tuned model and its base: per layer, a "
                   "truncated SVD of W_tuned - W_base. Randomized SVD with an accuracy check (full SVD where the "
                   "check fails). The report lists ranks, kept energy, skipped and fallen-back layers.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA", "STRING")
    RETURN_NAMES = ("lora", "report")
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_base": ("MODEL",),
                "model_tuned": ("MODEL", {"tooltip": "The fine-tuned model; LoRAs applied to it count as part of it."}),
                "preset": (PRESETS, {"default": "kohya", "tooltip": "Layers to extract: attention (q/k/v/out), kohya "
                                     "(transformer blocks), locon (+ ResBlock / resampler convs), all."}),
                **rank_inputs(32, "Rank of linear / 1x1 layers (the maximum with a dynamic method)."),
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                                      "tooltip": "Rank of kxk convolutions (presets locon / all); 0 = same as rank."}),
                "clamp_quantile": ("FLOAT", {"default": 0.99, "min": 0.5, "max": 1.0, "step": 0.001,
                                             "tooltip": "Clamp up/down values to this quantile of their absolute "
                                                        "values, as kohya does; 1 = no clamp."}),
                "min_diff": ("FLOAT", {"default": 1e-6, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                       "tooltip": "Skip layers whose largest |W_tuned - W_base| is at most this."}),
                "svd": (SVD_METHODS, {"default": "randomized"}),
            },
            "optional": {"clip_base": ("CLIP",), "clip_tuned": ("CLIP",)},
        }

    def extract(self, model_base, model_tuned, preset, rank, dynamic, dynamic_param, conv_rank, clamp_quantile,
                min_diff, svd, clip_base=None, clip_tuned=None):
        rule = rank_rule(rank, dynamic, dynamic_param)
        conv_rule = None if conv_rank == 0 else RankRule(conv_rank, rule.method, rule.param)
        lora, report = extract_lora(model_base, model_tuned, clip_base, clip_tuned, rule, conv_rule, preset,
                                    clamp_quantile, min_diff, SvdOptions(method=svd), comfy_progress(), device())
        return (lora, report.summary())


NODE_CLASS_MAPPINGS = {"LoraFoundryExtractLoRA": ExtractLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraFoundryExtractLoRA": "Extract LoRA"}
