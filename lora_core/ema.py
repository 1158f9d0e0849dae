"""Post-hoc EMA: a run's saved checkpoints averaged with the weights of a power-function EMA (Karras et al., EDM2).

A power-function EMA at step T averages the parameters of every earlier step t with weight proportional to t^gamma;
its width relative to the run is sigma_rel. With checkpoints every k steps, each checkpoint stands for the k steps
up to it, so its weight is the integral of t^gamma over them; with a checkpoint at every step the average is exact.
The parameters themselves are averaged (the same tensors in every file), which is what an EMA taken while training
averages too, so this works for every algorithm.
"""

from __future__ import annotations

import glob
import math
import re
from pathlib import Path

import torch

from .files import read_safetensors

_STEP_FILE = re.compile(r"(.+)-step(\d{6,})\.safetensors")


def gamma_of(sigma_rel: float) -> float:
    """The power-function exponent of relative width sigma_rel (EDM2's eq. 3 solved for gamma)."""
    if not 0.0 < sigma_rel < 0.28:
        raise ValueError(f"ema_sigma_rel: must be between 0 and 0.28, got {sigma_rel} (EDM2 uses 0.05 - 0.2)")
    lo, hi = -0.99, 1e6  # sigma_rel falls as gamma grows: bisect
    for _ in range(200):
        mid = (lo + hi) / 2
        if math.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3))) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def power_ema_weights(steps: list[int], sigma_rel: float) -> list[float]:
    """The weight of each checkpoint (by its step, ascending): the integral of t^gamma over the steps it stands for."""
    if sorted(steps) != steps or len(set(steps)) != len(steps) or steps[0] < 1:
        raise ValueError(f"checkpoint steps must be distinct, ascending and positive, got {steps}")
    power = gamma_of(sigma_rel) + 1
    scale = steps[-1]  # integrate on t / T: the same weights, no overflow
    edges = [0.0, *(s / scale for s in steps)]
    raw = [edges[i + 1] ** power - edges[i] ** power for i in range(len(steps))]
    total = sum(raw)
    return [w / total for w in raw]


def run_checkpoints(last: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints (<name>-stepNNNNNN) saved next to `last`, one of them, up to its step."""
    match = _STEP_FILE.fullmatch(last.name)
    if match is None:
        raise ValueError(f"{last.name}: post-hoc EMA starts from one of a run's step checkpoints "
                         "(<name>-stepNNNNNN.safetensors, written with save_every); choose the last one to average to")
    name, last_step = match.group(1), int(match.group(2))
    found = []
    for path in sorted(last.parent.glob(f"{glob.escape(name)}-step*.safetensors")):
        other = _STEP_FILE.fullmatch(path.name)
        if other is not None and other.group(1) == name and 0 < int(other.group(2)) <= last_step:
            found.append((int(other.group(2)), path))
    if len(found) < 2:
        raise ValueError(f"{last.name}: post-hoc EMA needs at least two step checkpoints of run {name!r} (save_every) "
                         f"up to step {last_step}; found {len(found)}")
    return sorted(found)


def average_files(paths: list[Path], weights: list[float]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """sum_i weights_i * tensors_i over files with the same tensors; the last file's metadata."""
    total: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path, weight in zip(paths, weights, strict=True):
        tensors, metadata = read_safetensors(path)
        if total and set(tensors) != set(total):
            raise ValueError(f"{path.name}: holds other tensors than the run's other checkpoints; post-hoc EMA "
                             "averages checkpoints of one run")
        for key, value in tensors.items():
            total[key] = total.get(key, 0) + weight * value.double()
    return {k: v.to(tensors[k].dtype) for k, v in total.items()}, metadata
