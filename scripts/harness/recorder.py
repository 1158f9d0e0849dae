"""Hooks on a diffusion model for tests: what it receives, call by call."""

from __future__ import annotations

import torch


class Recorder:
    """Records the input `x`, the timestep `t` and the keyword inputs of every real call of the diffusion model
    (what apply_model hands it); the memory plan's simulated calls on fake tensors are left out."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.model.diffusion_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(args[0], FakeTensor):
            return
        self.calls.append({"x": args[0].detach().clone(), "t": args[1].detach().clone(),
                           **{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()
                              if k not in ("transformer_options", "control")}})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
