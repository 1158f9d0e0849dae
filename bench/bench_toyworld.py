"""Steps to the concept: the toy world's concept learned by our example workflow and by ComfyUI's native
TrainLoraNode, scored at several step budgets.

Usage: .venv/bin/python bench/bench_toyworld.py [--family sd15|sd3] [--seed 0] [--budgets 25,50,100,200]
                                                [--variants example,lora+16,...] [--no-native] [--smoke]

Ours runs as the example workflow through a real server, once to the largest budget with a checkpoint at every
budget (its learning rate is constant and nothing in a step depends on the run's length, so the checkpoint of step
50 is the adapter a 50-step run writes); `--variants` changes its Train LoRA and Load Dataset settings (VARIANTS
below; `example` is the family's workflow as shipped, every other variant changes SWEEP_BASE's recipe). Native
trains in this process on the same images (the concept, repeated as its kohya folder says, plus the prior images) with the example's rank,
learning rate and batch, once per budget. Every LoRA is
sampled through the same server and read by the toy world's judge: the concept with the trigger (16 samples), the
nine control prompts (8 each) against the base, and the bleed (control samples drawn with the concept's shape).
Prints a table, writes out/bench_toyworld_<family>.json and a plot, out/bench_toyworld_<family>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))

EXAMPLE_SETTINGS = ("rank", "steps", "learning_rate", "batch_size", "seed")  # what the table reports
# What every variant but `example` changes the settings from: the recipe the example workflow had (one example for both
# toy worlds) before each world's example took its sweep winner, so each row means what it meant when it was recorded.
SWEEP_BASE = {"rank": 8, "alpha": 8.0, "learning_rate": 1e-3, "targets": "kohya", "conv_rank": 0,
              "timestep_sampling": "auto", "noise_offset": 0.0, "debiased_estimation": False, "prior_target": "image",
              "prior_loss_weight": 1.0, "batch_size": 4}
LN_NO = {"timestep_sampling": "logit_normal", "noise_offset": 0.1}  # "ln + no" in the names below
LN_NO_LOCON_DEBIASED = {**LN_NO, "debiased_estimation": True, "targets": "locon", "conv_rank": 8}  # SD1.5's example at rank 8
ALL_4E3 = {"learning_rate": 4e-3, "targets": "all", "conv_rank": 8}  # "lr 4e-3 + all layers": SD3's 100-step example
PRIOR_BASE_2 = {**ALL_4E3, "prior_target": "base", "prior_loss_weight": 2.0}  # SD3's 50-step example
# Our settings tried against the example's (Train LoRA's inputs): what users tune for fast learning.
VARIANTS = {
    "example": {},  # the family's example workflow as shipped
    "lr 2e-3": {"learning_rate": 2e-3},
    "lr 4e-3": {"learning_rate": 4e-3},
    "lora+ 4": {"lora_plus_ratio": 4.0},
    "lora+ 16": {"lora_plus_ratio": 16.0},
    "prodigy": {"optimizer": "Prodigy", "learning_rate": 1.0},
    "min-snr off": {"min_snr_gamma": 0.0},
    "alpha 16": {"alpha": 16.0},
    "caption dropout 0.1": {"caption_dropout": 0.1},
    "noise offset 0.1": {"noise_offset": 0.1},
    "alpha 16 + noise offset 0.1": {"alpha": 16.0, "noise_offset": 0.1},
    "prodigy + noise offset 0.1": {"optimizer": "Prodigy", "learning_rate": 1.0, "noise_offset": 0.1},
    "logit-normal": {"timestep_sampling": "logit_normal"},
    "logit-normal + noise offset 0.1": {"timestep_sampling": "logit_normal", "noise_offset": 0.1},
    "logit-normal + alpha 16": {"timestep_sampling": "logit_normal", "alpha": 16.0},
    "logit-normal + alpha 16 + noise offset 0.1": {"timestep_sampling": "logit_normal", "alpha": 16.0,
                                                   "noise_offset": 0.1},
    "ln + no + lr 2e-3": {**LN_NO, "learning_rate": 2e-3},
    "ln + no + lora+ 4": {**LN_NO, "lora_plus_ratio": 4.0},
    "ln + no + rank 16": {**LN_NO, "rank": 16, "alpha": 16.0},
    "ln + no + min-snr off": {**LN_NO, "min_snr_gamma": 0.0},
    "ln + no + beta2 0.99": {**LN_NO, "optimizer_args": "betas=0.9,0.99"},
    "ln + no + prodigy": {**LN_NO, "optimizer": "Prodigy", "learning_rate": 1.0},
    "shift 6": {"timestep_shift": "fixed", "shift": 6.0},
    "lr 4e-3 + shift 6": {"learning_rate": 4e-3, "timestep_shift": "fixed", "shift": 6.0},
    "locon": {"targets": "locon", "conv_rank": 8},
    "ln + no + locon": {**LN_NO, "targets": "locon", "conv_rank": 8},
    "ln + noise offset 0.2 + locon": {"timestep_sampling": "logit_normal", "noise_offset": 0.2, "targets": "locon",
                                      "conv_rank": 8},
    "noise offset 0.1 + locon": {"noise_offset": 0.1, "targets": "locon", "conv_rank": 8},
    "ln + no + locon + lr 2e-3": {**LN_NO, "targets": "locon", "conv_rank": 8, "learning_rate": 2e-3},
    "all layers": {"targets": "all", "conv_rank": 8},
    "lr 4e-3 + all layers": ALL_4E3,
    "debiased + locon": {"debiased_estimation": True, "targets": "locon", "conv_rank": 8},
    "debiased + no + locon": {"debiased_estimation": True, "noise_offset": 0.1, "targets": "locon", "conv_rank": 8},
    "ln + no + locon + debiased": LN_NO_LOCON_DEBIASED,
    "ln + no + locon + lora+ 4": {**LN_NO, "targets": "locon", "conv_rank": 8, "lora_plus_ratio": 4.0},
    "lr 4e-3 + all layers + lora+ 4": {**ALL_4E3, "lora_plus_ratio": 4.0},
    "lr 8e-3 + all layers": {**ALL_4E3, "learning_rate": 8e-3},
    "lr 4e-3 + all layers + rank 16": {**ALL_4E3, "rank": 16, "alpha": 16.0},
    "lr 4e-3 + all layers + uniform": {**ALL_4E3, "timestep_sampling": "uniform"},
    "lr 4e-3 + all layers + shift 1": {**ALL_4E3, "timestep_shift": "fixed", "shift": 1.0},  # shift 6 was slower
    "lr 4e-3 + all layers + shift 1.5": {**ALL_4E3, "timestep_shift": "fixed", "shift": 1.5},
    "lr 4e-3 + all layers + dora": {**ALL_4E3, "dora": True},
    "lr 4e-3 + all layers + loha": {**ALL_4E3, "algorithm": "loha"},
    "lr 3e-3 + all layers + loha": {**ALL_4E3, "algorithm": "loha", "learning_rate": 3e-3},
    "lr 4e-3 + all layers + lokr": {**ALL_4E3, "algorithm": "lokr"},
    "lr 4e-3 + all layers + batch 8": {**ALL_4E3, "batch_size": 8},  # 50 steps see the images 100 of 4 do
    "lr 4e-3 + all layers + batch 8 + blank preservation": {**ALL_4E3, "batch_size": 8,
                                                            "blank_preservation_weight": 1.0},
    "lr 3e-3 + all layers + batch 8": {**ALL_4E3, "batch_size": 8, "learning_rate": 3e-3},
    "lr 6e-3 + all layers + batch 8 + blank preservation": {**ALL_4E3, "batch_size": 8, "learning_rate": 6e-3,
                                                            "blank_preservation_weight": 1.0},
    "lr 4e-3 + all layers + batch 8 + blank preservation 0.5": {**ALL_4E3, "batch_size": 8,
                                                                "blank_preservation_weight": 0.5},
    "lr 6e-3 + all layers + cosine": {**ALL_4E3, "learning_rate": 6e-3, "scheduler": "cosine"},
    "lr 8e-3 + all layers + cosine": {**ALL_4E3, "learning_rate": 8e-3, "scheduler": "cosine"},
    "lr 4e-3 + all layers + text encoder": {**ALL_4E3, "train_text_encoder": True},
    "lr 4e-3 + all layers + beta1 0.95": {**ALL_4E3, "optimizer_args": "betas=0.95,0.999"},
    "lr 4e-3 + all layers + beta2 0.99": {**ALL_4E3, "optimizer_args": "betas=0.9,0.99"},
    "lr 4e-3 + all layers + prior weight 0.5": {**ALL_4E3, "prior_loss_weight": 0.5},
    "lr 4e-3 + all layers + world preservation instead of prior": {**ALL_4E3, "preserve_world": 32,
                                                                   "blank_preservation_weight": 1.0},
    "lr 3e-3 + all layers + world preservation instead of prior": {**ALL_4E3, "learning_rate": 3e-3,
                                                                    "preserve_world": 32,
                                                                    "blank_preservation_weight": 1.0},
    "lr 4e-3 + all layers + world preservation 2 instead of prior": {**ALL_4E3, "preserve_world": 32,
                                                                      "preservation_weight": 2.0,
                                                                      "blank_preservation_weight": 2.0},
    "lr 4e-3 + all layers + prior target base": {**ALL_4E3, "prior_target": "base"},
    "lr 4e-3 + all layers + prior target base + prior weight 2": PRIOR_BASE_2,
    "lr 3e-3 + all layers + prior target base": {**ALL_4E3, "prior_target": "base", "learning_rate": 3e-3},
    "lr 4e-3 + all layers + prior target base + prior weight 1.5": {**ALL_4E3, "prior_target": "base",
                                                                    "prior_loss_weight": 1.5},
    "lr 4e-3 + all layers + prior target base + prior weight 2 + rank 16": {**PRIOR_BASE_2, "rank": 16, "alpha": 16.0},
    "lr 4e-3 + all layers + prior target base + prior weight 2 + lora+ 4": {**PRIOR_BASE_2, "lora_plus_ratio": 4.0},
    "lr 5e-3 + all layers + prior target base + prior weight 2": {**PRIOR_BASE_2, "learning_rate": 5e-3},
    "lr 4e-3 + all layers + prior target base + prior weight 3": {**ALL_4E3, "prior_target": "base",
                                                                  "prior_loss_weight": 3.0},
    "lr 4e-3 + all layers + prior target base + prior weight 2 + batch 6": {**PRIOR_BASE_2, "batch_size": 6},
    "lr 4e-3 + all layers + prior target base + prior weight 2 + grad clip off": {**PRIOR_BASE_2, "grad_clip": 0.0},
    "lr 4e-3 + all layers + prior target base + prior weight 2 + huber": {**PRIOR_BASE_2, "loss": "huber"},
    "lr 4e-3 + all layers + prior target base + prior weight 2 + concept repeats 20": {**PRIOR_BASE_2,
                                                                                       "concept_repeats": 20},
    "lr 3e-3 + all layers + prior target base + prior weight 2 + concept repeats 20": {
        **PRIOR_BASE_2, "learning_rate": 3e-3, "concept_repeats": 20},
    "lr 4e-3 + all layers + prior target base + prior weight 3 + concept repeats 20": {
        **PRIOR_BASE_2, "prior_loss_weight": 3.0, "concept_repeats": 20},
    "ln + no + locon + debiased + lr 1.5e-3": {**LN_NO_LOCON_DEBIASED, "learning_rate": 1.5e-3},
    "ln + no + locon + debiased + rank 16": {**LN_NO_LOCON_DEBIASED, "rank": 16, "alpha": 16.0, "conv_rank": 16},
    "ln + no + locon + debiased + rank 16 + batch 6": {**LN_NO_LOCON_DEBIASED, "rank": 16, "alpha": 16.0,
                                                      "conv_rank": 16, "batch_size": 6},
    "ln + no + locon + debiased + rank 16 + prior target base + prior weight 2 + batch 6": {
        **LN_NO_LOCON_DEBIASED, "rank": 16, "alpha": 16.0, "conv_rank": 16, "prior_target": "base",
        "prior_loss_weight": 2.0, "batch_size": 6},
    "ln + no + locon + debiased + rank 16 + prior target base": {**LN_NO_LOCON_DEBIASED, "rank": 16, "alpha": 16.0,
                                                                 "conv_rank": 16, "prior_target": "base"},
    "ln + no + locon + debiased + rank 16 + prior target base + prior weight 2": {
        **LN_NO_LOCON_DEBIASED, "rank": 16, "alpha": 16.0, "conv_rank": 16, "prior_target": "base",
        "prior_loss_weight": 2.0},
}


def example_settings(family: str, object_info: dict) -> dict:
    from harness.examples import widget_value
    from main_job import EXAMPLES

    node = next(n for n in json.loads(EXAMPLES[family].read_text())["nodes"] if n["type"] == "LoraFoundryTrainLoRA")
    return {name: widget_value(node, object_info[node["type"]], name) for name in EXAMPLE_SETTINGS}


def dataset_items(concept: Path, prior: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs as Load Dataset reads the folders (kohya repeats, reg images uncaptioned or
    with their own captions), each repeated as often as one of our epochs shows it."""
    from harness.comfy import import_pack

    import_pack()
    from lora_foundry.training.data.dataset import load_dataset

    dataset = load_dataset(concept, resolution=64, min_side=32, max_side=128, bucket_step=32, reg_folder=prior)
    return [(item.path, item.caption) for item in dataset.items for _ in range(item.repeats)]


