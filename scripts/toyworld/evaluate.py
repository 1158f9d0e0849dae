"""Measure what a model draws: samples through a real ComfyUI server (KSampler), read by the judge.

- base prompt-following: colour / shape / background accuracy over world.PROMPTS x `control_count` samples;
- a LoRA: with the trigger (`count` samples), how often each part of the concept appears (and how often the base
  draws the whole concept for the same prompt); on the control prompts, the prompt-match (colour,
  shape and background all as asked) of the LoRA next to the base's, and the bleed (the concept's shape drawn).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import world
from .judge import Judge

NEGATIVE = ""


@dataclass(frozen=True)
class Sampling:
    count: int = 16  # samples per prompt (one KSampler batch, so 16 different noises)
    control_count: int = 8  # per control prompt (nine of them): the first 8 noises of the 16, as KSampler draws them
    seed: int = 0
    steps: int = 12
    cfg: float = 3.0
    sampler: str = "euler"
    scheduler: str = "normal"


def sample_prompt(checkpoint: str, prompts: list[str], sampling: Sampling, lora: str | None = None,
                  strength: float = 1.0, prefix: str = "toyworld_eval/sample") -> dict:
    """An API prompt: each text through CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage (node "save<i>")."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": world.SIZE, "height": world.SIZE, "batch_size": sampling.count}},
    }
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if lora is not None:
        graph["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                                 "strength_model": strength, "strength_clip": strength}}
        model, clip = ["lora", 0], ["lora", 1]
    graph["negative"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": NEGATIVE}}
    for i, text in enumerate(prompts):
        graph[f"text{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}}
        graph[f"sample{i}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"text{i}", 0], "negative": ["negative", 0], "latent_image": ["latent", 0],
            "seed": sampling.seed, "steps": sampling.steps, "cfg": sampling.cfg, "sampler_name": sampling.sampler,
            "scheduler": sampling.scheduler, "denoise": 1.0}}
        graph[f"decode{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"sample{i}", 0], "vae": ["ckpt", 2]}}
        graph[f"save{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"decode{i}", 0],
                                                                   "filename_prefix": f"{prefix}_{i:02d}"}}
    return graph


def load_pixels(paths: list[Path]) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as img:
            arrays.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def sample(server, checkpoint: str, prompts: list[str], sampling: Sampling = Sampling(), lora: str | None = None,
           prefix: str = "toyworld_eval/sample", timeout: float = 1800, strength: float = 1.0) -> list[list[Path]]:
    """Sample every prompt through the server (`sampling.count` each); the saved image files per prompt, in batch
    order."""
    outputs = server.run(sample_prompt(checkpoint, prompts, sampling, lora, strength, prefix=prefix), timeout=timeout)
    files = []
    for i in range(len(prompts)):
        paths = server.output_files({f"save{i}": outputs.get(f"save{i}", {})})
        if len(paths) != sampling.count:
            raise RuntimeError(f"prompt {prompts[i]!r}: expected {sampling.count} images, got {len(paths)}")
        files.append(paths)
    return files


@dataclass
class PromptScores:
    prompt: str
    expected: world.Scene
    seen: list[world.Scene] = field(default_factory=list)

    def rate(self, part: str) -> float:
        return sum(getattr(s, part) == getattr(self.expected, part) for s in self.seen) / len(self.seen)

    @property
    def match(self) -> float:
        """Fraction of samples with colour, shape and background all as expected."""
        return sum(s == self.expected for s in self.seen) / len(self.seen)


def judge_files(judge: Judge, prompts: list[str], expected: list[world.Scene], files: list[list[Path]]):
    return [PromptScores(p, e, judge.predict(load_pixels(f))) for p, e, f in zip(prompts, expected, files, strict=True)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summary(scores: list[PromptScores]) -> dict[str, float]:
    return {"colour": _mean(s.rate("colour") for s in scores), "shape": _mean(s.rate("shape") for s in scores),
            "background": _mean(s.rate("background") for s in scores), "match": _mean(s.match for s in scores)}


CONTROL_PROMPTS = [world.caption(*p) for p in world.PROMPTS]
CONTROL_SCENES = [world.Scene(*p) for p in world.PROMPTS]


def _control(sampling: Sampling) -> Sampling:
    return replace(sampling, count=sampling.control_count)


def evaluate_base(server, checkpoint: str, judge: Judge, sampling: Sampling = Sampling()) -> dict:
    """Base prompt-following over world.PROMPTS: {"colour", "shape", "background", "match", "files"}."""
    files = sample(server, checkpoint, CONTROL_PROMPTS, _control(sampling), prefix="toyworld_eval/base")
    result = summary(judge_files(judge, CONTROL_PROMPTS, CONTROL_SCENES, files))
    return {**result, "files": files}


def evaluate_lora(server, checkpoint: str, lora: str, judge: Judge, sampling: Sampling = Sampling(),
                  base: dict | None = None, prefix: str = "toyworld_eval/lora",
                  base_trigger: list[Path] | None = None) -> dict:
    """The LoRA's concept (with the trigger), the base on the trigger, and both on the control prompts.

    `base` (evaluate_base's result) is reused when given, as is `base_trigger` (the base's files for the trigger).
    Bleed: the share of control samples drawn with the concept's shape, which no control prompt asks for.
    Returns the scores and the image files.
    """
    concept = world.Scene(*world.CONCEPT)
    lora_trigger = sample(server, checkpoint, [world.TRIGGER], sampling, lora=lora, prefix=f"{prefix}_trigger")[0]
    lora_control = sample(server, checkpoint, CONTROL_PROMPTS, _control(sampling), lora=lora, prefix=prefix)
    base_trigger = base_trigger or sample(server, checkpoint, [world.TRIGGER], sampling,
                                          prefix="toyworld_eval/base_trigger")[0]
    trigger = judge_files(judge, [world.TRIGGER], [concept], [lora_trigger])[0]
    base_on_trigger = judge_files(judge, [world.TRIGGER], [concept], [base_trigger])[0]
    control_scores = judge_files(judge, CONTROL_PROMPTS, CONTROL_SCENES, lora_control)
    control = summary(control_scores)
    seen = [scene for scores in control_scores for scene in scores.seen]
    base = base or evaluate_base(server, checkpoint, judge, sampling)
    return {
        "concept": {part: trigger.rate(part) for part in ("colour", "shape", "background")},
        "concept_match": trigger.match,
        "base_concept_match": base_on_trigger.match,
        "control_match": control["match"],
        "base_control_match": base["match"],
        "bleed": sum(scene.shape == world.CONCEPT[1] for scene in seen) / len(seen),
        "control": control,
        "files": {"lora_trigger": lora_trigger, "lora_control": lora_control, "base_trigger": base_trigger,
                  "base_control": base["files"]},
    }


def passes(lora_scores: dict) -> dict[str, bool]:
    """The bar for a LoRA: the concept with the trigger, not without the LoRA, no leakage into the control prompts
    (as asked within 0.1 of the base; issue 35 measures 0.05 in bench/), their shapes not the concept's."""
    return {
        "concept": all(v >= 0.8 for v in lora_scores["concept"].values()),
        "base_never": lora_scores["base_concept_match"] <= 0.05,
        "no_leakage": lora_scores["control_match"] >= lora_scores["base_control_match"] - 0.1,
        "no_bleed": lora_scores["bleed"] <= 0.1,
    }


def grid(rows: list[list[Path]], labels: list[str] | None = None, columns: int = 8):
    """A Pillow grid: one row per prompt (the first `columns` samples), an optional text label each."""
    from PIL import Image, ImageDraw

    size, label_w = world.SIZE, 200 if labels else 0
    out = Image.new("RGB", (label_w + columns * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(out)
    for r, paths in enumerate(rows):
        if labels:
            draw.text((4, r * size + size // 2 - 6), labels[r], fill="black")
        for c, p in enumerate(paths[:columns]):
            with Image.open(p) as img:
                out.paste(img.convert("RGB"), (label_w + c * size, r * size))
    return out


SLIDER_SCENES = [world.Scene(world.SLIDER[0], shape, background)
                 for shape, background in (("circle", "white"), ("square", "yellow"), ("triangle", "green"))]


def evaluate_slider(server, checkpoint: str, lora: str, judge: Judge, sampling: Sampling = Sampling()) -> dict:
    """A slider LoRA on prompts of its middle colour: at +1 the shapes should take the positive colour, at -1 the
    negative one, at 0 (the base) stay as asked, shape and background as asked throughout."""
    prompts = [s.caption for s in SLIDER_SCENES]
    middle, positive, negative = world.SLIDER
    result = {}
    for name, strength, colour in (("minus", -1.0, negative), ("base", 0.0, middle), ("plus", 1.0, positive)):
        files = sample(server, checkpoint, prompts, sampling, lora=None if strength == 0 else lora, strength=strength,
                       prefix=f"toyworld_eval/slider_{name}")
        expected = [world.Scene(colour, s.shape, s.background) for s in SLIDER_SCENES]
        result[name] = {**summary(judge_files(judge, prompts, expected, files)), "colour_asked": colour}
    return result


def slider_passes(scores: dict) -> dict[str, bool]:
    """The issue's bar for a slider: each side's colour at +1 / -1, the other attributes as the base draws them."""
    kept = all(scores[side][part] >= scores["base"][part] - 0.05 for side in ("plus", "minus")
               for part in ("shape", "background"))
    return {"plus": scores["plus"]["colour"] >= 0.8, "minus": scores["minus"]["colour"] >= 0.8, "kept": kept}
