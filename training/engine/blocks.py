"""The diffusion model's blocks while training: gradient checkpointing, and residuals added in place made safe."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.overrides import TorchFunctionMode

from ...lora_core.targets import ADAPTABLE, block_lists

INPLACE_ERROR = "modified by an inplace operation"


def model_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks the model's forward really calls, one level below its block lists.

    DiTs keep their blocks in ModuleLists and call each one. UNets keep TimestepEmbedSequential
    containers (in lists, and the middle block on its own) whose forward ComfyUI never calls: it
    iterates their layers (ResBlock, SpatialTransformer, ...), so those layers are the blocks.
    """
    items = [item for _, blocks in block_lists(diffusion_model) for item in blocks]
    items += [child for child in diffusion_model.children()  # the UNet's middle block
              if isinstance(child, torch.nn.Sequential) and type(child) is not torch.nn.Sequential]
    blocks = []
    for item in items:
        if isinstance(item, torch.nn.Sequential):
            # A bare layer (the UNet's input conv) is no block: checkpointing it saves nothing, and its forward
            # is what a bypass adapter patches.
            blocks += [layer for layer in item if any(True for _ in layer.parameters()) and
                       not isinstance(layer, ADAPTABLE)]
        else:
            blocks.append(item)
    return blocks


class OutOfPlace(torch.Tensor):
    """The residual stream of a block that adds to it in place: `x += y` (and -=, *=) makes a new tensor, itself
    OutOfPlace, and what autograd saves of it is saved as a copy.

    Some host blocks add residuals in place (Flux's and Chroma's `x += f(x)`, LTX-Video's `x.addcmul_(a, gate)`,
    whose result the block does not keep), which autograd refuses once a tensor it saved for the backward pass
    changes. A block's inputs are made OutOfPlace copies (`_convert`: the caller's tensor never changes), so the
    stream they start is summed out of place, and `saved_apart` saves a copy of each OutOfPlace tensor autograd
    keeps, so an in-place method reaches no tensor saved before it (LTX-Video fails without either). Other results
    are plain tensors: the subclass does not spread to every operator of the block, whose Python-level dispatch
    would cost the host several microseconds each. In-place writes into a slice (`x[:, a:b] += y`) of other tensors
    stay in place: a block doing that still fails, loudly.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __iadd__(self, other):
        return torch.add(self, other).as_subclass(OutOfPlace)

    def __isub__(self, other):
        return torch.sub(self, other).as_subclass(OutOfPlace)

    def __imul__(self, other):
        return torch.mul(self, other).as_subclass(OutOfPlace)


class InPlaceAsNew(TorchFunctionMode):
    """In-place arithmetic (`+=`, `-=`, `*=` and add_ / sub_ / mul_ / addcmul_) returns a new tensor instead.

    For the storage-less tensors of a simulated step (memory.simulate), which cannot be viewed as OutOfPlace:
    their values are never read, so an ignored in-place result changes nothing.
    """

    NEW = {torch.Tensor.add_: torch.add, torch.Tensor.sub_: torch.sub, torch.Tensor.mul_: torch.mul,
           torch.Tensor.addcmul_: torch.addcmul}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.NEW.get(func, func)(*args, **(kwargs or {}))


def _convert(value, cls):
    """`value` with its floating-point tensors (also inside plain tuples and lists) viewed as `cls`; as
    OutOfPlace, copies: a block's in-place method on its input must not reach the caller's tensor."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not is_fake(value):
        return value.clone().as_subclass(cls) if cls is OutOfPlace else value.as_subclass(cls)
    if type(value) in (tuple, list):
        return type(value)(_convert(v, cls) for v in value)
    return value