def native_inputs(checkpoint: Path, concept: Path, prior: Path) -> tuple:
    """The base model and TrainLoraNode's latents and positive conditioning for the dataset, computed once."""
    import comfy.sd
    import torch
    from PIL import Image
    from toyworld.pretrain import to_pixels

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    cache: dict = {}
    latents, positive = [], []
    with torch.no_grad():  # frozen inputs: no graph back into the VAE or the text encoder
        for image, caption in dataset_items(concept, prior):
            if image not in cache:
                with Image.open(image) as img:
                    cache[image] = vae.encode(to_pixels([img.convert("RGB")]).permute(0, 2, 3, 1))
            if caption not in cache:  # what CLIPTextEncode gives: the pooled output too (SD3 reads it)
                cache[caption] = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            latents.append({"samples": cache[image]})
            cond, pooled = cache[caption]
            positive.append([[cond, {"pooled_output": pooled}]])
    return model, latents, positive


def train_native(inputs: tuple, settings: dict, steps: int) -> tuple[dict, float]:
    """ComfyUI's TrainLoraNode for `steps`; returns (its LoRA state dict, seconds)."""
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    model, latents, positive = inputs
    start = time.perf_counter()
    with torch.inference_mode(False):
        out = TrainLoraNode.execute(
            model=[model], latents=latents, positive=positive, batch_size=[settings["batch_size"]],
            steps=[steps], grad_accumulation_steps=[1], learning_rate=[settings["learning_rate"]],
            rank=[settings["rank"]], optimizer=["AdamW"], loss_function=["MSE"], seed=[settings["seed"]],
            training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[False],
            existing_lora=["[None]"])
    seconds = time.perf_counter() - start
    return {k: v.detach().clone().contiguous() for k, v in out.result[1].items()}, seconds


