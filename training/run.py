"""One training run from its settings: the run's folders, the network on the model, the Trainer, and the
adapter's metadata. Train LoRA and the headless command (training/headless.py) both run it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..lora_core.files import path_inside
from ..lora_core.network import LoraNetwork, NetworkConfig
from ..lora_core.settings import from_inputs
from .data.captions import CaptionOptions
from .engine.config import TrainConfig, TrainResult
from .engine.distributed import SINGLE, Processes
from .engine.sample_prompts import check_sample_prompts
from .engine.trainer import Trainer

STATES_FOLDER = "lora_foundry_runs"


@dataclass
class RunFolders:
    loras: Path  # the run's adapters: final and intermediate LoRAs, listed by every LoRA loader
    states: Path  # the resume state: not a LoRA, so never inside a loras folder
    resume: Path | None  # the state to continue, or None for a new run

    @property
    def name(self) -> str:
        return self.loras.name


def expert_name(output_name: str, expert: str) -> str:
    """The run's name; an expert's says which one it is (`my_lora_high_noise`), as ai-toolkit and musubi users name
    the two files of a Wan 2.2 LoRA."""
    suffix = "" if expert == "all" else f"_{expert}"
    return output_name if output_name.endswith(suffix) else output_name + suffix


def run_folders(loras: str, output: str, output_name: str, resume: bool) -> RunFolders:
    """Where a run writes; a new run gets fresh folders, never used ones, and `resume` needs a saved state."""
    n = 1
    while True:
        name = output_name if n == 1 else f"{output_name}_{n}"
        folders = RunFolders(path_inside(loras, name, "output_name"),
                             path_inside(output, f"{STATES_FOLDER}/{name}", "output_name"), None)
        state = folders.states / f"{folders.name}-state.safetensors"
        if resume:
            earlier = folders.loras / state.name  # where earlier versions of the pack kept it
            if not state.is_file() and not earlier.is_file():
                raise ValueError(f"resume: no saved state at {state}; train once with this output_name first")
            folders.resume = state if state.is_file() else earlier
            return folders
        if not any(f.exists() and any(f.iterdir()) for f in (folders.loras, folders.states)):
            return folders
        n += 1


ALLOWED_ROOTS = "LORA_FOUNDRY_ALLOWED_ROOTS"  # more folders a server's owner lets its users read, os.pathsep-separated


def resolve_input_folder(folder: str, setting: str = "folder", restricted: bool = True) -> Path:
    """A folder a node reads (and writes captions or latents next to): relative names inside ComfyUI's input folder;
    absolute paths only inside ComfyUI's input, output or models folders or a root listed in
    $LORA_FOUNDRY_ALLOWED_ROOTS, unless not `restricted` (a headless run, by the machine's own user)."""
    import folder_paths

    path = Path(folder.strip()).expanduser()
    if not path.is_absolute():
        if ".." in path.parts:
            raise ValueError(f"{setting}: {folder!r} leaves ComfyUI's input folder ('..'); give a folder inside it")
        path = Path(folder_paths.get_input_directory()) / path
    # A symlink (input/link -> /elsewhere) is held to the roots by where it leads, as any other path.
    if restricted and not any(_inside(path, root) for root in allowed_roots()):
        shown = path if path.resolve() == path else f"{path} (a link to {path.resolve()})"
        raise ValueError(
            f"{setting}: {shown} is outside ComfyUI's input, output and models folders, which is all a shared server "
            f"reads by default. Move the folder into {folder_paths.get_input_directory()} (and give its name), or, "
            f"as the server's owner, allow it: start ComfyUI with {ALLOWED_ROOTS}={path.resolve()} (several folders "
            f"separated by '{os.pathsep}')")
    return path


def allowed_roots() -> list[Path]:
    """ComfyUI's input, output and models folders, and the folders listed in $LORA_FOUNDRY_ALLOWED_ROOTS."""
    import folder_paths

    listed = [Path(p).expanduser() for p in os.environ.get(ALLOWED_ROOTS, "").split(os.pathsep) if p.strip()]
    return [Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory()),
            Path(folder_paths.models_dir), *listed]


def _inside(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or below it once links are resolved (a link inside a root that leads out of every
    root is outside: its owner lists where it leads in LORA_FOUNDRY_ALLOWED_ROOTS)."""
    real, real_root = path.resolve(), root.resolve()
    return real == real_root or real_root in real.parents


def settings(inputs: dict[str, Any]) -> tuple[NetworkConfig, TrainConfig]:
    """The network and training settings from node-input values (absent ones keep their defaults)."""
    check_sample_prompts(inputs.get("sample_prompts") or "")  # line numbers as typed, blank lines included
    network = from_inputs(NetworkConfig, inputs)
    return network, from_inputs(TrainConfig, inputs, captions=from_inputs(CaptionOptions, inputs))


def train(model, clip, vae, dataset, network_config: NetworkConfig, config: TrainConfig, folders: RunFolders,
          on_step: Callable[[dict], None] | None = None,
          processes: Processes = SINGLE) -> tuple[LoraNetwork, Trainer, TrainResult]:
    """Train an adapter on `model` (the settings from `settings`); the network carries its metadata afterwards."""
    with torch.inference_mode(False):
        network = LoraNetwork.create(network_config, model, clip)
        trainer = Trainer(model, clip, vae, dataset, network, config, output_dir=folders.loras, name=folders.name,
                          on_step=on_step, resume=folders.resume, state_dir=folders.states, processes=processes)
        result = trainer.run()
    network.metadata = trainer.files.metadata(result.steps)
    return network, trainer, result
