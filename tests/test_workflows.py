"""Every file in example_workflows/ runs end to end through a real server on the fixture model.

The workflows name files a user would have (a checkpoint, LoRAs, a fine-tuned checkpoint, a
dataset folder); each is generated here from a seed and linked under that name. Training and
sampling steps are cut to a few through the widget values, the way a user would edit them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from harness import fixtures
from harness.comfy import REPO_ROOT
from harness.server import ComfyServer
from harness.workflow import SEED_CONTROL_VALUES, VIRTUAL_NODES, widget_inputs

WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
TUNED_LAYERS = {  # layers changed in the "fine-tuned" checkpoint: {ldm name: kohya LoRA name}
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "output_blocks.0.1.transformer_blocks.0.attn2.to_v": "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v",
}
LORA_WIDGET = re.compile(r"^lora(_name|_\d+)$")
FAST = {"LoraFoundryTrainLoRA": {"steps": 4, "sample_every": 4, "validation_every": 4, "save_every": 0},
        "KSampler": {"steps": 2}, "KSamplerAdvanced": {"steps": 2}}

pytestmark = [pytest.mark.server, pytest.mark.slow]


def set_widget(node: dict, info: dict, name: str, value) -> bool:
    """Set a widget of a UI-format node by input name (widgets_values is positional); False if absent."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        values[name] = value
        return True
    i = 0
    for widget, _ in widget_inputs(info):
        if i >= len(values or []):
            return False
        if widget == name:
            values[i] = value
            return True
        i += 1
        if i < len(values) and values[i] in SEED_CONTROL_VALUES:
            i += 1
    return False


def widget_value(node: dict, info: dict, name: str):
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return values.get(name)
    i = 0
    for widget, _ in widget_inputs(info):
        if i >= len(values):
            return None
        if widget == name:
            return values[i]
        i += 1
        if i < len(values) and values[i] in SEED_CONTROL_VALUES:
            i += 1
    return None


def needed_files(workflow: dict, object_info: dict) -> dict[str, set[str]]:
    """{"checkpoints"|"loras"|"datasets": names} that the workflow's widgets refer to."""
    needs: dict[str, set[str]] = {"checkpoints": set(), "loras": set(), "datasets": set()}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            continue
        for name, _ in widget_inputs(info):
            value = widget_value(node, info, name)
            if not isinstance(value, str) or not value:
                continue
            if name == "ckpt_name":
                needs["checkpoints"].add(value)
            elif LORA_WIDGET.match(name) and value != "None":
                needs["loras"].add(value)
            elif name == "loras" and value.strip().startswith("["):
                needs["loras"].update(row["lora"] for row in json.loads(value))
            elif name == "folder" and not Path(value).is_absolute():
                needs["datasets"].add(value)
    return needs


def random_lora(pack, model, clip, seed: int):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig

    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=8, alpha=8.0, preset="kohya", text_encoder=True, seed=seed),
                                     model, clip)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return network


def planted_delta(key: str, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + sum(map(ord, key)))
    return 0.0125 * torch.randn(shape[0], 16, generator=gen) @ torch.randn(16, shape[1], generator=gen)


def tuned_checkpoint(base: Path, path: Path, seed: int = 7) -> Path:
    """The fixture's UNet (+ VAE, no text encoder) with a planted rank-16 change in TUNED_LAYERS."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(base), "pt") as f:
        for key in f.keys():
            if key.startswith(("model.diffusion_model.", "first_stage_model.")):
                tensors[key] = f.get_tensor(key)
    for layer in TUNED_LAYERS:
        key = f"model.diffusion_model.{layer}.weight"
        weight = tensors[key].float()
        tensors[key] = (weight + planted_delta(key, weight.shape, seed)).to(tensors[key].dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fixtures._save_atomic(tensors, path)
    return path


@pytest.fixture(scope="module")
def workflow_server(tmp_path_factory, tiny_checkpoint):
    """A server of its own: the files these workflows write must not meet the other tests' files."""
    base = tmp_path_factory.mktemp("workflows")
    with ComfyServer(base) as server:
        yield server


@pytest.fixture(scope="module")
def object_info(workflow_server):
    return workflow_server.object_info()


def provide(server: ComfyServer, needs: dict, pack, loaded_checkpoint, tiny_checkpoint, concept_dataset) -> None:
    """Generate or link every file the workflow names (kept when an earlier workflow already made it)."""
    from lora_foundry.lora_core.files import write_safetensors

    models = server.base_dir / "models"
    for name in needs["checkpoints"]:
        target = models / "checkpoints" / name
        if target.exists():
            continue
        if "tuned" in name:
            tuned_checkpoint(tiny_checkpoint, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(tiny_checkpoint)
    model, clip, _ = loaded_checkpoint
    for i, name in enumerate(sorted(needs["loras"])):
        target = models / "loras" / name
        if not target.exists():
            network = random_lora(pack, model, clip, seed=100 + i)
            metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "8.0",
                        "ss_base_model_version": "sd_v1", "ss_output_name": Path(name).stem}
            write_safetensors(network.state_dict_kohya(), target, metadata)
    for name in needs["datasets"]:
        target = server.base_dir / "input" / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(concept_dataset, target_is_directory=True)


def make_fast(workflow: dict, object_info: dict) -> dict:
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        for name, value in FAST.get(node["type"], {}).items():
            current = widget_value(node, info, name)
            if name in ("sample_every", "validation_every") and not current:
                continue  # keep what the example turns off
            set_widget(node, info, name, value)
    return workflow


def saved_loras(server: ComfyServer, outputs: dict) -> list[Path]:
    texts = [str(t) for out in outputs.values() for t in out.get("text", [])]
    return [Path(t) for t in texts if t.endswith(".safetensors") and Path(t).is_file()]


def test_every_example_workflow_is_covered_and_uses_only_core_nodes_and_ours(object_info):
    assert WORKFLOWS, "no example workflows"
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
