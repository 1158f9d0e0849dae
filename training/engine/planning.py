"""The run's device memory, planned before step 1 from one simulated micro-batch (see memory.simulate)."""

from __future__ import annotations

import contextlib
import logging
import random

import torch

from . import memory
from .blocks import INPLACE_ERROR, InPlaceAsNew
from .config import TrainingError
from .context import RunContext
from .optim import STATE_FLOATS


def plan_memory(run: RunContext) -> memory.MemoryPlan:
    """The run's device memory, from a simulated micro-batch; checkpointing is turned on when the weights must
    stream from RAM. Fails with what to change when even streaming every weight would not fit."""
    cfg, blocks, patched = run.config, run.blocks, run.patched
    budget = memory.device_budget(run.device, cfg.vram_budget_gb)
    # fp32 parameters, the last-good copy and the optimizer's state; gradients are in the simulation.
    adapter = run.network.num_params() * 4 * (2 + STATE_FLOATS[cfg.optimizer])
    encoders = run.train_clip.patcher.model_size() if run.train_clip is not None else 0

    def plan() -> memory.MemoryPlan:
        activations, flops, ops = simulate_step(run)
        return memory.MemoryPlan(patched.model_size() - run.quantized, adapter + encoders, activations, budget,
                                 blocks.checkpointing, flops, ops)

    result = plan()
    if budget is not None and result.total > budget and not blocks.checkpointing:
        blocks.checkpointing = True
        result = plan()
    logging.info("Train LoRA: %s", result.describe())
    if not result.fits:
        raise TrainingError(f"this run does not fit the device: {result.describe()}. To fit: {result.hint()}")
    return result


def simulate_step(run: RunContext) -> tuple[int, int, int]:
    """Peak device bytes, FLOPs and operators of one micro-batch of the largest bucket (forward and backward),
    counted on storage-less tensors; zeros when the model does something the simulation cannot follow."""
    step, patched, blocks, device, autocast_dtype = run.step, run.patched, run.blocks, run.device, run.autocast_dtype
    items = run.dataset.items
    largest = max(range(len(items)), key=lambda i: items[i].bucket[0] * items[i].bucket[1] * items[i].frame_count)
    # The model's sampling schedule stays real: timesteps are drawn from its values.
    modules = [patched.model.diffusion_model, run.network] + [p.model for p in run.patchers[1:]]

    # Output preservation and concept sliders keep more graphs of the same size until the backward pass.
    graphs = step.graphs()
    # Drawn and prepared on the CPU: the simulation puts every tensor on `device` itself.
    x0, noise, sigma, captions, geometries, weights, values = step.draw_batch(
        patched, [largest] * run.config.batch_size, random.Random(0), torch.Generator().manual_seed(0), "cpu")
    if run.train_clip is None:  # host code that reads values (attention masks) runs on real tensors
        inputs = step.model_call(patched, x0, noise, sigma, step.text.conditioning(captions, "cpu", values),
                                 geometries)

        def micro_batch(x, inputs, x0, sigma, weights):
            loss = sum(step.prediction_loss(patched, x, x0, sigma, inputs, weights, autocast_dtype)
                       for _ in range(graphs))
            loss.backward()

        args = (*inputs, x0, sigma, weights)
    else:
        def micro_batch(x0, noise, sigma, weights):
            conditioning = step.text.conditioning(captions, device, values)
            loss = sum(step.loss(patched, x0, noise, sigma, conditioning, geometries, weights, autocast_dtype)
                       for _ in range(graphs))
            loss.backward()

        args = (x0, noise, sigma, weights)

    run.network.eval()  # no dropout draws: training's random choices stay as they are
    in_place = InPlaceAsNew if blocks.out_of_place else contextlib.nullcontext
    try:
        with memory.adapters_in_place(run.patchers), encoders_left_alone(run.train_clip):
            try:
                with in_place():
                    return memory.simulate(modules, device, micro_batch, *args)
            except RuntimeError as error:
                if INPLACE_ERROR not in str(error) or blocks.out_of_place:
                    raise
                logging.info("Train LoRA: %s adds residuals in place; training saves its residual stream apart",
                             type(patched.model.diffusion_model).__name__)
                blocks.out_of_place = True
                with InPlaceAsNew():
                    return memory.simulate(modules, device, micro_batch, *args)
    except Exception as error:  # the plan is advice: a model the simulation cannot run still trains
        logging.warning("Train LoRA: no memory estimate (a simulated step failed: %s)", error)
        return 0, 0, 0
    finally:
        run.network.train()


@contextlib.contextmanager
def encoders_left_alone(train_clip):
    """The trained text encoders do not ask the host to load them: in a simulated step their weights are fakes."""
    if train_clip is None:
        yield
        return
    train_clip.load_model = lambda: train_clip.patcher
    try:
        yield
    finally:
        del train_clip.load_model
