"""The full training state in one safetensors file (no pickle), so a run resumes exactly.

Tensors: adapter parameters, optimizer tensors, torch RNG states. Metadata: one JSON document
with the loop position, scheduler, optimizer structure and Python RNG states.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ...lora_core.files import read_safetensors, write_safetensors
from ...lora_core.info import read_header
from .config import TrainingError
from .optim import optimizer_state_from_tensors, optimizer_state_to_tensors

STATE_KEY = "lora_foundry_state"
FORMAT = 1


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(rng: random.Random, value: list) -> None:
    rng.setstate((value[0], tuple(value[1]), value[2]))


def save_state(path: Path, network, optimizer, scheduler, loop: dict, rng: random.Random,
               generator: torch.Generator, ema=None) -> Path:
    """Write everything needed to continue training exactly where it is now (with the adapter's moving average)."""
    tensors = {f"adapter.{k}": v.detach() for k, v in network.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_tensors().items()})
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer)
    tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout on CUDA draws from the device's generators
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    adapter_rngs = {n: _rng_to_json(a.rng) for n, a in network.adapters.items() if hasattr(a, "rng")}
    doc = {"format": FORMAT, "loop": loop, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
           "rng": _rng_to_json(rng), "adapter_rngs": adapter_rngs}
    return write_safetensors(tensors, path, {STATE_KEY: json.dumps(doc)})


def saved_loop(path: Path) -> dict:
    """The loop position of a saved state, read from its header alone (to check it before anything is loaded)."""
    metadata, _ = read_header(path)
    if STATE_KEY not in metadata:
        raise ValueError(f"{path}: not a Lora Foundry training state (no {STATE_KEY} metadata)")
    return json.loads(metadata[STATE_KEY])["loop"]


def load_state(path: Path, network, optimizer, scheduler, rng: random.Random, generator: torch.Generator,
               ema=None) -> dict:
    """Restore a saved state into freshly built objects of the same shape; returns the loop position."""
    tensors, metadata = read_safetensors(path)
    if STATE_KEY not in metadata:
        raise ValueError(f"{path}: not a Lora Foundry training state (no {STATE_KEY} metadata)")
    doc = json.loads(metadata[STATE_KEY])
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported training state format {doc.get('format')!r}")
    adapter = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    missing, unexpected = network.load_state_dict(adapter, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the saved adapter does not match this network "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}); resume with the same settings")
    optimizer_state_from_tensors(optimizer, {k[len("optimizer."):]: v for k, v in tensors.items()
                                             if k.startswith("optimizer.")}, doc["optimizer"])
    scheduler.load_state_dict(doc["scheduler"])
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    _rng_from_json(rng, doc["rng"])
    if ema is not None:
        saved = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not saved:
            raise ValueError(f"{path}: this run was saved without ema_decay; resume with the same settings")
        ema.load_state_tensors(saved)
    for name, value in doc["adapter_rngs"].items():
        _rng_from_json(network.adapters[name].rng, value)
    return doc["loop"]


def check_resumable(path: Path, now: dict, batch_size: int, processes: int) -> None:
    """Refuse to resume a state made with other adapters, optimizer, images or global batch, naming the setting
    that changed, from the state's header alone (a state saved before these were kept is not checked)."""
    loop, global_batch = saved_loop(path), batch_size * processes
    if loop.get("global_batch", global_batch) != global_batch:
        raise TrainingError(
            f"batch_size: this run trained {loop['global_batch']} images per micro-batch over all processes, now "
            f"{batch_size} x {processes} process(es) = {global_batch}; to resume exactly keep "
            "batch_size x processes the same")
    saved = loop.get("run")
    if not saved:
        return
    for name, value in saved.get("network", {}).items():
        if now["network"].get(name) != value:
            raise TrainingError(f"{name}: the run saved at {path} was trained with {value!r}, now "
                                f"{now['network'].get(name)!r}; set it back to resume, or turn resume off to start "
                                "a new run")
    if saved.get("optimizer") != now["optimizer"]:
        raise TrainingError(f"optimizer: the run saved at {path} used {saved.get('optimizer')}, now "
                            f"{now['optimizer']}; its state cannot continue in another optimizer")
    was, new = saved.get("dataset", {}), now["dataset"]
    if (was.get("images"), was.get("files")) != (new["images"], new["files"]):  # the folder itself may move
        raise TrainingError(f"dataset: the run saved at {path} trained on {was.get('images')} images "
                            f"({was.get('folder')}), now {new['images']} ({new['folder']}) and not the same files, "
                            "repeats or split; resume with the dataset it started with")
