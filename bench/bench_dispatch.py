"""Operators dispatched and host time per training step: our Train LoRA vs ComfyUI's native TrainLoraNode.

Usage: .venv/bin/python bench/bench_dispatch.py [--models sdxl,flux] [--steps 6] [--out out/bench_dispatch.json]

What a GPU step costs the host does not depend on the layers' widths: every operator is one dispatch (and one
kernel launch on a GPU) whatever its size. So each model is built with its full layer structure (SDXL's 3 levels and
70 transformer blocks, Flux's 19 double and 38 single blocks, every layer) at widths where the arithmetic costs
nothing, and trained on the CPU at 64 px, bf16 autocast (Flux with fp8 weights, as on a GPU), batch 1, rank 16:
- operators per step: every aten operator dispatched between two optimizer steps (a TorchDispatchMode counting
  below autograd: forward, backward, optimizer), and the ones that are not views (those launch kernels on a GPU);
- host time per step: the median wall time between optimizer steps in a second run without the counter (at these
  widths mostly host work: Python, the dispatcher, autograd; the CPU's small bf16 kernels and ComfyUI's CPU-only
  sub-quadratic attention add some).
The full-size model's operator count per micro-batch (our planner's simulated step on meta weights) is printed
beside the narrow one's, to show the structure, not the width, sets it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))


def op_counter():
    """A TorchDispatchMode counting every operator (and those that are not views) by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0
            self.kernels = 0
            self.by_name: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            if not func.is_view:
                self.kernels += 1
            self.by_name[func._overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def measure(trainer_fn, model, name: str, steps: int, checkpointing: bool, timing: bool = True) -> dict:
    """Operators per step (counted) and host time per step (a second, uncounted run) of one trainer."""
    import fullsize

    size, frames = fullsize.geometry(name, smoke=True)
    counter = op_counter()
    marks = []
    clock = fullsize.StepClock(counter)
    clock.on_step = lambda index: marks.append((counter.ops, counter.kernels, Counter(counter.by_name)))
    with counter:
        trainer_fn(model, name, size, frames, steps, checkpointing=checkpointing, clock=clock)
    fullsize.release()
    # The steady step: the last one (the first carries the plan and the optimizer's state allocation).
    (ops0, kernels0, names0), (ops1, kernels1, names1) = marks[-2], marks[-1]
    names1.subtract(names0)
    host = {"steady_s_per_step": None, "steps_timed": 0}
    if timing:
        timed = fullsize.StepClock()
        trainer_fn(model, name, size, frames, steps, checkpointing=checkpointing, clock=timed)
        fullsize.release()
        host = timed.steady(skip=2)
    return {"ops_per_step": ops1 - ops0, "kernels_per_step": kernels1 - kernels0,
            "host_s_per_step": host["steady_s_per_step"], "steps_timed": host["steps_timed"],
            "by_name": {k: v for k, v in names1.most_common() if v}}


def planned_ops(name: str, narrow: bool) -> int:
    """Operators in our planner's simulated micro-batch (forward and backward) of `name`, weights on meta."""
    import fullsize
    import torch
    from lora_foundry.training.engine.blocks import BlockOptions, training_blocks
    from lora_foundry.training.engine.planning import plan_memory

    if narrow:
        model = fullsize.build_model(name, "narrow", torch.device("cpu"))
    else:
        model = fullsize.meta_model(name)
    size, frames = fullsize.geometry(name, smoke=narrow)
    trainer = fullsize.bench_trainer(model, name, size, frames, {"steps": 1, "precision": "bf16"},
                                     {"rank": 16, "alpha": 16, "preset": "kohya"})
    trainer.data.encode_images(trainer.dataset.items)
    with torch.inference_mode(False):
        patched, _ = trainer.network.attach(model, None, mode="bypass")
        blocks = BlockOptions(checkpointing=False)
        with training_blocks(patched.model.diffusion_model, blocks):
            return plan_memory(trainer.run_context(patched, None, blocks, torch.bfloat16,
                                                       device=torch.device("cpu"))).ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sdxl,flux")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--shape", choices=("narrow", "smoke"), default="narrow",
                        help="smoke: a few blocks of each kind (a CI check of the comparison)")
    parser.add_argument("--no-plan", action="store_true", help="skip the planner's counts (narrow and full size)")
    parser.add_argument("--no-timing", action="store_true", help="count operators only (no second, timed run)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "out" / "bench_dispatch.json")
    args = parser.parse_args()

    from harness.comfy import import_pack, setup_inprocess

    setup_inprocess()
    import_pack()
    import fullsize
    import torch

    results = {}
    for name in args.models.split(","):
        model = fullsize.build_model(name, args.shape, torch.device("cpu"))
        rows = []
        for checkpointing in (False, True):
            for variant, trainer_fn in (("ours", fullsize.train_ours), ("native", fullsize.train_native)):
                row = {"model": name, "variant": variant, "checkpointing": checkpointing}
                try:
                    row.update(measure(trainer_fn, model, name, args.steps, checkpointing, not args.no_timing))
                except Exception as error:  # native cannot train Flux without checkpointing (in-place residuals)
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "by_name"}), flush=True)
        result = {"shape": args.shape, "rows": rows}
        if not args.no_plan:
            result.update(narrow_planned_ops=planned_ops(name, narrow=True),
                          full_size_planned_ops=planned_ops(name, narrow=False))
        results[name] = result
        print_table(name, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written {args.out}")


def print_table(name: str, result: dict) -> None:
    structure = "full layer structure" if result["shape"] == "narrow" else "a few blocks of each kind"
    print(f"\n{name} ({structure}, narrow widths, 64 px, bf16, batch 1, rank 16, CPU)")
    print(f"{'variant':8} {'ckpt':>5} {'ops/step':>9} {'kernels':>8} {'host ms/step':>13}")
    by_ckpt: dict = {}
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['variant']:8} {row['checkpointing']!s:>5}  error: {row['error'][:90]}")
            continue
        by_ckpt.setdefault(row["checkpointing"], {})[row["variant"]] = row
        print(f"{row['variant']:8} {row['checkpointing']!s:>5} {row['ops_per_step']:9d} {row['kernels_per_step']:8d} "
              f"{(row['host_s_per_step'] or 0) * 1000:13.1f}")
    for ckpt, pair in by_ckpt.items():
        if len(pair) == 2:
            ours, native = pair["ours"], pair["native"]
            print(f"checkpointing {ckpt}: ours/native operators {ours['ops_per_step'] / native['ops_per_step']:.2f}, "
                  f"kernels {ours['kernels_per_step'] / native['kernels_per_step']:.2f}"
                  + (f", host time {ours['host_s_per_step'] / native['host_s_per_step']:.2f}"
                     if ours["host_s_per_step"] and native["host_s_per_step"] else ""))
    if "full_size_planned_ops" in result:
        print(f"planner's simulated micro-batch, ours: {result['narrow_planned_ops']} operators narrow, "
              f"{result['full_size_planned_ops']} at full size")


if __name__ == "__main__":
    main()
