"""Every file in example_workflows/ runs end to end through a real server on the fixture model.

The workflows name files a user would have (a checkpoint, LoRAs, a fine-tuned checkpoint, a
dataset folder); each is generated here from a seed and linked under that name. Training and
sampling steps are cut to a few through the widget values, the way a user would edit them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness.comfy import REPO_ROOT
from harness.examples import (
    FAMILY_EXAMPLES,
    TUNED_LAYERS,
    frontend_widget_count,
    make_fast,
    needed_files,
    planted_delta,
    provide,
)
from harness.server import ComfyServer
from harness.workflow import SEED_CONTROL_VALUES, VIRTUAL_NODES, _has_seed_control, widget_inputs

WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
# The fixture checkpoint runs these; the video and edit examples run on their tiny families in test_video.py.
RUN_HERE = [p for p in WORKFLOWS if p.stem not in FAMILY_EXAMPLES]

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def workflow_server(tmp_path_factory, tiny_checkpoint):
    """A server of its own: the files these workflows write must not meet the other tests' files."""
    base = tmp_path_factory.mktemp("workflows")
    with ComfyServer(base) as server:
        yield server


@pytest.fixture(scope="module")
def object_info(workflow_server):
    return workflow_server.object_info()


def saved_loras(server: ComfyServer, outputs: dict) -> list[Path]:
    texts = [str(t) for out in outputs.values() for t in out.get("text", [])]
    return [Path(t) for t in texts if t.endswith(".safetensors") and Path(t).is_file()]


def test_every_example_workflow_is_covered_and_uses_only_core_nodes_and_ours(object_info):
    assert WORKFLOWS, "no example workflows"
    assert set(FAMILY_EXAMPLES) <= {p.stem for p in WORKFLOWS}  # each of them is run by test_video.py
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        for node in workflow["nodes"]:
            kind = node["type"]
            assert kind in VIRTUAL_NODES or kind in object_info, f"{path.name}: unknown node {kind}"
            module = object_info.get(kind, {}).get("python_module", "")
            assert kind in VIRTUAL_NODES or module in ("nodes", "") or module.startswith("comfy_extras") or \
                "lora_foundry" in module, f"{path.name}: {kind} comes from {module}"
        assert any(n["type"] in ("Note", "MarkdownNote") for n in workflow["nodes"]), f"{path.name}: no note"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_widget_values_match_the_frontends_widgets(path, object_info):
    """Each seed value is followed by its control value ("fixed", ...), as the frontend saves and loads them."""
    for node in json.loads(path.read_text())["nodes"]:
        info, values = object_info.get(node["type"]), node.get("widgets_values")
        if info is None or not isinstance(values, list):
            continue
        i = 0
        for name, spec in widget_inputs(info):
            i += 1
            if _has_seed_control(name, spec) and i < len(values):
                assert values[i] in SEED_CONTROL_VALUES, f"{path.name} node {node['id']} ({node['type']}): " \
                    f"{name} = {values[i - 1]!r} is followed by {values[i]!r}, not its control value"
                i += 1
        assert len(values) <= frontend_widget_count(info), f"{path.name} node {node['id']}: too many values"


@pytest.mark.parametrize("path", RUN_HERE, ids=[p.stem for p in RUN_HERE])
def test_example_workflow_runs(path, workflow_server, object_info, pack, loaded_checkpoint, tiny_checkpoint,
                               concept_dataset):
    server = workflow_server
    workflow = make_fast(json.loads(path.read_text()), object_info)
    provide(server, needed_files(workflow, object_info), pack, loaded_checkpoint, tiny_checkpoint, concept_dataset)
    outputs = server.run(workflow, timeout=900)
    images = [p for p in server.output_files(outputs) if p.suffix == ".png"]
    assert all(p.is_file() for p in images)
    kinds = {n["type"] for n in workflow["nodes"]}
    if "SaveImage" in kinds:
        assert images, f"{path.name}: no image saved"
    loras = saved_loras(server, outputs)
    if "LoraFoundrySaveLoRA" in kinds:
        assert loras, f"{path.name}: Save LoRA wrote nothing ({outputs})"
    from lora_foundry.lora_core.files import read_safetensors

    for lora in loras:
        tensors, _ = read_safetensors(lora)
        assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values()), lora
    check = CHECKS.get(path.stem)
    if check:
        check(server, outputs, loras, pack)


# --- what each toolbox example must have done -------------------------------------------------

