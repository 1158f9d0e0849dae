"""The main job: a real ComfyUI server with Lora Foundry loaded, on the embedded default models.

Usage: .venv/bin/python scripts/main_job.py [--port 8188] [--base-dir out/comfy] [--checkpoint PATH]
Generates the fixture checkpoint and dataset (cached), starts ComfyUI with the pack and
keeps it running until Ctrl-C. (Training the example workflow arrives with Train LoRA.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import fixtures
from harness.comfy import REPO_ROOT
from harness.server import ComfyServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-dir", type=Path, default=REPO_ROOT / "out" / "comfy")
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint to use instead of the embedded default")
    args = parser.parse_args()

    checkpoint = args.checkpoint or fixtures.tiny_sd15_checkpoint()
    dataset = fixtures.concept_dataset()
    server = ComfyServer(args.base_dir, models={"checkpoints": [checkpoint]}, port=args.port)
    with server:
        print(f"ComfyUI with Lora Foundry: {server.url}")
        print(f"checkpoint: {checkpoint}")
        print(f"dataset:    {dataset}")
        print(f"server log: {server.log_path}")
        print("Ctrl-C stops the server.")
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
