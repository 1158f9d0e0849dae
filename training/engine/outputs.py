"""What a run writes: the adapter as kohya-compatible files into the output folder (a loras folder: they are LoRAs),
and the resume state, which is not one, into the state folder."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ...lora_core.files import write_safetensors
from ...lora_core.metadata import kohya_metadata
from ...lora_core.network import LoraNetwork
from ...lora_core.settings import ss_metadata
from ..data.dataset import Dataset
from ..data.masks import LossMasks
from .config import TrainConfig
from .state import save_state


class RunFiles:
    """The run's adapter files (with their metadata) and resume state; only the process that writes writes them."""

    def __init__(self, network: LoraNetwork, config: TrainConfig, dataset: Dataset, masks: LossMasks, model_config,
                 name: str, output_dir: Path | None, state_dir: Path | None, writes: bool = True):
        self.network, self.config, self.dataset, self.masks = network, config, dataset, masks
        self.model_config, self.name, self.writes = model_config, name, writes
        self.output_dir, self.state_dir = output_dir, state_dir
        self.checkpoints: list[Path] = []

    def metadata(self, step: int) -> dict[str, str]:
        cfg = self.config
        info = {
            **ss_metadata(cfg), **ss_metadata(cfg.captions),
            **(ss_metadata(self.network.config) if self.network.config is not None else {}),
            "ss_steps": str(step), "ss_num_train_images": str(len(self.dataset.items)),
            "ss_masked_loss": str(len(self.masks) > 0),
            "lora_foundry_dataset": _json({"masks": self.dataset.report.masks,
                                           "masked_images": self.dataset.report.masks_found,
                                           "reg_empty_prompt": self.dataset.reg_empty_prompt}),
            "lora_foundry_training": _json(asdict(cfg)),
        }
        if self.dataset.options is not None:
            info["lora_foundry_dataset_options"] = _json(self.dataset.options)
        return kohya_metadata(self.network.config, self.model_config, self.name, info, self.dataset.tag_frequency())

    @property
    def state_path(self) -> Path | None:
        return Path(self.state_dir) / f"{self.name}-state.safetensors" if self.state_dir is not None else None

    def save_state(self, optimizer, scheduler, loop, rng, gen, ema=None) -> None:
        """Write the full training state next to the checkpoints (to resume with `resume=state_path`)."""
        if self.state_path is not None and self.writes:
            save_state(self.state_path, self.network, optimizer, scheduler, loop, rng, gen, ema)

    def save_checkpoint(self, step: int, tag: str | None = None, finite_only: bool = False) -> Path | None:
        """Write the adapter as it is now into the output folder (atomic); None without a folder, and with
        `finite_only` when a value of it is NaN or infinite (no loader should list such an adapter as good)."""
        if self.output_dir is None or not self.writes:
            return None
        suffix = tag or f"step{step:06d}"
        path = Path(self.output_dir) / f"{self.name}-{suffix}.safetensors"
        tensors = self.network.state_dict_kohya()
        if finite_only and not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
            logging.warning("Train LoRA: the adapter of step %d has NaN or infinite values; %s not written", step,
                            path.name)
            return None
        write_safetensors(tensors, path, self.metadata(step))
        self.checkpoints.append(path)
        return path


def _json(value) -> str:
    return json.dumps(value, default=str)
