"""Train a LoRA from a config file, without a graph or a server (the same engine as Train LoRA).

  .venv/bin/python scripts/train_lora.py run.toml [--dataset-config dataset.toml] [--base-directory DIR] [--cpu]
  torchrun --nproc_per_node 4 scripts/train_lora.py run.toml                       # 4 GPUs, one machine

The config is our TOML (Save Training Config writes one), a kohya sd-scripts training TOML or a kohya_ss GUI
JSON; [model] names the model files. ComfyUI is the one this pack is installed in (custom_nodes/), else
$COMFYUI_ROOT, else the one scripts/setup.sh installed; --base-directory is ComfyUI's (models/, input/, output/).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--base-directory", help="ComfyUI's base directory for models/, input/ and output/")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    known, rest = parser.parse_known_args()
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and not known.cpu:  # torchrun: each process sees its own GPU as device 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else None
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local_rank)] if devices else local_rank
    from harness.comfy import import_pack, setup_inprocess

    setup_inprocess(cpu=known.cpu)
    import comfy.cli_args

    if known.base_directory:
        if "folder_paths" in sys.modules:
            raise RuntimeError("--base-directory must be set before ComfyUI's folder_paths is imported")
        comfy.cli_args.args.base_directory = os.path.abspath(known.base_directory)
    pack = import_pack()
    from importlib import import_module

    return import_module(f"{pack.__name__}.training.headless").main(rest)


if __name__ == "__main__":
    sys.exit(main())
