"""The toy world's concept, learned by our example workflow and by ComfyUI's native TrainLoraNode.

Usage: .venv/bin/python bench/bench_toyworld.py [--family sd15|sd3] [--seed 0]

Both train on the same images (the concept, repeated as its kohya folder says, plus the prior
images) with the example workflow's steps, rank, learning rate and batch size; ours runs as the
example workflow through a real server, native in this process. Both LoRAs are then sampled through
the same server and read by the toy world's judge. Prints the scores side by side and writes them
to out/bench_toyworld.json.
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

WIDGETS = {"rank": 3, "steps": 7, "learning_rate": 8, "batch_size": 9, "seed": 13}


def example_settings() -> dict:
    from main_job import EXAMPLE

    node = next(n for n in json.loads(EXAMPLE.read_text())["nodes"] if n["type"] == "LoraFoundryTrainLoRA")
    return {name: node["widgets_values"][i] for name, i in WIDGETS.items()}


def dataset_items(concept: Path, prior: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs as Load Dataset reads the folders (kohya repeats, reg images uncaptioned or
    with their own captions), each repeated as often as one of our epochs shows it."""
    from harness.comfy import import_pack

    import_pack()
    from lora_foundry.training.data.dataset import load_dataset

    dataset = load_dataset(concept, resolution=64, min_side=32, max_side=128, bucket_step=32, reg_folder=prior)
    return [(item.path, item.caption) for item in dataset.items for _ in range(item.repeats)]


def train_native(checkpoint: Path, concept: Path, prior: Path, settings: dict) -> tuple[dict, float]:
    """ComfyUI's TrainLoraNode on the same data; returns (its LoRA state dict, seconds)."""
    import comfy.sd
    import torch
    from comfy_extras.nodes_train import TrainLoraNode
    from toyworld.pretrain import to_pixels

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    items = dataset_items(concept, prior)
    from PIL import Image

    cache: dict = {}
    latents, positive = [], []
    with torch.no_grad():  # frozen inputs: no graph back into the VAE or the text encoder
        for image, caption in items:
            if image not in cache:
                with Image.open(image) as img:
                    cache[image] = vae.encode(to_pixels([img.convert("RGB")]).permute(0, 2, 3, 1))
            if caption not in cache:  # what CLIPTextEncode gives: the pooled output too (SD3 reads it)
                cache[caption] = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            latents.append({"samples": cache[image]})
            cond, pooled = cache[caption]
            positive.append([[cond, {"pooled_output": pooled}]])
    start = time.perf_counter()
    with torch.inference_mode(False):
        out = TrainLoraNode.execute(
            model=[model], latents=latents, positive=positive, batch_size=[settings["batch_size"]],
            steps=[settings["steps"]], grad_accumulation_steps=[1], learning_rate=[settings["learning_rate"]],
            rank=[settings["rank"]], optimizer=["AdamW"], loss_function=["MSE"], seed=[settings["seed"]],
            training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[False],
            existing_lora=["[None]"])
    seconds = time.perf_counter() - start
    return {k: v.detach().clone().contiguous() for k, v in out.result[1].items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=("sd15", "sd3"), default="sd15", help="the toy base (main_job --family)")
    parser.add_argument("--base-dir", type=Path, default=HERE.parent / "out" / "bench_toyworld")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # TrainLoraNode's per-step progress bar would bury the table

    from harness.comfy import setup_inprocess
    from harness.server import ComfyServer
    from main_job import lora_name, run_example, toy_base
    from safetensors.torch import save_file
    from toyworld import evaluate, world
    from toyworld.judge import train_judge
    from toyworld.pretrain import cache_dir

    setup_inprocess()
    checkpoint = toy_base(args.family, args.seed)
    data = world.concept_dataset(cache_dir() / f"dataset-s{args.seed}", seed=args.seed)
    settings = example_settings()
    judge = train_judge(checkpoint, args.seed)
    results = {}
    with ComfyServer(args.base_dir, models={"checkpoints": [checkpoint]}) as server:
        started = time.perf_counter()
        ours = run_example(server, checkpoint, data["concept"], reg=data["prior"])
        ours_seconds = time.perf_counter() - started
        native_sd, native_seconds = train_native(checkpoint, data["concept"], data["prior"], settings)
        native_path = server.base_dir / "models" / "loras" / "bench" / "native_toy_concept.safetensors"
        native_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(native_sd, str(native_path))
        base = evaluate.evaluate_base(server, checkpoint.name, judge)
        for name, path, seconds in (("ours", ours["lora"], ours_seconds), ("native", native_path, native_seconds)):
            scores = evaluate.evaluate_lora(server, checkpoint.name, lora_name(server, path), judge, base=base,
                                            prefix=f"toyworld_eval/{name}")
            scores.pop("files")
            results[name] = {**scores, "seconds": seconds, "passes": evaluate.passes(scores)}
    print(f"toy-world concept LoRA, {settings['steps']} steps, rank {settings['rank']}, lr {settings['learning_rate']}, "
          f"batch {settings['batch_size']}, {args.family} toy base (ours: the example workflow, alpha = rank, the family's "
          "timestep sampling, min-SNR 5 on eps only, prior weight 1, one concept image held out for validation; "
          "native: TrainLoraNode, alpha 1, every layer)")
    print(f"{'':8} {'colour':>7} {'shape':>7} {'bg':>7} {'concept':>8} {'base':>6} {'control':>8} {'base ctl':>9} "
          f"{'seconds':>8}")
    for name, r in results.items():
        c = r["concept"]
        print(f"{name:8} {c['colour']:7.2f} {c['shape']:7.2f} {c['background']:7.2f} {r['concept_match']:8.2f} "
              f"{r['base_concept_match']:6.2f} {r['control_match']:8.2f} {r['base_control_match']:9.2f} "
              f"{r['seconds']:8.0f}")
    print("(seconds: ours includes the workflow's sampling and saving; timings on a shared 2-core machine)")
    out = HERE.parent / "out" / f"bench_toyworld_{args.family}.json"
    out.write_text(json.dumps({"family": args.family, "settings": settings, "results": results}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
