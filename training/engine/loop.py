"""The step loop of a run: setup (optimizer, scheduler, the resumed state), one step, what follows a step, and how
the run stops (interrupted, out of memory, a non-finite loss) without losing the last good adapter."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time

import torch

from . import memory
from .blocks import INPLACE_ERROR
from .config import TrainingError, TrainResult
from .context import RunContext
from .ema import AdapterEMA
from .evaluation import held_out_loss
from .optim import build_optimizer, build_scheduler, parse_optimizer_args
from .state import load_state


class TrainLoop:
    """Steps from the resumed state (or 0) to the last, on the loaded model."""

    def __init__(self, run: RunContext, groups: list[dict]):
        cfg = self.config = run.config
        self.context, self.patched, self.device, self.autocast_dtype = run, run.patched, run.device, run.autocast_dtype
        self.training_step, self.files, self.processes = run.step, run.files, run.processes
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        extra = parse_optimizer_args(cfg.optimizer_args)
        self.optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay,
                                         extra.pop("betas", None), extra)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, cfg.steps, cfg.warmup_steps)
        self.params = [p for g in groups for p in g["params"]]
        self.good = [p.detach().clone() for p in self.params]  # the adapter that last gave a finite loss
        # "fp32" means no autocast, but the host computes in the base's own dtype: scale whenever that is fp16.
        patched, autocast_dtype = run.patched, run.autocast_dtype
        compute = run.compute_dtype = autocast_dtype or patched.model.manual_cast_dtype or patched.model.get_dtype()
        if compute != (autocast_dtype or torch.float32):
            logging.warning("Train LoRA: precision %s asked, but the base model computes in %s (its weights' dtype)",
                            cfg.precision, compute)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=compute == torch.float16)
        self.state = {"step": 0, "epoch": 0, "order": [], "losses": [], "validation": [], "best": None,
                      "since_best": 0}
        self.ema = AdapterEMA(run.network, cfg.ema_decay, cfg.ema_every, cfg.ema_warmup) if cfg.ema_decay else None
        if run.resume is not None:
            self.state.update(load_state(run.resume, run.network, self.optimizer, self.scheduler, self.rng,
                                         self.gen, self.ema))
            if self.state["best"] is None and self.state["validation"]:  # a state written before best was kept
                best = min(self.state["validation"], key=lambda v: v[1])
                self.state["best"] = list(best)
                self.state["since_best"] = sum(1 for step, _ in self.state["validation"] if step > best[0])
        self.good_step = self.state["step"]  # how many steps made the adapter in `good`
        self.updating = False  # inside the optimizer's update: an error there may leave the adapter half-changed
        self.backward_done = False
        self.preview = None  # the step-0 samples' grid, shown with the first report
        self.global_batch = cfg.batch_size * run.processes.world
        # What a resumed run must share with this one (state.check_resumable).
        self.state.update(run=run.identity, global_batch=self.global_batch)

    def run(self) -> TrainResult:
        import comfy.model_management as mm

        cfg, state = self.config, self.state
        activations = (torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
                       if cfg.offload_activations else contextlib.nullcontext())
        try:
            # The base model with the zero adapter, to compare with (sampled by the process that writes files).
            if state["step"] == 0 and cfg.sample_every and self.processes.writes:
                self.preview = self.sample(0)
            with activations:
                for step in range(state["step"] + 1, cfg.steps + 1):
                    if self.patience_ran_out():  # also a resumed run that had stopped early
                        logging.info("Train LoRA: no better held-out loss in %d validations; stopped at step %d "
                                     "(best: step %d)", cfg.patience, state["step"], state["best"][0])
                        break
                    mm.throw_exception_if_processing_interrupted()
                    self.after_step(step, self.step(step))
            self.save_state()
            self.finish()
        except mm.InterruptProcessingException:
            self.files.save_checkpoint(state["step"], "interrupted")
            self.save_state()
            raise
        except torch.OutOfMemoryError as error:
            raise self.out_of_memory() from error
        return TrainResult(self.context.network, state["losses"], [tuple(v) for v in state["validation"]],
                           state["step"], time.monotonic() - self.context.start, self.files.checkpoints)

    def step(self, step: int) -> float:
        """One optimizer step over grad_accum micro-batches; the step's mean loss."""
        cfg = self.config
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            loss = self.micro_batch(step, self.next_batch())
            step_loss += loss / cfg.grad_accum
        self.processes.average_gradients(self.params)
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.updating = True
        self.scaler.step(self.optimizer)
        self.updating = False
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(step)
        self.state["losses"].append(step_loss)
        self.state["step"] = step
        return step_loss

    def next_batch(self) -> list[int]:
        """The next global batch: batch_size items for each process."""
        state, cfg = self.state, self.config
        if not state["order"]:
            state["order"].extend(self.context.dataset.epoch_order(state["epoch"], cfg.seed, self.global_batch))
            state["epoch"] += 1
        return state["order"].pop(0)

    def micro_batch(self, step: int, batch: list[int]) -> float:
        """Forward and backward of this process's share of one micro-batch; stops the run on a non-finite loss,
        keeping the last good adapter. The batch's mean loss over every process."""
        cfg, processes, training_step = self.config, self.processes, self.training_step
        self.context.network.new_step()
        draws = (self.rng.getstate(), self.gen.get_state())  # what batch_loss draws from
        share = processes.share(batch)
        weight = (share[1] - share[0]) / len(batch)  # this process's part of the batch's mean
        if not weight:  # fewer items than processes: drawn like the others, nothing to compute
            training_step.draw_batch(self.patched, batch, self.rng, self.gen, "cpu", share)
            return processes.sum(0.0, self.device)
        loss = training_step.batch_loss(self.patched, batch, self.rng, self.gen, self.device, self.autocast_dtype, share)
        try:
            self.scaler.scale(loss * weight / cfg.grad_accum).backward()
        except RuntimeError as error:
            if INPLACE_ERROR not in str(error) or self.backward_done:
                raise
            # The model's blocks add residuals in place (Flux, Chroma, LTX-Video), found at the run's first backward:
            # save their residual streams apart from now on and run this micro-batch again with the same draws (the
            # adapters keep this step's), so a resumed run draws exactly what an uninterrupted one does.
            logging.info("Train LoRA: %s adds residuals in place; training saves its residual stream apart",
                         type(self.patched.model.diffusion_model).__name__)
            self.context.blocks.out_of_place = True
            self.optimizer.zero_grad(set_to_none=True)
            self.rng.setstate(draws[0])
            self.gen.set_state(draws[1])
            loss = training_step.batch_loss(self.patched, batch, self.rng, self.gen, self.device, self.autocast_dtype,
                                        share)
            self.scaler.scale(loss * weight / cfg.grad_accum).backward()
        self.backward_done = True
        # Read once the backward pass is queued, so the host never waits for the forward pass before queuing it;
        # the adapter is not changed before the optimizer's step, so what a non-finite loss stops is the same.
        total = processes.sum(loss.item() * weight, self.device)
        if not math.isfinite(total):
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.good)
            path = self.files.save_checkpoint(self.good_step, "last-good", finite_only=True)
            kept = (f"The last adapter that gave a finite loss (step {self.good_step}) is kept at {path}"
                    if path is not None or self.files.output_dir is None or not processes.writes else
                    f"No adapter is kept: the one of step {self.good_step} has NaN or infinite values (check alpha "
                    "and the learning rate)")
            raise TrainingError(f"loss became {total} at step {step}; training stopped. {kept}. Lower the learning "
                                "rate or use fp32/bf16.")
        with torch.no_grad():
            torch._foreach_copy_(self.good, self.params)
        self.good_step = self.state["step"]
        return total

    def after_step(self, step: int, step_loss: float) -> None:
        """Validation, intermediate files, and the step's report (with a preview) to the node."""
        run, cfg, validation = self.context, self.config, self.state["validation"]
        if cfg.validation_every and run.dataset.validation and (
                step % cfg.validation_every == 0 or step == cfg.steps):
            validation.append((step, held_out_loss(run.step, run.network, self.patched, self.device)))
            self.track_best(step, validation[-1][1])
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps or self.patience_ran_out()):
            self.files.save_checkpoint(step)  # the last step's too: post-hoc EMA averages up to the end
            if step < cfg.steps:
                self.save_state()
        preview, self.preview = self.preview, None
        if cfg.sample_every and self.processes.writes and (
                step % cfg.sample_every == 0 or step == cfg.steps or self.patience_ran_out()):
            preview = self.sample(step)  # files even without a node
        if run.on_step is None:
            return
        elapsed = time.monotonic() - run.start
        run.on_step({"step": step, "total": cfg.steps, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0],
                         "validation": validation[-1][1] if validation else None, "elapsed": elapsed,
                         "eta": elapsed / step * (cfg.steps - step),
                         "memory_gb": round(run.plan.peak / memory.GB, 2) if run.plan else None,
                         "best": self.state["best"], "stopped_early": self.patience_ran_out(),
                         "preview": preview})

    def track_best(self, step: int, loss: float) -> None:
        """Remember the lowest held-out loss (and with keep_best, save that adapter as <name>-best)."""
        best = self.state["best"]
        if best is None or loss < best[1]:
            self.state["best"], self.state["since_best"] = [step, loss], 0
            if self.config.keep_best:
                self.files.save_checkpoint(step, "best")
        else:
            self.state["since_best"] += 1

    def patience_ran_out(self) -> bool:
        return bool(self.config.patience) and self.state["since_best"] >= self.config.patience

    def finish(self) -> None:
        """The moving average at the end of the run: saved as <name>-ema beside the adapter, or made the adapter."""
        if self.ema is None:
            return
        if self.config.ema_output == "instead":
            self.ema.copy_to_network()
        else:
            with self.ema.swapped_in():
                self.files.save_checkpoint(self.state["step"], "ema")

    def save_state(self) -> None:
        self.files.save_state(self.optimizer, self.scheduler, self.state, self.rng, self.gen, self.ema)

    def sample(self, step: int):
        """The previews at `step` (None without sample prompts)."""
        previews = self.context.previews
        return previews.at_step(self.patched, step) if previews is not None else None

    def out_of_memory(self) -> TrainingError:
        """The error for a device OOM, after keeping the adapter of the last finished step."""
        if self.updating:  # the update stopped half-way: back to the adapter it started from
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.good)
        plan = self.context.plan
        path = self.files.save_checkpoint(self.state["step"], "last-good", finite_only=True)
        return TrainingError(f"out of device memory at step {self.state['step'] + 1} ({plan.describe()}); the adapter "
                             f"of the last finished step is kept at {path}. To fit: {plan.hint()}")
