"""Example workflows in tests: the files they name, generated from a seed, and fewer steps."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from . import fixtures
from .server import ComfyServer
from .workflow import _has_seed_control, widget_inputs, widget_positions, widget_values_to_inputs

TUNED_LAYERS = {  # layers changed in the "fine-tuned" checkpoint: {ldm name: kohya LoRA name}
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "output_blocks.0.1.transformer_blocks.0.attn2.to_v": "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v",
}
LORA_WIDGET = re.compile(r"^lora(_name|_\d+)$")
FAST = {"LoraFoundryTrainLoRA": {"steps": 4, "sample_every": 4, "validation_every": 4, "save_every": 0},
        "LoraFoundryLoadDataset": {"resolution": 64, "min_side": 32, "max_side": 128},  # SDXL / Flux examples: 1024
        "KSampler": {"steps": 2}, "KSamplerAdvanced": {"steps": 2}}


def set_widget(node: dict, info: dict, name: str, value) -> bool:
    """Set a widget of a UI-format node by input name (widgets_values is positional); False if absent."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        values[name] = value
        return True
    position = widget_positions(values or [], info).get(name)
    if position is None:
        return False
    values[position] = value
    return True


def widget_value(node: dict, info: dict, name: str):
    return widget_values_to_inputs(node.get("widgets_values"), info).get(name)


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
    """A rank-8 kohya-preset LoRA with random factors (the text encoders' too unless `clip` is None)."""
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig

    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=8, alpha=8.0, preset="kohya", text_encoder=clip is not None,
                                                   seed=seed), model, clip)
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
        if not target.exists():  # a copy: examples with a disk latent cache write next to the images
            shutil.copytree(concept_dataset, target, ignore=shutil.ignore_patterns(".*"))


def make_fast(workflow: dict, object_info: dict) -> dict:
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        for name, value in FAST.get(node["type"], {}).items():
            current = widget_value(node, info, name)
            if name in ("sample_every", "validation_every") and not current:
                continue  # keep what the example turns off
            set_widget(node, info, name, value)
    return workflow


def frontend_widget_count(info: dict) -> int:
    """How many widgets_values the frontend saves for a node: one per widget, plus the control widget it
    adds after every `seed` / `noise_seed` / control_after_generate INT."""
    widgets = widget_inputs(info)
    return len(widgets) + sum(1 for name, spec in widgets if _has_seed_control(name, spec))


# Examples whose loaders (UNETLoader + CLIPLoader ...) name a family the fixture checkpoint is not: tests/test_video.py
# runs them on the tiny family instead (with_tiny_family).
FAMILY_EXAMPLES = {"train_wan_video_lora": "wan21", "train_wan22_experts": "wan21", "train_edit_lora": "flux",
                   "train_zimage_lora": "zimage"}
TINY_FAMILY_NODE = "LoraFoundryTestTinyFamily"  # harness/test_models, on a ComfyServer(test_models=True)
_LOADER_OUTPUTS = {"UNETLoader": 0, "CLIPLoader": 1, "DualCLIPLoader": 1, "TripleCLIPLoader": 1, "VAELoader": 2}


def with_tiny_family(prompt: dict, family: str) -> dict:
    """The API prompt with its model loaders replaced by the tiny-family node: each UNETLoader by a model of its own
    (seeds 0, 1, ... in node order: Wan 2.2's two experts differ), text-encoder and VAE loaders by the first's."""
    loaders = {nid: node["class_type"] for nid, node in prompt.items() if node["class_type"] in _LOADER_OUTPUTS}
    models = sorted((nid for nid, kind in loaders.items() if kind == "UNETLoader"), key=int)
    tiny = {nid: f"tiny{k}" for k, nid in enumerate(models)}
    out = {nid: node for nid, node in prompt.items() if nid not in loaders}
    for k in range(len(models)):
        out[f"tiny{k}"] = {"class_type": TINY_FAMILY_NODE, "inputs": {"family": family, "seed": k}}
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in loaders:
                node["inputs"][name] = [tiny.get(value[0], "tiny0"), _LOADER_OUTPUTS[loaders[value[0]]]]
    return out
