"""Mutants: one-line breaks of the mechanisms the README claims, each with the test that must catch it.

A test that still passes with its mechanism broken guards nothing. Each mutant names a line of the pack (its text,
found exactly once in its file, indentation aside), what the line becomes, and the node id of the test that must
then fail. `run` applies it to a copy of the repository and runs only that test there, in a fresh process, so the
copy's code is what the test imports; tests/test_mutants.py fails when the test passes (the mutant survived), and
when a mutant's line is no longer in its file (a stale mutant is an error, not a pass).

    .venv/bin/python tests/mutants.py [NAME ...]    # run some (or all) and print each one's time
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Not copied: environments, caches, build and test outputs (the fixtures cache is shared through the environment).
NOT_COPIED = (".venv", ".git", ".cache", ".ci", ".device", ".site", "out", "test-artifacts", "__pycache__",
              ".pytest_cache", ".ruff_cache", "*.pyc")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository
    line: str  # the line's text, without its indentation
    replacement: str  # what the line becomes (the indentation is kept)
    test: str  # the node id that must fail


MUTANTS = [
    # --- the four guards that once survived their break (issue 36) ---
    Mutant("trainer_ignores_attach", "training/engine/trainer.py",
           "patched, train_clip = self.network.attach(self.model, self.clip if train_te else None, mode=cfg.attach)",
           'patched, train_clip = self.network.attach(self.model, self.clip if train_te else None, mode="bypass")',
           "tests/test_memory.py::test_bypass_training_equals_weight_training[lokr]"),  # the quickest of the four
    Mutant("ema_decay_ignored", "training/engine/ema.py",
           "self.network, self.decay, self.every, self.warmup = network, decay, max(1, every), warmup",
           "self.network, self.decay, self.every, self.warmup = network, 0.9, max(1, every), warmup",
           "tests/test_training_features.py::test_the_moving_average_is_the_average_of_the_steps"),
    Mutant("optimizer_from_one_group", "training/engine/loop.py",
           "self.optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay,",
           'self.optimizer = build_optimizer(cfg.optimizer, [{"params": [p for g in groups for p in g["params"]]}], '
           "cfg.learning_rate, cfg.weight_decay,",
           "tests/test_training_features.py::test_block_ranks_and_learning_rates"),
    Mutant("resident_share_ignored", "training/engine/memory.py",
           "loaded.model_load(max(plan.resident_weights, 1))",
           "loaded.model_load(1)",
           "tests/test_memory.py::test_weights_stream_under_a_budget_and_train_the_same_adapter"),
    # --- the guards that held: checkpointing engaged, the mask's zero gradient, the plan against the allocator ---
    Mutant("checkpointing_never_engages", "training/engine/blocks.py",
           "if options.checkpointing:",
           "if False:",
           "tests/test_conditioning.py::test_gradient_checkpointing_engages_and_stores_less"),
    Mutant("mask_ignored", "training/data/masks.py",
           "masks = torch.stack([self.floor + (1 - self.floor) * self._masks[key] if key in self._masks else ones",
           "masks = torch.stack([self.floor + (1 - self.floor) * ones if key in self._masks else ones",
           "tests/test_training_features.py::test_masked_loss_teaches_nothing_where_the_mask_is_black"),
    Mutant("plan_simulates_no_backward", "training/engine/planning.py",
           "loss = sum(step.prediction_loss(patched, x, x0, sigma, inputs, weights, autocast_dtype)",
           "loss = sum(step.prediction_loss(patched, x, x0, sigma, inputs, weights, autocast_dtype).detach().requires_grad_()",
           "tests/test_memory.py::test_memory_plan_matches_what_a_step_allocates[checkpointed]"),
    # --- one per mechanism the README claims ---
    Mutant("bypass_adds_nothing", "lora_core/network.py",
           "return self.adapter.bypass(self.layer, x, out)",
           "return out",
           "tests/test_memory.py::test_bypass_patches_leave_with_the_clone"),
    Mutant("adapter_in_the_bases_dtype", "training/engine/trainer.py",
           "self.network.to(run.device)",
           "self.network.to(run.device, patched.model.get_dtype())",
           "tests/test_memory.py::test_training_on_an_fp8_base_leaves_it_bit_identical[e4m3fn]"),
    Mutant("weights_never_stream", "training/engine/memory.py",
           "if plan.budget is None or plan.resident_weights >= plan.weights:",
           "if True:",
           "tests/test_memory.py::test_weights_stream_under_a_budget_and_train_the_same_adapter"),
    Mutant("preview_keeps_the_hosts_residency", "training/engine/context.py",
           "memory.load(self.patched, self.patchers[1:], self.plan)",
           "pass",
           "tests/test_memory.py::test_previews_keep_the_planned_residency"),
    Mutant("ema_without_warmup", "training/engine/ema.py",
           "return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay",
           "return self.decay",
           "tests/test_training_features.py::test_the_moving_average_is_the_average_of_the_steps"),
    Mutant("post_hoc_ema_weights_not_integrated", "lora_core/ema.py",
           "raw = [edges[i + 1] ** power - edges[i] ** power for i in range(len(steps))]",
           "raw = [edges[i + 1] ** power for i in range(len(steps))]",
           "tests/test_training_features.py::test_post_hoc_ema_weights_and_average"),
    Mutant("patience_never_runs_out", "training/engine/loop.py",
           'return bool(self.config.patience) and self.state["since_best"] >= self.config.patience',
           "return False",
           "tests/test_training_features.py::test_best_checkpoint_and_early_stopping"),
    Mutant("block_lrs_ignored", "training/engine/trainer.py",
           "lr *= multipliers.get(block_of(name, layout), 1.0)",
           "lr *= 1.0",
           "tests/test_training_features.py::test_block_ranks_and_learning_rates"),
    Mutant("sdxl_size_conditioning_dropped", "training/engine/conditioning.py",
           "extras = dict(geometry.as_params()) if geometry is not None and size_conditioned(model) else {}",
           "extras = {}",
           "tests/test_families.py::test_family_gets_the_inputs_comfyui_gives_it[sdxl]"),
    Mutant("preview_not_the_prompts_seed", "training/engine/evaluation.py",
           "noise = comfy.sample.prepare_noise(latent, p.seed)",
           "noise = comfy.sample.prepare_noise(latent, p.seed + 1)",
           "tests/test_conditioning.py::test_preview_equals_ksampler_and_vae_decode"),
    Mutant("resume_loses_the_noise_generator", "training/engine/state.py",
           'generator.set_state(tensors["rng.generator"])',
           "pass",
           "tests/test_train.py::test_resume_continues_exactly"),
    Mutant("pickle_suffix_read", "lora_core/files.py",
           'if path.suffix.lower() != ".safetensors":',
           "if False:",
           "tests/test_adapter_files.py::test_pickle_files_are_never_unpickled[.ckpt-pickle]"),
    Mutant("write_not_atomic", "lora_core/files.py",
           'with open(tmp, "wb") as f:',
           'with open(path, "wb") as f:',
           "tests/test_faults.py::test_a_write_killed_half_way_leaves_the_old_file_whole"),
    Mutant("scaled_fp8_scale_ignored", "lora_core/adapters/base.py",
           "return weight * scale.to(weight) if scale is not None else weight",
           "return weight",
           "tests/test_memory.py::test_training_dora_on_a_scaled_fp8_base_leaves_it_bit_identical"),
    Mutant("dora_magnitude_from_the_raw_fp8_weight", "lora_core/adapters/base.py",
           "return weight * scale.float() if scale is not None else weight",
           "return weight",
           "tests/test_memory.py::test_training_dora_on_a_scaled_fp8_base_leaves_it_bit_identical"),
    # --- the step's host work and the GPU check (issue 28) ---
    Mutant("lora_factors_sliced", "lora_core/adapters/lora.py",
           "return self.lora_up, self.lora_down  # a Linear's whole factors: nothing to slice, reshape or mask",
           "pass",
           "tests/test_gpu_check.py::test_our_step_dispatches_fewer_operators_than_natives"),
    Mutant("residuals_summed_in_place", "training/engine/blocks.py",
           "return torch.add(self, other).as_subclass(OutOfPlace)",
           "return torch.Tensor.add_(self, other)",
           "tests/test_families.py::test_blocks_that_add_in_place_get_true_gradients[ltxv]"),
    Mutant("block_inputs_changed_in_place", "training/engine/blocks.py",
           "return value.clone().as_subclass(cls) if cls is OutOfPlace else value.as_subclass(cls)",
           "return value.as_subclass(cls)",
           "tests/test_families.py::test_blocks_that_add_in_place_get_true_gradients[ltxv]"),
    Mutant("saved_tensor_version_unchecked", "training/engine/blocks.py",
           "if tensor._version != version and outer is None:",
           "if False:",
           "tests/test_families.py::test_a_block_that_changes_another_saved_tensor_in_place_still_fails"),
    Mutant("weight_wrappers_left_on_shared_layers", "training/engine/memory.py",
           'patcher.model.get_submodule(key.rsplit(".", 1)[0]).weight_function = []',
           "pass",
           "tests/test_memory.py::test_weight_wrappers_leave_the_shared_model_with_the_run"),
    Mutant("gpu_check_runs_past_its_budget", "bench/gpu_check.py",
           "if left <= 1:",
           "if False:",
           "tests/test_gpu_check.py::test_gpu_check_stops_a_question_at_the_budget_and_skips_the_rest"),
    # --- the hostile-input refusals (issue 29) ---
    Mutant("upper_ends_unchecked", "lora_core/settings.py",
           "if (low is not None and value < low) or (high is not None and value > high):",
           "if low is not None and value < low:",
           "tests/test_hostile_inputs.py::test_every_number_past_its_range_or_not_finite_is_refused_before_the_node_runs"),
    Mutant("non_finite_adapter_kept", "training/engine/outputs.py",
           "if finite_only and not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):",
           "if False:",
           "tests/test_hostile_inputs.py::test_a_non_finite_adapter_is_never_saved_as_last_good"),
    Mutant("links_followed_out_of_the_roots", "training/run.py",
           "real, real_root = path.resolve(), root.resolve()",
           "real, real_root = Path(os.path.normpath(path.absolute())), Path(os.path.normpath(root.absolute()))",
           "tests/test_hostile_inputs.py::test_a_symlink_inside_input_is_held_to_the_allowed_roots"),
    Mutant("toy_bases_on_the_process_threads", "scripts/toyworld/pretrain.py",
           "torch.set_num_threads(count)",
           "pass",
           "tests/test_toyworld.py::test_toy_bases_and_judges_are_made_on_two_threads_whatever_the_process_uses"),
    Mutant("preservation_target_adapted", "training/engine/step.py",
           "with torch.no_grad(), self.network.at_strength(0.0):",
           "with torch.no_grad():",
           "tests/test_training_features.py::test_each_step_holds_the_class_and_the_empty_prompt_to_the_base_models_prediction"),
    Mutant("one_resolution_only", "training/data/dataset.py",
           "items = at_every_resolution(items, more)",
           "items = list(items)",
           "tests/test_training_features.py::test_multi_resolution_buckets_every_image_at_every_size"),
    Mutant("fold_misses_links", "web/js/train_view.js",
           'if (index >= 0 && typeof node.isInputConnected === "function") return node.isInputConnected(index);',
           "if (index >= 0) return false;",
           "tests/test_browser.py::test_train_node_folds_its_optional_settings_and_still_sends_them[1.58.1-classic]"),
    Mutant("info_panel_over_run_controls", "web/js/lora_info.js",
           "top = Math.max(top, r.bottom + 8);",
           "top = TOP;",
           "tests/test_browser.py::test_lora_metadata_is_shown_as_text_never_html[1.32.9-classic]"),
    Mutant("lora_info_not_on_the_toolbox", "web/js/lora_info.js",
           "return loraOf(item) ? [INFO_COMMAND] : [];",
           "return [];",
           "tests/test_browser.py::test_lora_info_opens_from_the_node_menu_and_the_selection_toolbox[1.32.9-nodes2]"),
    Mutant("plan_ignores_preservation", "training/engine/step.py",
           "return kept + bool(cfg.preservation_class and cfg.preservation_weight) + bool(cfg.blank_preservation_weight)",
           "return kept + bool(cfg.blank_preservation_weight)",
           "tests/test_memory.py::test_memory_plan_matches_what_a_step_allocates[preservation]"),
    Mutant("plan_ignores_blank_preservation", "training/engine/step.py",
           "return kept + bool(cfg.preservation_class and cfg.preservation_weight) + bool(cfg.blank_preservation_weight)",
           "return kept + bool(cfg.preservation_class and cfg.preservation_weight)",
           "tests/test_memory.py::test_memory_plan_matches_what_a_step_allocates[blank]"),
    Mutant("preservation_first_class_only", "training/engine/text.py",
           "word = self.classes[0] if len(self.classes) == 1 else rng.choice(self.classes)",
           "word = self.classes[0]",
           "tests/test_training_features.py::test_output_preservation_says_each_sample_as_one_of_its_classes"),
    Mutant("blank_preservation_ignored", "training/engine/step.py",
           "if cfg.blank_preservation_weight:",
           "if False:",
           "tests/test_training_features.py::test_each_step_holds_the_class_and_the_empty_prompt_to_the_base_models_prediction"),
    Mutant("regularisation_images_keep_their_image_target", "training/engine/step.py",
           'if self.config.prior_target != "base" or not any(reg):',
           "if True:",
           "tests/test_training_features.py::test_regularisation_images_can_be_trained_toward_the_base_models_own_prediction"),
    Mutant("plan_ignores_the_slider", "training/engine/step.py",
           "kept = 2 + 2 * bool(cfg.slider_anchor) if cfg.slider else 1",
           "kept = 1",
           "tests/test_memory.py::test_memory_plan_matches_what_a_step_allocates[slider]"),
    Mutant("slider_target_ignores_strength", "training/engine/step.py",
           'targets = {"caption": (base["caption"] + strength * direction, weights)}',
           'targets = {"caption": (base["caption"] + direction, weights)}',
           "tests/test_training_features.py::test_a_slider_step_moves_its_targets_by_the_strength_and_holds_the_anchor"),
    Mutant("slider_anchor_ignored", "training/engine/step.py",
           'targets["anchor"] = (base["anchor"], None)',
           "pass",
           "tests/test_training_features.py::test_a_slider_step_moves_its_targets_by_the_strength_and_holds_the_anchor"),
    Mutant("overrun_rings_once", "bench/gpu_check.py",
           "signal.alarm(1)",
           "pass",
           "tests/test_gpu_check.py::test_a_question_that_swallows_the_overrun_is_stopped_all_the_same"),
    Mutant("recomputed_at_another_strength", "training/engine/trainer.py",
           "recompute_as=self.network.as_now),",
           "recompute_as=None),",
           "tests/test_training_features.py::test_a_slider_step_checkpointed_gives_the_same_gradients"),
    Mutant("text_cache_never_read", "training/engine/text.py",
           "conditioning = self.disk.load(caption) if cache and self.disk is not None else None",
           "conditioning = None",
           "tests/test_train.py::test_text_encoder_outputs_are_cached_on_disk_and_a_second_run_encodes_nothing"),
    Mutant("text_cache_ignores_clip_patches", "training/data/text_cache.py",
           "if clip.patcher.patches or clip.patcher.object_patches:",
           "if False:",
           "tests/test_train.py::test_text_encoder_outputs_are_cached_on_disk_and_a_second_run_encodes_nothing"),
    Mutant("oft_turns_the_other_way", "lora_core/adapters/oft.py",
           'return torch.einsum("k n m, k n ... -> k m ...", r, rows.unflatten(0, (n, b))).flatten(0, 1)',
           'return torch.einsum("k m n, k n ... -> k m ...", r, rows.unflatten(0, (n, b))).flatten(0, 1)',
           "tests/test_engine.py::test_trained_applied_and_comfy_loaded_models_are_the_same[oft-linear-plain]"),
    Mutant("oft_bypass_turns_the_bias", "lora_core/adapters/oft.py",
           "plain = out if bias is None else out - _broadcast(bias.to(out), out, channels_last)",
           "plain = out",
           "tests/test_memory.py::test_bypass_equals_weight_patching[oft-linear-plain]"),
    Mutant("plan_ignores_the_4bit_base", "training/engine/planning.py",
           "return memory.MemoryPlan(patched.model_size() - run.quantized, adapter + encoders, activations, budget,",
           "return memory.MemoryPlan(patched.model_size(), adapter + encoders, activations, budget,",
           "tests/test_memory.py::test_training_on_a_4bit_base_computes_from_nf4_and_leaves_the_model_alone"),
    Mutant("fused_parts_all_at_the_first_rows", "lora_core/lowrank.py",
           "up[first:first + piece_up.shape[0], column:column + adapter.rank] = piece_up",
           "up[:piece_up.shape[0], column:column + adapter.rank] = piece_up",
           "tests/test_toolbox.py::test_a_diffusers_flux_lora_with_q_k_v_apart_reads_merges_and_resizes_to_what_apply_gives"),
    Mutant("glora_old_layout_read_as_new", "lora_core/adapters/glora.py",
           "a1, a2, b1, b2 = a2, a1, b2, b1  # old: W a2 a1 + b2 b1",
           "pass",
           "tests/test_engine.py::test_lycoris_old_layout_glora_files_apply_and_read_as_comfy_reads_them"),
    Mutant("cosmos_flow_time_is_its_sigma", "training/engine/objective.py",
           "return sigma / (sigma + 1) if _variance_exploding_flow(model_sampling) else sigma",
           "return sigma",
           "tests/test_families.py::test_cosmos_learns_the_velocity_its_sampler_reads"),
    Mutant("debiased_weight_unapplied", "training/engine/step.py",
           "per_sample = per_sample * objective.debiased_weight(self.kind, sigma, sigma_data)",
           "per_sample = per_sample",
           "tests/test_training_features.py::test_debiased_estimation_weights_each_sample_by_its_noise_level"),
    Mutant("guidance_overridden_where_unread", "training/engine/conditioning.py",
           "return guidance if embedded and default is not None and float(default.flatten()[0]) else None",
           "return guidance if default is not None and float(default.flatten()[0]) else None",
           "tests/test_families.py::test_family_gets_the_inputs_comfyui_gives_it[hunyuan_image21]"),
    Mutant("residual_stream_saved_in_place", "training/engine/blocks.py",
           "saved = tensor.clone() if type(tensor) is OutOfPlace else tensor",
           "saved = tensor",
           "tests/test_families.py::test_blocks_that_add_in_place_get_true_gradients[ltxv]"),
    Mutant("saved_apart_covers_checkpointing", "training/engine/blocks.py",
           "outer = torch._C._autograd._top_saved_tensors_default_hooks(False)",
           "outer = None",
           "tests/test_families.py::test_blocks_that_add_in_place_get_true_gradients[flux]"),
    Mutant("zero_concat_refused", "training/engine/conditioning.py",
           'if concat is not None and "concat_latent_image" not in entry and bool(concat.cond.any()):',
           'if concat is not None and "concat_latent_image" not in entry:',
           "tests/test_families.py::test_family_gets_the_inputs_comfyui_gives_it[hunyuan_video15]"),
    Mutant("simulated_modules_moved", "training/engine/memory.py",
           "module.to = functools.partial(_stays_where_it_is, module)",
           "pass",
           "tests/test_families.py::test_family_trains_and_its_file_loads_in_comfyui[hunyuan_video15]"),
    Mutant("extraction_always_checks", "lora_core/svd.py",
           "if residual <= options.tol * total:",
           "if False:",
           "tests/test_svd.py::test_a_change_the_sketch_holds_is_certified_without_the_checks_products[640x640]"),
]


class StaleMutant(Exception):
    """The mutant's line is not in its file exactly once (the code moved on): update or remove the mutant."""


