"""The run's context: what a run was given and what it set up before step 1, handed to the plan, the loop and the
previews instead of the trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...lora_core.network import LoraNetwork
from ..data.dataset import Dataset
from . import memory
from .blocks import BlockOptions
from .config import TrainConfig
from .distributed import Processes
from .evaluation import Previews
from .outputs import RunFiles
from .step import TrainingStep


@dataclass
class RunContext:
    config: TrainConfig
    network: LoraNetwork
    dataset: Dataset
    step: TrainingStep
    files: RunFiles
    processes: Processes
    vae: object
    patched: object  # the ModelPatcher carrying the adapters
    patchers: list  # it, and the text encoders' while they train
    blocks: BlockOptions
    device: torch.device
    autocast_dtype: torch.dtype | None
    previews: Previews | None = None
    train_clip: object = None  # the CLIP clone carrying text-encoder adapters, while they train
    plan: memory.MemoryPlan | None = None  # device memory, estimated before step 1
    streamed: bool = False  # whether some weights stream from RAM in this run
    quantized: int = 0  # device bytes the 4-bit base (base_quantization) saves on the model's weights
    compute_dtype: torch.dtype | None = None  # what the model computes in, once training runs
    on_step: Callable[[dict], None] | None = None
    resume: Path | None = None
    identity: dict = field(default_factory=dict)  # what a resumed run must share with this one
    start: float = 0.0  # when the run started (time.monotonic)

    def after_preview(self) -> None:
        """Sampling loaded the VAE and, with free memory, more of the model: back to the planned device memory."""
        memory.release([self.vae.patcher])
        if self.streamed:
            memory.load(self.patched, self.patchers[1:], self.plan)