def texts(outputs: dict) -> str:
    return "\n".join(str(t) for out in outputs.values() for t in out.get("text", []))


def check_extract(server, outputs, loras, pack):
    """The extracted LoRA is the planted change: the same layers, and up @ down * scale equals it."""
    from lora_foundry.lora_core.files import read_safetensors, split_modules
    from safetensors import safe_open

    modules, _ = split_modules(read_safetensors(loras[0])[0])
    assert set(modules) == set(TUNED_LAYERS.values()), sorted(modules)
    with safe_open(str(server.base_dir / "models" / "checkpoints" / "toy-world-sd15.safetensors"), "pt") as f:
        for layer, name in TUNED_LAYERS.items():
            key = f"model.diffusion_model.{layer}.weight"
            want = planted_delta(key, f.get_slice(key).get_shape(), 7)
            up, down = modules[name]["lora_up.weight"].float(), modules[name]["lora_down.weight"].float()
            got = up @ down * (modules[name]["alpha"].item() / down.shape[0])
            # Close, not equal: the example clamps factor values at their 0.99 quantile, as kohya's extractor does.
            assert ((got - want).norm() / want.norm()).item() < 0.15, name


def check_merge(server, outputs, loras, pack):
    from lora_foundry.lora_core.files import read_safetensors

    tensors, metadata = read_safetensors(loras[0])
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")}
    assert ranks and max(ranks) <= 16
    assert "toy_concept" in texts(outputs) and "toy_style" in texts(outputs)


def check_resize(server, outputs, loras, pack):
    from lora_foundry.lora_core.files import read_safetensors

    tensors, _ = read_safetensors(loras[0])
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {4}


def check_stack(server, outputs, loras, pack):
    report = texts(outputs)
    assert "toy_concept" in report and "toy_style" in report, report


CHECKS = {"extract_lora": check_extract, "merge_loras": check_merge, "resize_lora": check_resize,
          "stack_loras": check_stack}


# Train LoRA's widgets as the frontend saved them in an earlier release (35 widgets, no seed control value):
# workflows saved then must still mean the same settings.
OLDER_TRAIN_LORA_WIDGETS = ["sks", "toy_concept", "lora", 8, 8.0, "kohya", False, 200, 0.001, 4, "AdamW", "constant",
                            0, 0, "fp32", False, 1, 1.0, 0.0, "mse", 5.0, 0.0, "uniform", 0, False, 1, 0.0, False, 0,
                            50, 50, "sks\nred circle, white background", False, 0.0, False]


def _configs_as_the_node_built_them(trigger_word, algorithm, rank, alpha, targets, dora, steps, learning_rate,
                                    batch_size, optimizer, scheduler, warmup_steps, seed, precision,
                                    gradient_checkpointing=False, grad_accum=1, grad_clip=1.0, lora_plus_ratio=0.0,
                                    loss="mse", min_snr_gamma=5.0, noise_offset=0.0, timestep_sampling="uniform",
                                    conv_rank=0, shuffle_tags=False, keep_tokens=1, caption_dropout=0.0, flip=False,
                                    save_every=0, validation_every=0, sample_every=0, sample_prompts="",
                                    train_text_encoder=False, text_encoder_lr=0.0, cache_latents="memory",
                                    use_tucker=False, timestep_shift="model", shift=3.0, guidance=1.0,
                                    attach="bypass", network_dropout=0.0, vram_budget_gb=0.0,
                                    offload_activations=False, compile_blocks=False, expert="all",
                                    expert_boundary=0.0, **node_inputs):
    """The hand-written mapping Train LoRA used before its inputs were derived from the settings' declarations:
    the reference for what each widget means."""
    from lora_foundry.lora_core.network import NetworkConfig
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.engine.trainer import TrainConfig

    network = NetworkConfig(algorithm=algorithm, rank=rank, alpha=alpha, preset=targets, dora=dora,
                            conv_rank=conv_rank or None, text_encoder=train_text_encoder, seed=seed,
                            use_tucker=use_tucker, network_dropout=network_dropout)
    captions = CaptionOptions(trigger_word=trigger_word.strip(), shuffle_tags=shuffle_tags, keep_tokens=keep_tokens,
                              caption_dropout=caption_dropout)
    train = TrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, text_encoder_lr=text_encoder_lr or None,
        optimizer=optimizer, scheduler=scheduler, warmup_steps=warmup_steps, lora_plus_ratio=lora_plus_ratio,
        grad_clip=grad_clip, grad_accum=grad_accum, seed=seed, precision=precision,
        gradient_checkpointing=gradient_checkpointing, loss=loss, min_snr_gamma=min_snr_gamma,
        noise_offset=noise_offset, timestep_sampling=timestep_sampling, timestep_shift=timestep_shift, shift=shift,
        guidance=guidance, attach=attach, vram_budget_gb=vram_budget_gb, offload_activations=offload_activations,
        compile_blocks=compile_blocks, flip=flip, save_every=save_every, latent_cache=cache_latents, expert=expert,
        expert_boundary=expert_boundary,
        validation_every=validation_every, captions=captions, sample_every=sample_every,
        sample_prompts=[p.strip() for p in sample_prompts.splitlines() if p.strip()])
    return network, train


