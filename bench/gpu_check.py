"""The GPU check: the questions that matter most first, each a short run, each row written the moment it is measured.

Usage (an offline GPU machine with ComfyUI and this pack; README "Measuring on a GPU" says how to bring them):
    python bench/gpu_check.py [--budget-s 420] [--steps 8] [--out out/gpu_check.jsonl] [--only sdxl_step,...]
    python bench/gpu_check.py --smoke     # the same code on the CPU, narrow models at 64 px (a CI test)
    python bench/gpu_check.py --plan      # our memory plan for the full-size models (any machine)

Models are full size with random weights drawn on the GPU (bench/fullsize.py): SD1.5 at 512 px, SDXL at 1024 px,
Flux.1-dev with fp8 weights at 1024 px, Wan 2.1 1.3B at 480x832 x 17 frames; rank 16 on the kohya targets, bf16,
random latents and conditioning of the model's shapes. Every figure comes from one run: the steady step is the
median time between optimizer steps after the first two (a global optimizer hook, synchronised with the GPU), so
native's TrainLoraNode runs once per comparison. MFU counts the FLOPs of our planner's simulated step for the same
settings (recomputation included when checkpointing) against the GPU's dense bf16 peak.

Each row is one JSON line in --out, appended and flushed as soon as it is known; a question that would not fit the
time left is skipped with a row saying so, and one that overruns its share is stopped with a row saying that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))

import fullsize  # noqa: E402


@dataclass
class Question:
    name: str
    model: str
    seconds: float  # a guess from the first H200 run (not yet measured per question); the budget skips by it
    ask: Callable  # ask(check, model) -> None, writing its rows with check.write


class Check:
    """The run's settings, its output file, its clock against the budget, and the models built so far."""

    def __init__(self, args):
        self.args, self.smoke, self.steps = args, args.smoke, args.steps
        self.started = time.monotonic()
        self.peak = fullsize.device_peak_tflops(args.peak_tflops)
        self.results: dict[str, dict] = {}  # rows by "question/variant", for ratios between questions
        self._model: tuple[str, object] | None = None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        self._file = args.out.open("a")

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def write(self, row: dict) -> dict:
        row = {"elapsed_s": round(time.monotonic() - self.started, 1), **row}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        print(json.dumps(row), flush=True)
        return row

    def model(self, name: str):
        """The model `name` (the last one built is kept for the next question; any other is freed first)."""
        if self._model is None or self._model[0] != name:
            self._model = None
            fullsize.release()
            self._model = (name, fullsize.build_model(name, "smoke" if self.smoke else "full"))
        return self._model[1]

    def geometry(self, name: str):
        return fullsize.geometry(name, self.smoke)

    def precision(self) -> str:
        return "fp32" if self.smoke else "bf16"


def train_row(check: Check, question: str, name: str, variant: str, batch: int = 1, checkpointing: bool = False,
              **settings) -> dict:
    """Train `variant` (ours / native) on model `name` for the run's steps; its row (written)."""
    model = check.model(name)
    size, frames = check.geometry(name)
    clock = fullsize.StepClock()
    fullsize.release()
    start = time.perf_counter()
    if variant == "native":
        fullsize.train_native(model, name, size, frames, check.steps, batch, checkpointing, check.precision(), clock)
        plan = None
    else:
        trainer = fullsize.train_ours(model, name, size, frames, check.steps, batch, checkpointing, check.precision(),
                                      clock, **settings)
        plan = trainer.context.plan
    wall = time.perf_counter() - start
    row = {"question": question, "model": name, "variant": variant, "batch": batch, "checkpointing": checkpointing,
           "size": list(size), "frames": frames, "steps": check.steps, "s_per_step": wall / check.steps,
           **clock.steady(skip=2), **fullsize.peak_memory(), **settings}
    row.pop("ops_per_step", None)
    if plan is not None:
        row.update(planned_peak_gb=plan.peak / 1024**3, weights_gb=plan.weights / 1024**3,
                   resident_weights_gb=plan.resident_weights / 1024**3,
                   plan_checkpointing=plan.checkpointing, tflops_per_step=plan.flops / 1e12)
    else:  # the same model arithmetic as ours for these settings
        ours = check.results.get(f"{question}/ours")
        row["tflops_per_step"] = ours.get("tflops_per_step") if ours else None
    steady = row["steady_s_per_step"] or row["s_per_step"]
    row["images_per_s"] = batch / steady
    if row.get("tflops_per_step") and check.peak:
        row["mfu"] = row["tflops_per_step"] / steady / check.peak
    ours = check.results.get(f"{question}/ours")
    if variant == "native" and ours and ours.get("steady_s_per_step"):
        row["ours_speedup"] = steady / ours["steady_s_per_step"]
    check.results[f"{question}/{variant}"] = row
    return check.write(row)


