"""The main job: a real ComfyUI server with Lora Foundry, training the example workflow.

Usage: .venv/bin/python scripts/main_job.py [--checkpoint PATH] [--dataset DIR] [--steps N] [--serve]

Without arguments it trains on the embedded default (a generated SD1.5-layout checkpoint and
a concept dataset, both cached in .cache/), then prints where the LoRA, the loss graph and
the before/after samples are. --checkpoint / --dataset train a real model and your images
instead (use a GPU for real checkpoints). --serve keeps the server running afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from harness import fixtures
from harness.comfy import REPO_ROOT
from harness.server import ComfyServer

EXAMPLE = REPO_ROOT / "example_workflows" / "train_lora_before_after.json"
DATASET_NAME = "lora_dataset"


def example_workflow(checkpoint_name: str, steps: int | None = None, path: Path = EXAMPLE) -> dict:
    """The example training workflow pointed at `checkpoint_name` (and `steps`, when given)."""
    workflow = json.loads(path.read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = checkpoint_name
        if node["type"] == "LoraFoundryTrainLoRA" and steps is not None:
            node["widgets_values"][7] = steps
    return workflow


def install_dataset(server: ComfyServer, dataset: Path) -> None:
    """Make `dataset` the example's input/lora_dataset folder (a link: nothing is copied or changed)."""
    target = server.base_dir / "input" / DATASET_NAME
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(dataset.resolve(), target_is_directory=True)


def run_example(server: ComfyServer, checkpoint: Path, dataset: Path, steps: int | None = None,
                timeout: float = 1800) -> dict:
    """Queue the example training workflow; returns {"lora", "loss_graph", "before", "after", "summary"}."""
    install_dataset(server, dataset)
    workflow = example_workflow(checkpoint.name, steps)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint instead of the embedded default")
    parser.add_argument("--dataset", type=Path, help="a folder of images + captions instead of the default")
    parser.add_argument("--steps", type=int, help="training steps (default: the example workflow's)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--base-dir", type=Path, default=REPO_ROOT / "out" / "comfy")
    parser.add_argument("--serve", action="store_true", help="keep the server running afterwards (Ctrl-C stops)")
    args = parser.parse_args()

    checkpoint = args.checkpoint or fixtures.tiny_sd15_checkpoint()
    dataset = args.dataset or fixtures.concept_dataset()
    started = time.monotonic()
    with ComfyServer(args.base_dir, models={"checkpoints": [checkpoint]}, port=args.port or None) as server:
        print(f"ComfyUI with Lora Foundry at {server.url} (log: {server.log_path})")
        print(f"training {checkpoint.name} on {dataset} ...", flush=True)
        result = run_example(server, checkpoint, dataset, args.steps)
        print(f"done in {time.monotonic() - started:.0f}s")
        for line in result["summary"]:
            print(f"Train LoRA: {line}")
        print(f"LoRA:       {result['lora']}")
        for key in ("loss_graph", "before", "after"):
            for path in result[key]:
                print(f"{key + ':':<11} {path}")
        if args.serve:
            print("serving; Ctrl-C stops the server")
            try:
                while server.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