def mutated(mutant: Mutant, root: Path = REPO_ROOT) -> tuple[str, str]:
    """(the file's text, the text with the mutant applied), checking that its line is there exactly once."""
    path = root / mutant.file
    if not path.is_file():
        raise StaleMutant(f"{mutant.name}: {mutant.file} does not exist")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.strip() == mutant.line.strip()]
    if len(found) != 1:
        raise StaleMutant(f"{mutant.name}: {mutant.line!r} is in {mutant.file} {len(found)} times, not once")
    line = lines[found[0]]
    indent = line[: len(line) - len(line.lstrip())]
    lines[found[0]] = indent + mutant.replacement.strip() + ("\n" if line.endswith("\n") else "")
    return text, "".join(lines)


def copy_repository(dest: Path) -> Path:
    """A copy of the repository at `dest`, without what NOT_COPIED names."""
    shutil.copytree(REPO_ROOT, dest, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    return dest


def environment(copy: Path, threads: int | None = None) -> dict[str, str]:
    """The test's environment in the copy: this checkout's host and fixtures cache, no bytecode written (a
    restored file must never run from a mutant's .pyc), test artifacts kept inside the copy."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from harness.comfy import comfy_root
        from harness.fixtures import cache_dir
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    outer = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # not a worker of ours
    return {**outer, "COMFYUI_ROOT": str(comfy_root()), "LORA_FOUNDRY_CACHE": str(cache_dir()),
            "LORA_FOUNDRY_ARTIFACTS": str(copy / "test-artifacts"), "PYTHONDONTWRITEBYTECODE": "1",
            **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def imported_from(copy: Path) -> Path:
    """Where the copy's tests import the pack from (its own folder, or the harness is not using the copy)."""
    code = "from harness.comfy import import_pack; print(import_pack().__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env={**environment(copy), "PYTHONPATH": "scripts"},
                         capture_output=True, text=True, timeout=120, check=True)
    return Path(out.stdout.strip().splitlines()[-1]).parent


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    seconds: float
    output: str

    @property
    def reason(self) -> str:
        """The first line pytest marks as the failure (E ...): what caught the mutant."""
        return next((line[1:].strip() for line in self.output.splitlines() if line.startswith("E ")), "")


