"""Device memory while training: the plan made before step 1, and loading the model to fit it.

The activation part of the plan is not a formula: one training micro-batch (forward, backward) runs
under torch's FakeTensorMode, where every tensor has its real shape and dtype but no storage, and the
bytes alive at each moment are counted. That is exact for whatever the model does (any family,
checkpointing, autocast, fp8 casts) and costs no device memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

GB = 1024**3


class StepCounter(TorchDispatchMode):
    """Counts the bytes of storages that tensors made inside it keep alive (and their peak), the FLOPs
    of its matrix products and convolutions (torch's own FLOP formulas, from the shapes), and the operators
    dispatched (each one a kernel launch or a view on a GPU)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.flops = 0
        self.ops = 0
        self._users: dict[int, list[int]] = {}  # storage id: [tensors using it, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        flops = flop_registry.get(func._overloadpacket)
        if flops is not None:
            self.flops += flops(*args, **(kwargs or {}), out_val=out)
        inputs = None
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._users:
                    if inputs is None:
                        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                                  if isinstance(t, torch.Tensor)}
                    if key in inputs:  # a view of a tensor made before (a parameter, an input): no new memory
                        continue
                    self._users[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self._users[key][0] += 1
                weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        users = self._users[key]
        users[0] -= 1
        if users[0] == 0:
            self.live -= users[1]
            del self._users[key]


def simulate(modules: list[torch.nn.Module], device: torch.device, step: Callable, *inputs) -> tuple[int, int, int]:
    """Peak bytes that `step(*inputs)` allocates on `device`, the FLOPs it computes and the operators it dispatches,
    from a run in which every
    parameter and buffer of `modules`, and every tensor in `inputs`, is a storage-less fake on `device` (the
    modules' own tensors are restored afterwards). Real tensors need not be on `device`, nor have storage (meta)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(tensor):
        if not isinstance(tensor, torch.Tensor):
            return tensor
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)

    originals = []
    every = list({id(m): m for root in modules for m in root.modules()}.values())
    try:
        with mode:
            for module in every:
                # A host forward that moves one of its modules where it already is (HunyuanVideo 1.5's
                # `cond_type_embedding.to(txt.device)`) changes nothing, but torch cannot move storage-less parameters.
                module.to = functools.partial(_stays_where_it_is, module)
                for store in (module._parameters, module._buffers):
                    for name, tensor in list(store.items()):
                        if tensor is None:
                            continue
                        originals.append((store, name, tensor))
                        store[name] = torch.nn.Parameter(fake(tensor), tensor.requires_grad) \
                            if isinstance(tensor, torch.nn.Parameter) else fake(tensor)
            inputs = tree_map(fake, inputs)
            counter = StepCounter()
            with counter:
                step(*inputs)
    finally:
        for store, name, tensor in originals:
            store[name] = tensor
        for module in every:
            vars(module).pop("to", None)
    return counter.peak, counter.flops, counter.ops


def _stays_where_it_is(module: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    tensors = [*module.parameters(), *module.buffers()]
    if dtype is None and device is not None and all(t.device == device for t in tensors):
        return module
    return torch.nn.Module.to(module, *args, **kwargs)


@contextlib.contextmanager
def adapters_in_place(patchers: list):
    """The clones' adapters in their layers without loading any weight (the host does that at load time):
    object patches (bypass) applied, weight wrappers set as each layer's weight function."""
    wrapped, patched = [], []
    try:
        for patcher in patchers:
            patched.append(patcher)
            patcher.patch_model(load_weights=False)
            for key, functions in patcher.weight_wrapper_patches.items():
                layer = patcher.model.get_submodule(key.rsplit(".", 1)[0])
                layer.weight_function = list(functions)
                wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            layer.weight_function = []
        for patcher in patched:
            patcher.unpatch_model(unpatch_weights=False)


@dataclass
class MemoryPlan:
    """Bytes a training run needs on its device, by part, and what it may use."""

    weights: int  # the base model's weights
    adapter: int  # adapter parameters, last-good copy and optimizer state (and text encoders being trained)
    activations: int  # peak of one micro-batch's forward and backward (gradients included), simulated
    budget: int | None  # what the run may use; None: no limit known (the CPU)
    checkpointing: bool
    flops: int = 0  # of one micro-batch's forward and backward, counted in the same simulation
    ops: int = 0  # operators that micro-batch dispatches, counted in the same simulation

    @property
    def estimated(self) -> bool:
        """Whether the simulated step ran (else the activations are unknown, not zero)."""
        return self.flops > 0

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations

    @property
    def resident_weights(self) -> int:
        """Weights kept on the device; the rest stays in RAM and is streamed block by block."""
        if self.budget is None:
            return self.weights
        return max(0, min(self.weights, self.budget - self.adapter - self.activations))

    @property
    def fits(self) -> bool:
        """Whether it fits, streaming weights if need be (at least a tenth of them stays resident)."""
        return self.budget is None or self.adapter + self.activations + self.weights // 10 <= self.budget

    def describe(self) -> str:
        if not self.estimated:
            return f"no estimate of the activations; weights {gb(self.weights)}, adapter + optimizer {gb(self.adapter)}"
        parts = (f"weights {gb(self.weights)} ({gb(self.resident_weights)} resident), "
                 f"adapter + optimizer {gb(self.adapter)}, activations {gb(self.activations)}")
        limit = f" of a {gb(self.budget)} budget" if self.budget is not None else ""
        return f"estimated peak {gb(self.peak)}{limit}: {parts}"

    @property
    def peak(self) -> int:
        return self.resident_weights + self.adapter + self.activations

    def hint(self) -> str:
        """What to change so that the run fits, most effective first."""
        steps = []
        if not self.checkpointing:
            steps.append("turn gradient_checkpointing on")
        steps += ["lower batch_size (grad_accum keeps the effective batch)",
                  "load the model with an fp8 weight_dtype (Load Diffusion Model)",
                  "train at a lower dataset resolution",
                  "raise vram_budget_gb if the GPU has more free memory"]
        return "; ".join(steps)


def gb(size: int) -> str:
    return f"{size / GB:.3g} GB"


def device_budget(device: torch.device, budget_gb: float) -> int | None:
    """Bytes the run may use on `device`: `budget_gb` if set, else the device's free memory (None on the CPU)."""
    import comfy.model_management as mm

    if budget_gb > 0:
        return int(budget_gb * GB)
    if device.type == "cpu":
        return None
    mm.cleanup_models_gc()
    unloadable = sum(m.model_loaded_memory() for m in mm.current_loaded_models
                     if m.device == device and m.model is not None)
    return int(mm.get_free_memory(device) + unloadable - mm.extra_reserved_memory())


def release(patchers: list) -> None:
    """Take these models (a VAE, text encoders whose outputs are cached, a run's clones) off the device, and their
    weight wrappers off the layers they share."""
    import comfy.model_management as mm

    for loaded in list(mm.current_loaded_models):
        if any(loaded.model is p for p in patchers):
            loaded.model_unload()
            mm.current_loaded_models.remove(loaded)
    for patcher in filter(None, patchers):  # the host leaves a fully loaded clone's weight wrappers on shared layers
        for key in patcher.weight_wrapper_patches:
            patcher.model.get_submodule(key.rsplit(".", 1)[0]).weight_function = []


def load(model, others: list, plan: MemoryPlan) -> bool:
    """Load the diffusion model (and `others`, whole) on the device as `plan` says: whole when it fits or no budget
    is known; when the activations are unknown, as much as the host finds room for; else with the plan's resident
    weights, the rest left in RAM for the host to stream to the device at each use. True when some weights stream."""
    import comfy.model_management as mm

    if plan.budget is None or plan.resident_weights >= plan.weights:
        mm.load_models_gpu([model, *others], force_full_load=True)
        return False
    if not plan.estimated:
        mm.load_models_gpu([model, *others])
        return bool(model.model.model_lowvram)
    if others:
        mm.load_models_gpu(others, force_full_load=True)
    mm.cleanup_models_gc()
    release([m.model for m in mm.current_loaded_models if m.model is not None and m.model.is_clone(model)])
    if model.load_device.type != "cpu":  # room for the plan: other models leave the device as the host decides
        mm.free_memory(plan.peak, model.load_device, keep_loaded=[m for m in mm.current_loaded_models
                                                                  if any(m.model is o for o in others)])
    loaded = mm.LoadedModel(model)
    loaded.model_load(max(plan.resident_weights, 1))
    mm.current_loaded_models.insert(0, loaded)
    logging.info("Train LoRA: %s of %s of weights on the device, the rest streamed from RAM at each use",
                 gb(model.loaded_size()), gb(model.model_size()))
    return bool(model.model.model_lowvram)


@contextlib.contextmanager
def synchronous_streaming(streamed: bool):
    """While weights stream for training, the host copies them on the compute stream.

    Its async offload streams let a later copy reuse a streamed weight's memory once the weight is freed, which
    in inference is after its last use; in training the backward pass still reads it then.
    """
    import comfy.model_management as mm

    previous = mm.NUM_STREAMS
    if streamed:
        mm.NUM_STREAMS = 0
    try:
        yield
    finally:
        mm.NUM_STREAMS = previous


def normal_tensors_(module: torch.nn.Module, device: torch.device) -> None:
    """Replace inference-mode parameters and buffers on `device` with equal normal tensors.

    ComfyUI loads models under torch.inference_mode(); autograd refuses to save such tensors
    for the backward pass, and every frozen layer between an adapter and the loss needs to.
    Weights the host streams from RAM are left alone (pinned by the host): each use copies them.
    """
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if torch.is_inference(param) and param.device.type == device.type:
                sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and torch.is_inference(buf) and buf.device.type == device.type:
                sub._buffers[name] = buf.clone()