def ours_vs_native(name: str, batch: int = 1, checkpointing: bool = False) -> Callable:
    def ask(check: Check, question: str) -> None:
        train_row(check, question, name, "ours", batch, checkpointing)
        train_row(check, question, name, "native", batch, checkpointing)
    return ask


def ours_only(name: str, checkpointing: bool = True, budget_gb: float = 0.0, compare: str | None = None,
              **settings) -> Callable:
    """Ours alone; under `budget_gb` (0 = the device's), with its step time against question `compare`'s."""
    def ask(check: Check, question: str) -> None:
        whole = check.results.get(f"{compare}/ours") if compare else None
        if check.smoke and budget_gb and whole:  # the CPU has no device budget: the plan with half the weights
            extra = {"vram_budget_gb": whole["planned_peak_gb"] - whole["resident_weights_gb"] + whole["weights_gb"] / 2}
        else:
            extra = {"vram_budget_gb": budget_gb} if budget_gb else {}
        row = train_row(check, question, name, "ours", 1, checkpointing, **extra, **settings)
        if whole and whole.get("steady_s_per_step") and row.get("steady_s_per_step"):
            check.write({"question": question, "vs": compare,
                         "step_time_ratio": row["steady_s_per_step"] / whole["steady_s_per_step"]})
    return ask


