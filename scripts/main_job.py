"""The main job: a real ComfyUI server with Lora Foundry, training the toy world's example workflow, measured.

Usage: .venv/bin/python scripts/main_job.py [--family sd15|sd3] [--checkpoint PATH --dataset DIR [--reg DIR]]
                                            [--steps N] [--no-prior] [--preservation CLASS ...] [--preserve-world N]
                                            [--blank-preservation W | --slider] [--serve]

Without arguments it uses the embedded default, the toy world: a tiny SD1.5-layout base model that
our own script pretrains on a CPU (cached in .cache/toyworld/, ~6 minutes the first time; `--family sd3`:
a flow-matching MMDiT detected as SD3, ~3 minutes), a
dataset of a new concept (a yellow plus on teal, captioned with the trigger word "sks") and prior
images from the toy world. It queues the family's example workflow (train_lora_before_after.json: 50 steps;
--family sd3: train_lora_before_after_sd3.json, 100 steps), then samples the base and the LoRA on
the trigger and on control prompts through the server, scores them with the toy world's judge and
prints where the LoRA, the loss graph, the before/after grids and the scores are.
--checkpoint / --dataset train a real model on your images instead (use a GPU for real checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from harness.comfy import REPO_ROOT
from harness.server import ComfyServer

# Each toy world's example: the same workflow with the recipe that learns its concept soonest (bench_toyworld.py).
EXAMPLES = {"sd15": REPO_ROOT / "example_workflows" / "train_lora_before_after.json",
            "sd3": REPO_ROOT / "example_workflows" / "train_lora_before_after_sd3.json"}
SLIDER_EXAMPLE = REPO_ROOT / "example_workflows" / "train_slider_lora.json"
DATASET_NAME = "lora_dataset"
SLIDER_DATASET_NAME = "slider_images"
PRIOR_NAME = "lora_prior"


def example_workflow(checkpoint_name: str, object_info: dict, steps: int | None = None,
                     path: Path = EXAMPLES["sd15"], reg_folder: str = "") -> dict:
    """The example training workflow pointed at `checkpoint_name` (and `steps`, `reg_folder`, when given); widgets are
    found by name in the server's `object_info`."""
    from harness.examples import set_widget

    changes = {"CheckpointLoaderSimple": {"ckpt_name": checkpoint_name}, "LoraFoundryLoadDataset": {
        "reg_folder": reg_folder}, "LoraFoundryTrainLoRA": {} if steps is None else {"steps": steps}}
    workflow = json.loads(path.read_text())
    for node in workflow["nodes"]:
        for name, value in changes.get(node["type"], {}).items():
            if not set_widget(node, object_info[node["type"]], name, value):
                raise ValueError(f"{path.name}: node {node['id']} ({node['type']}) has no {name} widget")
    return workflow


def install_dataset(server: ComfyServer, dataset: Path, name: str = DATASET_NAME) -> None:
    """Make `dataset` the server's input/<name> folder (a link: nothing is copied or changed)."""
    target = server.base_dir / "input" / name
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(dataset.resolve(), target_is_directory=True)


def run_example(server: ComfyServer, checkpoint: Path, dataset: Path, steps: int | None = None,
                timeout: float = 1800, reg: Path | None = None, settings: dict | None = None,
                slider: bool = False, family: str = "sd15") -> dict:
    """Queue `family`'s example training workflow (with Train LoRA's `settings` changed, e.g. preservation_class;
    the slider example with `slider`); returns {"lora", "loss_graph", "before", "after", "summary"}."""
    from harness.workflow import to_api_prompt

    install_dataset(server, dataset, SLIDER_DATASET_NAME if slider else DATASET_NAME)
    if reg is not None:
        install_dataset(server, reg, PRIOR_NAME)
    info = server.object_info()
    workflow = example_workflow(checkpoint.name, info, steps, SLIDER_EXAMPLE if slider else EXAMPLES[family],
                                reg_folder=PRIOR_NAME if reg is not None else "")
    if settings:
        workflow = to_api_prompt(workflow, info)
        train = next(n for n in workflow.values() if n["class_type"] == "LoraFoundryTrainLoRA")
        train["inputs"].update(settings)
    outputs = server.run(workflow, timeout=timeout)
    by_prefix: dict[str, list[Path]] = {}
    for path in server.output_files(outputs):
        by_prefix.setdefault(path.name.rsplit("_", 2)[0], []).append(path)
    texts = [str(t) for out in outputs.values() for t in out.get("text", [])]
    lora = [Path(t) for t in texts if t.endswith(".safetensors")]
    return {
        "lora": lora[0] if lora else None,
        "loss_graph": by_prefix.get("loss_graph", []),
        "before": by_prefix.get("before", []),
        "after": by_prefix.get("after", []),
        "summary": [t for t in texts if not t.endswith(".safetensors")],
        "outputs": outputs,
    }