def route(settings: dict, train_inputs: set[str], dataset_inputs: set[str]) -> tuple[dict, dict]:
    """A variant's settings split into Train LoRA's and Load Dataset's inputs. A name both nodes have goes to Train
    LoRA: `seed` is the training seed here (Load Dataset's is its validation split's)."""
    unknown = sorted(set(settings) - train_inputs - dataset_inputs)
    if unknown:  # the server would drop them without a word, and the row would record a setting never used
        raise ValueError(f"{unknown} are inputs of neither Train LoRA nor Load Dataset")
    train = {k: v for k, v in settings.items() if k in train_inputs}
    return train, {k: v for k, v in settings.items() if k not in train}


def train_ours(server, checkpoint: Path, family: str, data: dict, name: str, budgets: list[int],
               settings: dict) -> tuple[dict[int, Path], float]:
    """`family`'s example workflow to the largest budget under `name`, `settings` over its Train LoRA inputs, a
    checkpoint at every budget; returns ({steps: file}, seconds of the whole prompt)."""
    from harness.workflow import to_api_prompt
    from main_job import EXAMPLES, PRIOR_NAME, example_workflow, install_dataset

    settings = dict(settings)
    install_dataset(server, data["concept"])
    install_dataset(server, data["prior"], PRIOR_NAME)
    info = server.object_info()
    workflow = example_workflow(checkpoint.name, info, path=EXAMPLES[family], reg_folder=PRIOR_NAME)
    prompt = to_api_prompt(workflow, info)
    step_size = budgets[0]
    if any(b % step_size for b in budgets):
        raise ValueError(f"every budget must be a multiple of the first: {budgets}")
    captions = settings.pop("preserve_world", 0)
    if captions:  # output preservation of that many base captions instead of the prior images
        from toyworld import world

        settings.update(preservation_class="\n".join(world.preservation_prompts(captions)), reg_folder="")
    inputs = {node: {k for group in info[node]["input"].values() for k in group}
              for node in ("LoraFoundryTrainLoRA", "LoraFoundryLoadDataset")}
    train, dataset = route(settings, inputs["LoraFoundryTrainLoRA"], inputs["LoraFoundryLoadDataset"])
    for node in prompt.values():
        if node["class_type"] == "LoraFoundryTrainLoRA":
            node["inputs"].update({"output_name": name, "steps": budgets[-1], "save_every": step_size, **train})
        elif node["class_type"] == "LoraFoundryLoadDataset":
            node["inputs"].update(dataset)
    started = time.perf_counter()
    outputs = server.run(prompt, timeout=3600)
    seconds = time.perf_counter() - started
    for text in (str(t) for out in outputs.values() for t in out.get("text", [])):
        if not text.endswith(".safetensors"):  # Train LoRA's summary: its steps and their seconds
            print(f"  {name}: {text}", flush=True)
    loras = server.base_dir / "models" / "loras"
    files = {b: next(loras.rglob(f"{name}-step{b:06d}.safetensors")) for b in budgets}
    return files, seconds


