"""Training in several processes (torchrun): each optimizer step's global batch is split over the processes, the
adapters' gradients are averaged over them, and only the first process writes files.

Every process draws the whole global batch's random values (data order, captions, noise levels, noise) from the
same seeded generators and keeps its own share, so the run equals one process training the global batch at once,
and its saved state resumes under any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def writes(self) -> bool:
        """Whether this process writes files and previews (the first one does)."""
        return self.rank == 0

    def share(self, batch: list) -> tuple[int, int]:
        """[start, end) of this process's part of a global batch: parts differ by at most one item."""
        size, extra = divmod(len(batch), self.world)
        start = self.rank * size + min(self.rank, extra)
        return start, start + size + (self.rank < extra)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum every process's gradients (already weighted by its share of the batch) into each of them."""
        if self.world == 1:
            return
        import torch.distributed as dist

        # A parameter no process computed a gradient for (a module dropped this step) keeps none, as in one process:
        # the optimizer then leaves it alone instead of decaying it.
        device = params[0].device
        computed = torch.tensor([float(p.grad is not None) for p in params], device=device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([computed, *(g.reshape(-1).float() for g in grads)])
        dist.all_reduce(flat)
        anywhere = flat[:len(params)].gt(0).tolist()  # one read back, not one per parameter
        offset = len(params)
        for p, g, any_grad in zip(params, grads, anywhere, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype) if any_grad else None
            offset += g.numel()

    def sum(self, value: float, device: torch.device | str = "cpu") -> float:
        """`value` summed over the processes (a weighted loss, for the report and the finite check); `device` is
        where the backend communicates (the GPU with NCCL)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


SINGLE = Processes()


def from_environment(device: torch.device) -> Processes:
    """This process's place under torchrun (RANK / WORLD_SIZE), starting the process group for the device it trains
    on (NCCL for CUDA, gloo otherwise, also with --cpu on a GPU machine); one process without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size())