def lora_name(server: ComfyServer, lora: Path) -> str:
    """The name LoraLoader knows a file in the server's models/loras by."""
    return Path(lora).resolve().relative_to((server.base_dir / "models" / "loras").resolve()).as_posix()


TOY_BASES = {"sd15": "toyworld.pretrain", "sd3": "toyworld.flow"}


def toy_base(family: str, seed: int = 0) -> Path:
    """The toy world's base checkpoint of `family`, pretrained now unless cached."""
    from importlib import import_module

    return import_module(TOY_BASES[family]).pretrain(seed, log=lambda m: print(m, flush=True))


def measure(server: ComfyServer, checkpoint: Path, lora: Path, out_dir: Path, seed: int = 0) -> dict:
    """Score the base and the LoRA with the toy world's judge; write the before/after grids and scores."""
    from toyworld import evaluate, world
    from toyworld.judge import train_judge

    judge = train_judge(checkpoint, seed)
    base = evaluate.evaluate_base(server, checkpoint.name, judge)
    scores = evaluate.evaluate_lora(server, checkpoint.name, lora_name(server, lora), judge, base=base)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = scores.pop("files")
    rows = [3, 5, 8]  # three control prompts, one per shape
    labels = [world.TRIGGER] + [evaluate.CONTROL_PROMPTS[i] for i in rows]
    grids = {
        "before_grid": evaluate.grid([files["base_trigger"]] + [files["base_control"][i] for i in rows], labels),
        "after_grid": evaluate.grid([files["lora_trigger"]] + [files["lora_control"][i] for i in rows], labels),
    }
    paths = {}
    for key, img in grids.items():
        paths[key] = out_dir / f"{key}.png"
        img.save(paths[key])
    base.pop("files")
    report = {"base": base, "lora": scores, "passes": evaluate.passes(scores), "judge_accuracy": judge.accuracy}
    paths["scores"] = out_dir / "scores.json"
    paths["scores"].write_text(json.dumps(report, indent=2))
    return {"report": report, "paths": paths}


def measure_slider(server: ComfyServer, checkpoint: Path, lora: Path, out_dir: Path, seed: int = 0) -> dict:
    """Score the slider at -1, 0 and +1 with the toy world's judge; write a grid and the scores."""
    from toyworld import evaluate
    from toyworld.judge import train_judge

    judge = train_judge(checkpoint, seed)
    scores = evaluate.evaluate_slider(server, checkpoint.name, lora_name(server, lora), judge)
    report = {"slider": scores, "passes": evaluate.slider_passes(scores), "judge_accuracy": judge.accuracy}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"scores": out_dir / "slider_scores.json"}
    paths["scores"].write_text(json.dumps(report, indent=2))
    return {"report": report, "paths": paths}


def print_slider_scores(report: dict) -> None:
    for side in ("minus", "base", "plus"):
        s = report["slider"][side]
        print(f"slider {side:>5}: colour {s['colour_asked']} in {s['colour']:.2f} of samples, shape {s['shape']:.2f}, "
              f"background {s['background']:.2f}")
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["passes"].items()))