def profile(name: str, steps: int = 3) -> Callable:
    """torch.profiler over `steps` steady steps of ours: the top kernels by device time (operators by CPU time on a
    CPU), kernel launches and operators per step, GPU-busy vs wall time per step (host-bound when far apart)."""
    def ask(check: Check, question: str) -> None:
        import torch
        from torch.profiler import ProfilerActivity

        model = check.model(name)
        size, frames = check.geometry(name)
        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = torch.profiler.profile(activities=activities)
        window: dict = {}

        def on_step(index: int) -> None:
            if index == 2:
                prof.start()
                window["start"] = time.perf_counter()
            elif index == 2 + steps:
                window["wall"] = time.perf_counter() - window["start"]
                prof.stop()

        clock = fullsize.StepClock()
        clock.on_step = on_step
        fullsize.release()
        fullsize.train_ours(model, name, size, frames, 2 + steps + 1, 1, False, check.precision(), clock)
        events = prof.key_averages()
        device_time = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        if cuda:
            kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
            top = sorted(kernels, key=lambda e: getattr(e, device_time), reverse=True)[:15]
            busy = sum(getattr(e, device_time) for e in kernels) / 1e6 / steps
            launches = sum(e.count for e in events if "LaunchKernel" in e.key) / steps
            listed = [{"kernel": e.key[:120], "ms_per_step": getattr(e, device_time) / 1e3 / steps,
                       "calls_per_step": e.count / steps} for e in top]
        else:
            top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
            busy, launches = None, None
            listed = [{"operator": e.key[:120], "cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                       "calls_per_step": e.count / steps} for e in top]
        operators = sum(e.count for e in events if e.key.startswith("aten::")) / steps
        wall = window["wall"] / steps
        check.write({"question": question, "model": name, "variant": "ours", "steps_profiled": steps,
                     "wall_s_per_step": wall, "gpu_busy_s_per_step": busy,
                     "gpu_busy_share": busy / wall if busy is not None else None,
                     "kernel_launches_per_step": launches, "aten_ops_per_step": operators,
                     "cpu_s_per_step": clock.steady(skip=2)["cpu_s_per_step"], "top": listed})
    return ask


@contextlib.contextmanager
def cudnn_benchmark():
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def channels_last(check: Check, name: str):
    """The model's 4-D weights (convolutions) in channels-last memory order for the duration."""
    import torch

    model = check.model(name).model.diffusion_model
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def compile_mode(mode: str):
    from lora_foundry.training.engine import blocks
    before, blocks.COMPILE_MODE = blocks.COMPILE_MODE, mode
    try:
        yield
    finally:
        blocks.COMPILE_MODE = before


def experiment(inner: Callable, name: str, cudnn: bool = False, memory_format: bool = False,
               mode: str | None = None) -> Callable:
    """`inner` with cudnn.benchmark on, model `name`'s weights channels-last and / or blocks compiled in `mode`."""
    def ask(check: Check, question: str) -> None:
        with contextlib.ExitStack() as stack:
            if cudnn:
                stack.enter_context(cudnn_benchmark())
            if memory_format:
                stack.enter_context(channels_last(check, name))
            if mode:
                stack.enter_context(compile_mode(mode))
            inner(check, question)
    return ask


# In order of importance (issue 28): SDXL ours vs native, the step's profile, the memory goals, the other families,
# then experiments that may speed the UNet step up.
QUESTIONS = [
    Question("sdxl_step", "sdxl", 60, ours_vs_native("sdxl")),
    Question("sdxl_step_checkpointing", "sdxl", 45, ours_vs_native("sdxl", checkpointing=True)),
    Question("sdxl_profile", "sdxl", 25, profile("sdxl")),
    Question("sdxl_budget_4gb", "sdxl", 40, ours_only("sdxl", budget_gb=4.0, compare="sdxl_step_checkpointing")),
    Question("flux_fp8", "flux", 70, ours_only("flux")),
    Question("flux_fp8_budget_10gb", "flux", 50, ours_only("flux", budget_gb=10.0, compare="flux_fp8")),
    Question("flux_nf4", "flux", 50, ours_only("flux", compare="flux_fp8", base_quantization="nf4")),
    Question("sd15_batch4", "sd15", 40, ours_vs_native("sd15", batch=4)),
    Question("wan21", "wan21", 50, ours_only("wan21")),
    Question("sdxl_cudnn_benchmark", "sdxl", 40,
             experiment(ours_only("sdxl", checkpointing=False, compare="sdxl_step"), "sdxl", cudnn=True)),
    Question("sdxl_channels_last", "sdxl", 40,
             experiment(ours_only("sdxl", checkpointing=False, compare="sdxl_step"), "sdxl", cudnn=True,
                        memory_format=True)),
    Question("sdxl_compile_blocks", "sdxl", 150,
             ours_only("sdxl", checkpointing=False, compare="sdxl_step", compile_blocks=True)),
    Question("sdxl_compile_cuda_graphs", "sdxl", 150,
             experiment(ours_only("sdxl", checkpointing=False, compare="sdxl_step", compile_blocks=True),
                        "sdxl", mode="reduce-overhead")),
]
SLOW_ON_A_CPU = {"sdxl_compile_blocks", "sdxl_compile_cuda_graphs"}  # inductor compiles for minutes there


class Overrun(Exception):
    pass


def run_question(check: Check, question: Question) -> None:
    left = check.left()
    if not check.smoke and left < question.seconds:
        check.write({"question": question.name, "skipped": f"needs about {question.seconds:.0f} s, "
                                                           f"{max(left, 0):.0f} s of the budget left"})
        return
    if left <= 1:
        check.write({"question": question.name, "skipped": "the budget is spent"})
        return

    def overran(signum, frame):
        # Raised in a finalizer (garbage collection) or under a bare `except:` in the host, the exception is lost:
        # the alarm rings again until one gets through.
        signal.alarm(1)
        raise Overrun(f"stopped after {left:.0f} s, the budget's rest")

    previous = signal.signal(signal.SIGALRM, overran)
    signal.alarm(max(1, int(left)))
    try:
        question.ask(check, question.name)
    except Exception as error:  # one question that cannot run (OOM, unsupported, overrun) is a result, not the end
        signal.alarm(0)
        traceback.print_exc()
        check.write({"question": question.name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def plan_full_size(models: list[str]) -> list[dict]:
    """Our planner's peak for each full-size model (bf16 compute, rank 16 on the kohya targets, AdamW), computed
    with this machine's CPU kernels on meta weights: estimates from the simulated step, not measurements."""
    import torch
    from lora_foundry.training.engine.blocks import BlockOptions, training_blocks
    from lora_foundry.training.engine.planning import plan_memory
    from lora_foundry.training.engine.trainer import TrainingError

    cases = [("sd15", 4, False, 0), ("sd15", 1, True, 0), ("sdxl", 1, False, 0), ("sdxl", 1, True, 0),
             ("sdxl", 1, True, 4), ("sdxl", 4, True, 0), ("flux", 1, True, 0), ("flux", 1, True, 10),
             ("wan21", 1, True, 0), ("wan21", 1, True, 6)]
    rows = []
    for name in models:
        model = fullsize.meta_model(name)
        size, frames = fullsize.geometry(name)
        for case, batch, checkpointing, budget in cases:
            if case != name:
                continue
            settings = {"steps": 1, "batch_size": batch, "precision": "bf16", "gradient_checkpointing": checkpointing,
                        "vram_budget_gb": budget or 1024.0}
            trainer = fullsize.bench_trainer(model, name, size, frames, settings,
                                             {"rank": 16, "alpha": 16, "preset": "kohya"})
            trainer.data.encode_images(trainer.dataset.items)
            with torch.inference_mode(False):
                patched, _ = trainer.network.attach(model, None, mode="bypass")
                blocks = BlockOptions(checkpointing=checkpointing)
                row = {"model": name, "batch": batch, "checkpointing": checkpointing, "budget_gb": budget or None}
                try:
                    with training_blocks(patched.model.diffusion_model, blocks):
                        plan = plan_memory(trainer.run_context(patched, None, blocks, torch.bfloat16,
                                                                           device=torch.device("cpu")))
                    row.update(weights_gb=plan.weights / 1024**3, resident_gb=plan.resident_weights / 1024**3,
                               activations_gb=plan.activations / 1024**3, adapter_gb=plan.adapter / 1024**3,
                               peak_gb=plan.peak / 1024**3, checkpointing=plan.checkpointing,
                               tflops_per_step=plan.flops / 1e12, ops_per_micro_batch=plan.ops)
                except TrainingError as error:
                    row["error"] = str(error)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420, help="total seconds; questions that would not fit "
                                                                     "are skipped and listed")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first two are warm-up)")
    parser.add_argument("--only", help="comma-separated question names (default: all, in order)")
    parser.add_argument("--smoke", action="store_true", help="narrow models at 64 px on the CPU (a CI test)")
    parser.add_argument("--plan", action="store_true", help="only our memory plan for the full-size models")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--out", type=Path, default=HERE.parent / "out" / "gpu_check.jsonl")
    args = parser.parse_args()

    from harness.comfy import import_pack, setup_inprocess

    setup_inprocess(cpu=args.smoke)
    import_pack()
    import torch

    if args.plan:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(row) + "\n" for row in plan_full_size(list(fullsize.FULL))))
        print(f"written {args.out}")
        return
    check = Check(args)
    check.write({"question": "device", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                 "torch": torch.__version__, "cuda": torch.version.cuda, "peak_tflops": check.peak,
                 "budget_s": args.budget_s, "steps": args.steps, "smoke": args.smoke})
    wanted = set(args.only.split(",")) if args.only else None
    for question in QUESTIONS:
        if wanted is None or question.name in wanted:
            run_question(check, question)
    check.write({"question": "done", "total_s": round(time.monotonic() - check.started, 1)})


if __name__ == "__main__":
    main()
