"""An exponential moving average of the adapter's parameters while it trains (kept in fp32 on the adapter's device)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class AdapterEMA:
    """shadow = decay * shadow + (1 - decay) * parameter, every `every` steps; the first update copies.

    With `warmup`, the decay of the n-th update is min(decay, (1 + n) / (10 + n)), so early, poor
    parameters fade quickly (the schedule of diffusers' EMAModel and OneTrainer).
    """

    def __init__(self, network: nn.Module, decay: float, every: int = 1, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: must be between 0 and 1 (0 = off), got {decay}")
        self.network, self.decay, self.every, self.warmup = network, decay, max(1, every), warmup
        self.shadow = {name: p.detach().float().clone() for name, p in network.named_parameters()}
        self.updates = 0

    def decay_now(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Update after optimizer step `step` when it is one of every `every`."""
        if step % self.every:
            return
        decay = 0.0 if self.updates == 0 else self.decay_now()
        for name, p in self.network.named_parameters():
            self.shadow[name].mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The network holds the averaged parameters inside the block, its own ones again after."""
        saved = {name: p.detach().clone() for name, p in self.network.named_parameters()}
        self.copy_to_network()
        try:
            yield
        finally:
            for name, p in self.network.named_parameters():
                p.copy_(saved[name])

    @torch.no_grad()
    def copy_to_network(self) -> None:
        for name, p in self.network.named_parameters():
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "_updates": torch.tensor(self.updates)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ValueError(f"the saved EMA does not match this network (missing {sorted(missing)[:5]})")
        for name in self.shadow:
            self.shadow[name] = tensors[name].to(self.shadow[name].device, torch.float32)
        self.updates = int(tensors["_updates"])