def print_scores(report: dict) -> None:
    base, lora = report["base"], report["lora"]
    print(f"base prompt-following (9 prompts x 8): colour {base['colour']:.2f}, shape {base['shape']:.2f}, "
          f"background {base['background']:.2f}, all three {base['match']:.2f}")
    concept = lora["concept"]
    print(f"LoRA with the trigger: colour {concept['colour']:.2f}, shape {concept['shape']:.2f}, "
          f"background {concept['background']:.2f} (whole concept {lora['concept_match']:.2f}); "
          f"base with the trigger: whole concept {lora['base_concept_match']:.2f}")
    print(f"control prompts, all three as asked: LoRA {lora['control_match']:.2f}, base {lora['base_control_match']:.2f}; "
          f"drawn with the concept's shape (bleed): {lora['bleed']:.2f}")
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["passes"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint instead of the embedded default")
    parser.add_argument("--dataset", type=Path, help="a folder of images + captions instead of the default")
    parser.add_argument("--reg", type=Path, help="regularisation (prior) images for --dataset")
    parser.add_argument("--steps", type=int, help="training steps (default: the example workflow's)")
    parser.add_argument("--preservation", metavar="CLASS", action="append", default=[],
                        help="train without prior images, with output preservation of CLASS (the trigger word said "
                             "as CLASS keeps the base model's prediction); again for more classes (one per sample)")
    parser.add_argument("--preserve-world", metavar="N", type=int, default=0,
                        help="toy world: output preservation of N base captions, none of them a control prompt "
                             "(each one a class: the captions are the trigger alone)")
    parser.add_argument("--preservation-weight", metavar="W", type=float, default=1.0,
                        help="how much output preservation counts (Train LoRA's preservation_weight)")
    parser.add_argument("--blank-preservation", metavar="W", type=float, default=0.0,
                        help="train without prior images, with blank prompt preservation at weight W (the empty "
                             "prompt keeps the base model's prediction)")
    parser.add_argument("--no-prior", action="store_true", help="train the example without its prior images")
    parser.add_argument("--slider", action="store_true",
                        help="train the slider example instead (purple shapes: red at +1, blue at -1) and judge it")
    parser.add_argument("--seed", type=int, default=0, help="the toy world's seed")
    parser.add_argument("--family", choices=tuple(TOY_BASES), default=None,
                        help="the toy world's base and its example: sd15 (UNet, eps; the default) or sd3 (MMDiT, "
                             "rectified flow); toy world only (its recipe, lr 4e-3 on every layer, is not for real "
                             "models)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--base-dir", type=Path, default=REPO_ROOT / "out" / "comfy")
    parser.add_argument("--serve", action="store_true", help="keep the server running afterwards (Ctrl-C stops)")
    args = parser.parse_args()

    started = time.monotonic()
    toy = args.checkpoint is None
    if args.family and not toy:
        parser.error("--family picks the toy world's base; a --checkpoint trains with the SD1.5 toy's example (set "
                     "--steps for a real model)")
    args.family = args.family or "sd15"
    if toy:
        from toyworld import world
        from toyworld.pretrain import cache_dir

        checkpoint = toy_base(args.family, args.seed)
        data = world.concept_dataset(cache_dir() / f"dataset-s{args.seed}", seed=args.seed)
        if args.preserve_world:
            args.preservation += world.preservation_prompts(args.preserve_world, args.seed)
        no_prior = args.no_prior or args.preservation or args.blank_preservation
        dataset, reg = args.dataset or data["concept"], args.reg or (None if no_prior else data["prior"])
        if args.slider:
            dataset, reg = args.dataset or world.slider_dataset(cache_dir() / f"dataset-s{args.seed}", args.seed), None
    else:
        checkpoint, dataset, reg = args.checkpoint, args.dataset, args.reg
        if dataset is None:
            parser.error("--checkpoint needs --dataset")
    # The dataset is linked into the server's input/; a link is held to the server's roots by where it leads.
    roots = [os.environ.get("LORA_FOUNDRY_ALLOWED_ROOTS", ""), *(str(Path(d).resolve()) for d in (dataset, reg) if d)]
    os.environ["LORA_FOUNDRY_ALLOWED_ROOTS"] = os.pathsep.join(r for r in roots if r)
    with ComfyServer(args.base_dir, models={"checkpoints": [checkpoint]}, port=args.port or None) as server:
        print(f"ComfyUI with Lora Foundry at {server.url} (log: {server.log_path})")
        print(f"training {checkpoint.name} on {dataset}" + (f" with prior images {reg}" if reg else "")
              + (f" with output preservation of {args.preservation}" if args.preservation else "")
              + (f" with blank prompt preservation {args.blank_preservation}" if args.blank_preservation else "")
              + " ...", flush=True)
        settings = {"preservation_class": "\n".join(args.preservation),
                    "preservation_weight": args.preservation_weight} if args.preservation else {}
        if args.blank_preservation:
            settings["blank_preservation_weight"] = args.blank_preservation
        result = run_example(server, checkpoint, dataset, args.steps, reg=reg, settings=settings, slider=args.slider,
                             family=args.family)
        print(f"trained in {time.monotonic() - started:.0f}s")
        for line in result["summary"]:
            print(f"Train LoRA: {line}")
        print(f"LoRA:       {result['lora']}")
        for key in ("loss_graph", "before", "after"):
            for path in result[key]:
                print(f"{key + ':':<11} {path}")
        if toy and args.slider and result["lora"] is not None:
            print("measuring: the slider at -1, 0 and +1 through the server, read by the judge ...", flush=True)
            measured = measure_slider(server, checkpoint, result["lora"], server.base_dir / "output" / "lora_foundry",
                                      args.seed)
            print_slider_scores(measured["report"])
            print(f"scores:      {measured['paths']['scores']}")
        elif toy and result["lora"] is not None:
            print("measuring: the base and the LoRA through the server, read by the judge ...", flush=True)
            measured = measure(server, checkpoint, result["lora"], server.base_dir / "output" / "lora_foundry",
                               args.seed)
            print_scores(measured["report"])
            for key, path in measured["paths"].items():
                print(f"{key + ':':<12} {path}")
        print(f"done in {time.monotonic() - started:.0f}s")
        if args.serve:
            print("serving; Ctrl-C stops the server")
            try:
                while server.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
