"""Our training step vs ComfyUI's native TrainLoraNode: same model, data, rank, LR, dtype, batch.

Usage: .venv/bin/python bench/bench_train.py [--steps 40] [--rank 8] [--batch 2] [--lr 1e-3] [--repeat 2] [--smoke]

Each variant runs in its own process so peak memory (max RSS) is its own. Reports seconds
per step (the whole run over its steps, setup and our memory plan included; and the steady step, the median time
between optimizer steps after the first two), peak RSS and the held-out denoising loss (the model's native eps objective at fixed
noise levels and seeds) of the base model and of each trained adapter, plus ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))


def setup(args):
    import torch
    from harness import fixtures
    from harness.comfy import import_pack, setup_inprocess

    setup_inprocess()
    import_pack()
    import comfy.samplers  # noqa: F401 - loaded in any ComfyUI process; its first import (~2 s) is no training cost
    import comfy.sd
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(fixtures.tiny_sd15_checkpoint()))
    dataset = load_dataset(fixtures.concept_dataset(), resolution=64, min_side=64, max_side=64, bucket_step=64,
                           validation_split=0.2, seed=0)
    config = TrainConfig(steps=args.steps, batch_size=args.batch, learning_rate=args.lr, seed=0, grad_clip=0,
                         weight_decay=0.01, precision=args.precision)
    with torch.inference_mode(False):
        alpha = args.alpha if args.alpha is not None else float(args.rank)
        network = LoraNetwork.create(NetworkConfig(rank=args.rank, alpha=alpha, preset="all", seed=0), model)
        trainer = Trainer(model, clip, vae, dataset, network, config)
        trainer.data.encode_images(dataset.items)
        trainer.data.encode_images(dataset.validation, validation=True)
        trainer.text.encode_fixed(dataset.items, dataset.validation)
    return trainer


def held_out(trainer, patched) -> float:
    import comfy.model_management as mm
    import torch
    from lora_foundry.training.engine.evaluation import held_out_loss

    mm.load_models_gpu([patched], force_full_load=True)
    with torch.inference_mode(False):
        return held_out_loss(trainer.step, trainer.network, patched, patched.load_device)


def run_ours(trainer) -> dict:
    from fullsize import StepClock
    from lora_foundry.lora_core.apply import apply_lora

    start = time.perf_counter()
    with StepClock() as clock:
        result = trainer.run()
    seconds = time.perf_counter() - start
    patched, _, _ = apply_lora(trainer.model, None, result.network.state_dict_kohya(), 1.0, 0.0)
    return {"seconds": seconds, "steady": clock.steady(skip=2)["steady_s_per_step"],
            "held_out": held_out(trainer, patched), "params": result.network.num_params()}


def run_native(trainer, args) -> dict:
    import torch
    from comfy_extras.nodes_train import TrainLoraNode
    from fullsize import StepClock

    items = trainer.dataset.items
    latents = [{"samples": trainer.data.latents.get(i)[None]} for i in range(len(items))]
    positive = [trainer.text.encode(trainer.text.fixed_caption(item)) for item in items]
    start = time.perf_counter()
    with torch.inference_mode(False), StepClock() as clock:
        out = TrainLoraNode.execute(
            model=[trainer.model], latents=latents, positive=positive, batch_size=[args.batch], steps=[args.steps],
            grad_accumulation_steps=[1], learning_rate=[args.lr], rank=[args.rank], optimizer=["AdamW"],
            loss_function=["MSE"], seed=[0], training_dtype=[args.precision], lora_dtype=[args.precision], algorithm=["LoRA"],
            gradient_checkpointing=[False], existing_lora=["[None]"])
    seconds = time.perf_counter() - start
    patched, lora_sd = out.result[0], out.result[1]
    return {"seconds": seconds, "steady": clock.steady(skip=2)["steady_s_per_step"],
            "held_out": held_out(trainer, patched), "params": sum(v.numel() for v in lora_sd.values())}


def child(args) -> None:
    trainer = setup(args)
    if args.variant == "base":
        result = {"held_out": held_out(trainer, trainer.model)}
    elif args.variant == "ours":
        result = run_ours(trainer)
    else:
        result = run_native(trainer, args)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: our autocast (fp32 adapter) vs native's bf16 training and bf16 LoRA, its defaults")
    parser.add_argument("--alpha", type=float, help="our alpha (default: rank, our node's default; native uses 1)")
    parser.add_argument("--variant", choices=("base", "ours", "native"))
    parser.add_argument("--repeat", type=int, default=1,
                        help="run native and ours alternately this many times; the fastest run of each counts")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run through every part of the script, for CI (seconds; its figures mean "
                             "nothing)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rank, args.repeat = 4, 2, 1
    if args.variant:
        return child(args)
    results: dict[str, dict] = {}
    for variant in ("base", *(("native", "ours") * args.repeat)):
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--rank", str(args.rank),
               "--batch", str(args.batch), "--lr", str(args.lr), "--precision", args.precision] + (["--alpha", str(args.alpha)] if args.alpha else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        if variant not in results or result["seconds"] < results[variant]["seconds"]:
            results[variant] = result
    ours, native = results["ours"], results["native"]
    print(f"fixture SD1.5-layout UNet (25.8M), 64 px, rank {args.rank}, batch {args.batch}, {args.steps} steps, "
          f"lr {args.lr}, our alpha {args.alpha or args.rank} (native: 1), {args.precision}, CPU; targets: every Linear/Conv layer (native trains biases and norms too)")
    print(f"{'':10} {'s/step':>8} {'steady':>8} {'peak RSS MB':>12} {'held-out loss':>14} {'params':>10}")
    print(f"{'base':10} {'':>8} {'':>8} {results['base']['max_rss_mb']:12.0f} {results['base']['held_out']:14.4f}")
    for name in ("native", "ours"):
        r = results[name]
        steady = f"{r['steady']:8.3f}" if r["steady"] is not None else f"{'-':>8}"  # fewer than 4 steps: none
        print(f"{name:10} {r['seconds'] / args.steps:8.3f} {steady} {r['max_rss_mb']:12.0f} {r['held_out']:14.4f} "
              f"{r['params']:10,}")
    steady_ratio = ours["steady"] / native["steady"] if ours["steady"] and native["steady"] else float("nan")
    print(f"ratios ours/native: time {ours['seconds'] / native['seconds']:.2f}, "
          f"steady step {steady_ratio:.2f}, "
          f"peak RSS {ours['max_rss_mb'] / native['max_rss_mb']:.2f}, held-out loss {ours['held_out'] / native['held_out']:.3f}")


if __name__ == "__main__":
    main()