def saved_apart():
    """Autograd saves a copy of each OutOfPlace tensor it keeps for the backward pass, the rest as they are: an
    in-place method called on the residual stream later in the block leaves what was saved before it intact.

    Only the innermost saved-tensor hooks run, so these hand what they save on to the hooks they cover: gradient
    checkpointing's, which keep nothing in the forward pass and keep the copies when the block is recomputed."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (lambda t: t, lambda t: t)

    def pack(tensor):
        saved = tensor.clone() if type(tensor) is OutOfPlace else tensor
        return outer_pack(saved), saved._version

    def unpack(packed):
        saved, version = packed
        tensor = outer_unpack(saved)
        # Hooks take autograd's own check away: any other tensor changed in place since it was saved still fails.
        if tensor._version != version and outer is None:
            raise RuntimeError(f"a tensor the backward pass needs was {INPLACE_ERROR} after it was saved")
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


COMPILE_BACKEND = "inductor"
COMPILE_MODE: str | None = None  # torch.compile's mode; bench/gpu_check.py tries "reduce-overhead" (CUDA graphs)


@dataclass
class BlockOptions:
    checkpointing: bool = False
    out_of_place: bool = False  # switched on when a block turns out to add in place (see INPLACE_ERROR)
    compiled: bool = False  # each block's forward through torch.compile (not simulated steps, not in-place blocks)
    # Called as a checkpointed block runs forward: a context its recomputation in the backward pass runs in (the
    # adapters' strength of that forward: a concept slider's -1 pass is recomputed at -1, not at 1).
    recompute_as: Callable[[], contextlib.AbstractContextManager] | None = None


@contextlib.contextmanager
def wrapped_blocks(blocks: list[torch.nn.Module], options: BlockOptions):
    """Wrap each block's forward for the duration: checkpointed, its residual stream saved apart and/or compiled, as
    `options` say at call time."""
    import torch.utils.checkpoint as cp

    compiled: dict[int, object] = {}  # block id: its forward through torch.compile, made at first use
    previous = [vars(block).get("forward") for block in blocks]
    for block in blocks:

        def out_of_place(*args, _forward=block.forward, **kwargs):
            args = _convert(args, OutOfPlace)
            kwargs = {k: _convert(v, OutOfPlace) for k, v in kwargs.items()}
            with saved_apart():
                return _convert(_forward(*args, **kwargs), torch.Tensor)

        def run(*args, _forward=block.forward, _out_of_place=out_of_place, _key=id(block), **kwargs):
            forward = _out_of_place if options.out_of_place else _forward
            if options.compiled and not options.out_of_place and not any(
                    is_fake(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)):
                # Blocks that add in place stay eager: a compiled graph replays the mutation of its input
                # after the fact, on a tensor autograd has saved.
                if _key not in compiled:
                    compiled[_key] = torch.compile(_forward, backend=COMPILE_BACKEND, mode=COMPILE_MODE)
                forward = compiled[_key]
            if options.checkpointing:
                recompute_as = options.recompute_as
                contexts = {"context_fn": lambda: (contextlib.nullcontext(), recompute_as())} if recompute_as else {}
                return cp.checkpoint(forward, *args, use_reentrant=False, **contexts, **kwargs)
            return forward(*args, **kwargs)

        block.forward = run
    try:
        yield options
    finally:
        for block, forward in zip(blocks, previous, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def training_blocks(diffusion_model: torch.nn.Module, options: BlockOptions):
    """The diffusion model's blocks wrapped for training (see `wrapped_blocks`)."""
    return wrapped_blocks(model_blocks(diffusion_model), options)


def text_encoder_layers(encoders: list[torch.nn.Module]):
    """The layers of the text encoders being trained, their residual streams saved apart for the duration.

    The host's CLIPLayer adds its residuals in place (`x += ...`), which autograd rejects as soon
    as an earlier layer's adapter makes `x` require a gradient. Frozen encoders (T5) are left alone.
    """
    layers = [layer for encoder in encoders for module in encoder.modules()
              if isinstance(module, torch.nn.ModuleList) for layer in module]
    return wrapped_blocks(layers, BlockOptions(out_of_place=True))