def first_images(data: dict, folder: Path, count: int = 4) -> dict:
    """The dataset with only the first `count` images (and their captions) of each of its folders: the smoke run's."""
    import shutil

    out = {}
    for name in ("concept", "prior"):
        for images in sorted(p for p in data[name].iterdir() if p.is_dir()):
            target = folder / name / images.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(images.glob("*.png"))[:count]:
                for source in (image, image.with_suffix(".txt")):
                    if source.is_file():
                        shutil.copy(source, target / source.name)
        out[name] = folder / name
    return out


def steps_to_concept(curve: dict[int, dict]) -> int | None:
    """The first budget from which on every budget passes the bar (concept >= 0.8 each part, no leakage)."""
    from toyworld import evaluate

    budgets = sorted(curve)
    for i, budget in enumerate(budgets):
        if all(all(evaluate.passes(curve[b]).values()) for b in budgets[i:]):
            return budget
    return None


def plot(curves: dict[str, dict[int, dict]], title: str):
    """Concept match (solid) and bleed (dots) per budget, one colour per run; a Pillow image."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 400, 48, 560, 28, 360
    img = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(img)
    budgets = sorted({b for c in curves.values() for b in c})
    colours = [(120, 190, 255), (255, 170, 60), (140, 220, 120), (230, 110, 160), (200, 200, 90), (170, 140, 255),
               (90, 210, 210), (240, 240, 240), (255, 110, 90)]

    def xy(i: int, value: float) -> tuple[float, float]:
        return left + (right - left) * i / max(1, len(budgets) - 1), bottom - (bottom - top) * value

    d.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    d.line([xy(0, 0.8), xy(len(budgets) - 1, 0.8)], fill=(90, 90, 100))
    for value in (0.0, 0.5, 0.8, 1.0):
        d.text((8, xy(0, value)[1] - 6), f"{value:.1f}", fill=(170, 170, 180))
    for i, b in enumerate(budgets):
        d.text((xy(i, 0)[0] - 8, bottom + 6), str(b), fill=(170, 170, 180))
    d.text((left, 8), title, fill=(220, 220, 220))
    for k, (name, curve) in enumerate(curves.items()):
        colour = colours[k % len(colours)]
        points = [xy(budgets.index(b), curve[b]["concept_match"]) for b in sorted(curve)]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for b in sorted(curve):
            x, y = xy(budgets.index(b), curve[b]["bleed"])
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((right + 12, top + 16 * k), name, fill=colour)
    d.text((right + 12, bottom - 28), "line: concept", fill=(170, 170, 180))
    d.text((right + 12, bottom - 14), "dots: bleed", fill=(170, 170, 180))
    return img


def main() -> None:
    # TrainLoraNode's per-step progress bar would bury the table; tqdm reads this when it is imported (below). Set
    # here, not on import: tests import this module, and the variable would silence the bars of their subprocesses.
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=("sd15", "sd3"), default="sd15", help="the toy base (main_job --family)")
    parser.add_argument("--budgets", default="25,50,100,200", help="step budgets, each a multiple of the first")
    parser.add_argument("--variants", default="example", help=f"ours, comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--train-seed", type=int, default=None, help="the training seed (default the example's)")
    parser.add_argument("--no-native", action="store_true", help="leave out ComfyUI's TrainLoraNode")
    parser.add_argument("--base-dir", type=Path, default=HERE.parent / "out" / "bench_toyworld")
    parser.add_argument("--out", type=Path, default=HERE.parent / "out", help="where the table's JSON and plot go")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run through every part of the script, for CI (seconds; its figures mean "
                             "nothing): budgets 1 and 2, four images of each dataset folder, two samples a prompt at "
                             "two sampling steps")
    args = parser.parse_args()
    if args.smoke:
        args.budgets = "1,2"
    budgets = sorted(int(b) for b in args.budgets.split(","))
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")

    from harness.comfy import setup_inprocess
    from harness.server import ComfyServer
    from main_job import lora_name, toy_base
    from safetensors.torch import save_file
    from toyworld import evaluate, world
    from toyworld.evaluate import Sampling
    from toyworld.judge import train_judge
    from toyworld.pretrain import cache_dir

    setup_inprocess()
    checkpoint = toy_base(args.family, args.seed)
    data = world.concept_dataset(cache_dir() / f"dataset-s{args.seed}", seed=args.seed)
    if args.smoke:
        data = first_images(data, args.base_dir / "smoke-dataset")
    judge = train_judge(checkpoint, args.seed)
    curves: dict[str, dict[int, dict]] = {}
    seconds: dict[str, float] = {}
    run = time.strftime("%H%M%S")
    sampling = Sampling(count=2, control_count=1, steps=2) if args.smoke else Sampling()
    with ComfyServer(args.base_dir, models={"checkpoints": [checkpoint]}) as server:
        settings = example_settings(args.family, server.object_info())
        if args.train_seed is not None:
            settings["seed"] = args.train_seed
        base = evaluate.evaluate_base(server, checkpoint.name, judge, sampling)
        base_trigger = evaluate.sample(server, checkpoint.name, [world.TRIGGER], sampling,
                                       prefix="toyworld_eval/base_trigger")[0]

        def score(name: str, budget: int, lora: Path) -> dict:
            scores = evaluate.evaluate_lora(server, checkpoint.name, lora_name(server, lora), judge, sampling,
                                            base=base, base_trigger=base_trigger,
                                            prefix=f"toyworld_eval/{name}-{budget}")
            scores.pop("files")
            print(f"  {name} at {budget}: concept {scores['concept_match']:.2f} {scores['concept']}, control "
                  f"{scores['control_match']:.2f} (base {scores['base_control_match']:.2f}), bleed "
                  f"{scores['bleed']:.2f}", flush=True)
            return scores

        for i, variant in enumerate(variants):
            changes = {"seed": settings["seed"], **(SWEEP_BASE if variant != "example" else {}), **VARIANTS[variant]}
            repeats = changes.pop("concept_repeats", 0)  # the concept folder's kohya repeats instead of the world's
            variant_data = world.concept_dataset(cache_dir() / f"dataset-s{args.seed}-r{repeats}", seed=args.seed,
                                                 repeats=repeats) if repeats else data
            files, seconds[variant] = train_ours(server, checkpoint, args.family, variant_data, f"curve{run}_{i}",
                                                 budgets, changes)
            curves[variant] = {b: score(variant, b, files[b]) for b in budgets}
        if not args.no_native:
            inputs = native_inputs(checkpoint, data["concept"], data["prior"])
            curves["native"], seconds["native"] = {}, 0.0
            for budget in budgets:
                state, took = train_native(inputs, settings, budget)
                seconds["native"] += took
                path = server.base_dir / "models" / "loras" / "bench" / f"native{run}-{budget}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(state, str(path))
                curves["native"][budget] = score("native", budget, path)
    title = (f"{args.family} toy world: concept with the trigger by steps (batch {settings['batch_size']}; the "
             f"example: rank {settings['rank']}, lr {settings['learning_rate']}; other variants: rank "
             f"{SWEEP_BASE['rank']}, lr {SWEEP_BASE['learning_rate']} unless set)")
    print(title)
    print(f"{'':20}" + "".join(f"{b:>16}" for b in budgets) + f"{'to bar':>8}{'seconds':>9}")
    for name, curve in curves.items():
        cells = "".join(f"{curve[b]['concept_match']:>7.2f}/{curve[b]['control_match']:.2f}/{curve[b]['bleed']:.2f}"
                        for b in budgets)
        reached = steps_to_concept(curve)
        print(f"{name:20}{cells}{reached or '-':>8}{seconds[name]:>9.0f}")
    print(f"(cells: concept match / control match (base {base['match']:.2f}) / bleed; 'to bar': first budget from "
          "which the concept is >= 0.8 in every part without leakage; seconds: ours is the whole prompt to the "
          "largest budget, samples included, native the sum of its runs)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = {"family": args.family, "base_seed": args.seed, "settings": settings, "budgets": budgets,
              "base": {k: v for k, v in base.items() if k != "files"},
              "sweep_base": SWEEP_BASE, "variants": {v: VARIANTS[v] for v in variants},
              "curves": curves, "seconds": seconds, "steps_to_concept": {n: steps_to_concept(c) for n, c in curves.items()}}
    (out / f"bench_toyworld_{args.family}.json").write_text(json.dumps(record, indent=2))
    plot(curves, title).save(out / f"bench_toyworld_{args.family}.png")
    print(f"written: {out / f'bench_toyworld_{args.family}.json'} and .png")


if __name__ == "__main__":
    main()