class ForkedPytest:
    """tests/forked_pytest.py in a copy: its tests run in forks of one process that has imported torch and the host
    (seconds a test, paid once per copy instead)."""

    def __init__(self, copy: Path, threads: int | None = None):
        self.log = copy / "test-artifacts" / "mutant-test.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, str(copy / "tests" / "forked_pytest.py")], cwd=copy,
                                        env=environment(copy, threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        if not self.process.stdout.readline():
            raise RuntimeError(f"tests/forked_pytest.py in {copy} stopped before it was ready (exit "
                               f"{self.process.wait()})")

    def run(self, test: str, timeout: float) -> tuple[int, str]:
        """pytest's exit code for `test` and what it printed."""
        self.process.stdin.write(json.dumps([test, str(self.log), timeout]) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"tests/forked_pytest.py stopped while running {test} (exit {self.process.wait()})")
        code = json.loads(answer)["code"]
        if code is None:
            raise subprocess.TimeoutExpired(test, timeout)
        return code, self.log.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def run(mutant: Mutant, copy: Path, runner: ForkedPytest, timeout: float = 600) -> Outcome:
    """Apply `mutant` to the copy, run its test there (in a fork of `runner`, the copy's), restore the file. Killed:
    the test ran and failed."""
    original, broken = mutated(mutant, copy)
    if mutant.file.endswith(".py"):
        compile(broken, mutant.file, "exec")  # a mutant that does not even compile proves nothing
    path = copy / mutant.file
    start = time.monotonic()
    try:
        path.write_text(broken, encoding="utf-8")
        code, output = runner.run(mutant.test, timeout)
    finally:
        path.write_text(original, encoding="utf-8")
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    if code == 0 and re.search(r"\b1 passed\b", summary):
        return Outcome(mutant, False, time.monotonic() - start, output)
    if code == 1 and re.search(r"\b1 failed\b", summary) and " error" not in summary:
        return Outcome(mutant, True, time.monotonic() - start, output)
    raise RuntimeError(f"{mutant.name}: {mutant.test} neither passed nor failed once (exit {code}): "
                       f"{output[-3000:]}")


def main(names: list[str]) -> int:
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"no such mutant: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not names or m.name in names]
    total, survivors = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="lora-foundry-mutants-") as tmp:
        copy = copy_repository(Path(tmp) / "lora_foundry")
        runner = ForkedPytest(copy)
        for mutant in chosen:
            outcome = run(mutant, copy, runner)
            print(f"{'killed' if outcome.killed else 'SURVIVED':9} {outcome.seconds:6.1f} s  {mutant.name}: "
                  f"{outcome.reason[:150]}", flush=True)
            if not outcome.killed:
                survivors.append(mutant.name)
        runner.close()
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} killed in {time.monotonic() - total:.0f} s")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