# Settings that came after the former mapping and that an example sets away from their defaults: taken as they are.
LATER_SETTINGS = ("slider_positive", "slider_negative", "slider_target", "slider_anchor", "slider_guidance",
                  "debiased_estimation", "prior_target")


def test_saved_train_lora_values_land_in_the_same_settings(object_info, pack):
    """Every Train LoRA widget value of the example workflows, and of a workflow saved by an earlier release, reaches
    the same setting through the declared settings as through the node's former hand-written mapping."""
    from dataclasses import asdict, replace

    from harness.workflow import widget_values_to_inputs
    from lora_foundry.lora_core.network import NetworkConfig
    from lora_foundry.lora_core.settings import from_inputs
    from lora_foundry.nodes.train import node_inputs
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.engine.trainer import TrainConfig

    info = object_info["LoraFoundryTrainLoRA"]
    saved = [OLDER_TRAIN_LORA_WIDGETS] + [node["widgets_values"] for path in WORKFLOWS
                                          for node in json.loads(path.read_text())["nodes"]
                                          if node["type"] == "LoraFoundryTrainLoRA"]
    assert len(saved) >= 4
    for values in saved:
        inputs = widget_values_to_inputs(values, info)
        assert set(node_inputs()) <= set(inputs)  # output_name and resume: the last widget of the older layout
        network = from_inputs(NetworkConfig, inputs)
        train = from_inputs(TrainConfig, inputs, captions=from_inputs(CaptionOptions, inputs))
        want_network, want_train = _configs_as_the_node_built_them(**inputs)
        want_train = replace(want_train, **{k: inputs[k] for k in LATER_SETTINGS if k in inputs})
        assert asdict(network) == asdict(want_network), values
        assert asdict(train) == asdict(want_train), values


def test_example_settings_are_set_by_widget_name_and_a_missing_widget_is_named(object_info):
    """main_job.example_workflow finds the checkpoint, steps and prior folder by input name; a node whose inputs lack
    one (an example saved by another version of the pack) is a ValueError naming the file, the node and the widget."""
    import copy

    from harness.examples import widget_value
    from main_job import EXAMPLES, example_workflow

    workflow = example_workflow("toy.safetensors", object_info, steps=7, path=EXAMPLES["sd3"], reg_folder="prior")
    wanted = {"CheckpointLoaderSimple": ("ckpt_name", "toy.safetensors"), "LoraFoundryTrainLoRA": ("steps", 7),
              "LoraFoundryLoadDataset": ("reg_folder", "prior")}
    seen = {node["type"]: widget_value(node, object_info[node["type"]], wanted[node["type"]][0])
            for node in workflow["nodes"] if node["type"] in wanted}
    assert seen == {kind: value for kind, (_, value) in wanted.items()}
    assert widget_value(next(n for n in workflow["nodes"] if n["type"] == "LoraFoundryTrainLoRA"),
                        object_info["LoraFoundryTrainLoRA"], "learning_rate") == 0.004  # its neighbours untouched

    older = copy.deepcopy(object_info)
    for section in older["LoraFoundryTrainLoRA"]["input"].values():
        section.pop("steps", None)
    train = next(n for n in json.loads(EXAMPLES["sd3"].read_text())["nodes"] if n["type"] == "LoraFoundryTrainLoRA")
    with pytest.raises(ValueError, match=rf"train_lora_before_after_sd3\.json: node {train['id']} "
                                         r"\(LoraFoundryTrainLoRA\) has no steps widget"):
        example_workflow("toy.safetensors", older, steps=7, path=EXAMPLES["sd3"])
