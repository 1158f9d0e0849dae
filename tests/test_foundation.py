"""The pack installs, imports, and loads in a real ComfyUI host; the fixtures are what ComfyUI expects."""

from __future__ import annotations

import importlib
import json

import pytest
import tomllib
from harness.comfy import REPO_ROOT
from harness.server import PACK_DIR_NAME, WorkflowError
from harness.workflow import to_api_prompt

DISPLAY_NAMES = {"Load Dataset", "Caption Images", "Train LoRA", "Save LoRA", "Merge LoRA", "Extract LoRA", "Apply LoRA",
                 "Load Training Config", "Save Training Config",
                 "Apply LoRA Stack", "LoRA Stack", "Resize LoRA"}


def test_pyproject_follows_pep621_and_comfy_registry():
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "lora-foundry"
    for field in ("version", "description", "license", "requires-python", "dependencies"):
        assert project[field], field
    deps = " ".join(project["dependencies"])
    for dep in ("safetensors", "einops", "bitsandbytes"):
        assert dep in deps
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)


def test_pack_imports_in_process_and_registers_prefixed_v3_nodes(pack):
    import asyncio

    from comfy_api.latest import ComfyExtension, io

    assert pack.WEB_DIRECTORY == "./web/js"
    assert (REPO_ROOT / "web" / "js").is_dir()
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # the host would then skip comfy_entrypoint
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    assert nodes, "the pack registers no nodes"
    for cls in nodes:
        assert issubclass(cls, io.ComfyNode)
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("LoraFoundry"), f"{schema.node_id} lacks our prefix"
        assert schema.category == "Lora Foundry" and schema.description, schema.node_id
    shown = {cls.GET_SCHEMA().display_name for cls in nodes}
    assert shown <= DISPLAY_NAMES | {n for n in shown if n.startswith("LoRA ")}


def test_node_ids_widget_order_and_outputs_stay_as_saved_workflows_know_them(pack):
    """Saved workflows store widget values by position: a node's widgets may only grow at the end."""
    from harness.workflow import widget_inputs

    known = json.loads((REPO_ROOT / "tests" / "data" / "node_inputs.json").read_text())
    nodes = importlib.import_module(f"{pack.__name__}.nodes").node_ids()
    assert set(known) <= set(nodes), set(known) - set(nodes)
    for node_id, saved in known.items():
        info = nodes[node_id].GET_NODE_INFO_V1()
        widgets = [name for name, _ in widget_inputs(info)]
        assert widgets[: len(saved["widgets"])] == saved["widgets"], node_id
        assert info["output"] == saved["output"] and info["output_name"] == saved["output_name"], node_id


def test_pack_uses_relative_imports_only():
    packages = ("nodes", "lora_core", "training")
    for path in REPO_ROOT.glob("*/**/*.py"):
        if path.parts[len(REPO_ROOT.parts)] not in packages:
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            for pkg in packages:
                assert not stripped.startswith((f"import {pkg}", f"from {pkg} ", f"from {pkg}.")), f"{path}: {line}"


def test_fixture_checkpoint_is_detected_as_sd15(loaded_checkpoint):
    import comfy.supported_models

    model, clip, vae = loaded_checkpoint
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    assert model.model.model_config.unet_config["model_channels"] == 320
    assert model.model.model_config.unet_config["context_dim"] == 768
    assert clip is not None and vae is not None
    assert type(vae.first_stage_model).__name__ == "TAESD"


def test_fixture_dataset_is_kohya_layout(concept_dataset):
    folders = [p for p in concept_dataset.iterdir() if p.is_dir()]
    assert [f.name for f in folders] == ["10_sks circle"]
    images = sorted(folders[0].glob("*.png"))
    assert len(images) >= 20
    for img in images:
        assert img.with_suffix(".txt").read_text().startswith("sks circle")


def test_fixtures_are_deterministic(tmp_path, monkeypatch):
    from harness import fixtures

    monkeypatch.setenv("LORA_FOUNDRY_CACHE", str(tmp_path))
    a = fixtures.build_unet(seed=3, config={**fixtures.SD15_TINY_UNET, "model_channels": 32, "context_dim": 64})
    b = fixtures.build_unet(seed=3, config={**fixtures.SD15_TINY_UNET, "model_channels": 32, "context_dim": 64})
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and va.equal(vb)


@pytest.mark.server
def test_server_lists_every_node_without_import_errors(server, pack):
    info = server.object_info()
    nodes = importlib.import_module(f"{pack.__name__}.nodes").node_ids()
    missing = set(nodes) - set(info)
    assert not missing, f"not listed by the server: {missing}"
    ours = [line for line in server.log().splitlines() if PACK_DIR_NAME in line or "lora_foundry" in line.lower()]
    assert ours, "the server log does not mention loading the pack"
    bad = [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line or "Traceback" in line]
    assert not bad, "\n".join(bad)
    for node_id, cls in nodes.items():
        assert info[node_id]["display_name"] == cls.GET_SCHEMA().display_name
        assert info[node_id]["python_module"].startswith("custom_nodes."), info[node_id]["python_module"]


def sample_workflow(ckpt_name: str, seed: int = 1) -> dict:
    """The core text-to-image graph, in UI format as the frontend saves it."""
    def link(i, a, sa, b, sb, t):
        return [i, a, sa, b, sb, t]

    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [], "widgets_values": [ckpt_name]},
        {"id": 2, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 2}],
         "widgets_values": ["a red circle"]},
        {"id": 3, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "widgets_values": [""]},
        {"id": 4, "type": "EmptyLatentImage", "mode": 0, "inputs": [], "widgets_values": [64, 64, 1]},
        {"id": 5, "type": "KSampler", "mode": 0, "inputs": [
            {"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 4},
            {"name": "negative", "type": "CONDITIONING", "link": 5}, {"name": "latent_image", "type": "LATENT", "link": 6}],
         "widgets_values": [seed, "fixed", 2, 3.0, "euler", "normal", 1.0]},
        {"id": 6, "type": "VAEDecode", "mode": 0, "inputs": [
            {"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}], "widgets_values": []},
        {"id": 7, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 9}],
         "widgets_values": ["foundation"]},
        {"id": 8, "type": "MarkdownNote", "mode": 0, "inputs": [], "widgets_values": ["a note is skipped"]},
    ]
    links = [link(1, 1, 0, 5, 0, "MODEL"), link(2, 1, 1, 2, 0, "CLIP"), link(3, 1, 1, 3, 0, "CLIP"),
             link(4, 2, 0, 5, 1, "CONDITIONING"), link(5, 3, 0, 5, 2, "CONDITIONING"), link(6, 4, 0, 5, 3, "LATENT"),
             link(7, 5, 0, 6, 0, "LATENT"), link(8, 1, 2, 6, 1, "VAE"), link(9, 6, 0, 7, 0, "IMAGE")]
    return {"nodes": nodes, "links": links}


@pytest.mark.server
def test_ui_workflow_converts_like_the_frontend(server, tiny_checkpoint):
    prompt = to_api_prompt(sample_workflow(tiny_checkpoint.name, seed=7), server.object_info())
    assert set(prompt) == {"1", "2", "3", "4", "5", "6", "7"}
    ks = prompt["5"]["inputs"]
    assert ks["seed"] == 7 and ks["steps"] == 2 and ks["cfg"] == 3.0 and ks["sampler_name"] == "euler"
    assert ks["model"] == ["1", 0] and ks["latent_image"] == ["4", 0]


@pytest.mark.server
def test_sampling_workflow_runs_through_prompt(server, tiny_checkpoint):
    from PIL import Image

    outputs = server.run(sample_workflow(tiny_checkpoint.name), timeout=300)
    files = server.output_files(outputs)
    assert len(files) == 1 and files[0].is_file()
    with Image.open(files[0]) as img:
        assert img.size == (64, 64)


@pytest.mark.server
def test_execution_error_names_the_node(server):
    bad = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "does-not-exist.safetensors"}}}
    bad["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    with pytest.raises(WorkflowError) as err:
        server.run(bad, timeout=60)
    assert err.value.node_id == "1"
    assert "does-not-exist" in str(err.value)


@pytest.mark.server
def test_a_combo_value_that_is_not_an_option_is_refused_naming_the_input(server):
    """This host does not check V3 combos: our nodes do, before anything runs."""
    resize = {"lora_name": "None", "rank": 4, "dynamic": "sv_bogus", "dynamic_param": 0.9}
    save = {"lora": ["1", 0], "filename_prefix": "never_written", "precision": "fp16", "folder": "loras",
            "overwrite": False}
    bad = {"1": {"class_type": "LoraFoundryResizeLoRA", "inputs": resize},
           "2": {"class_type": "LoraFoundrySaveLoRA", "inputs": save}}
    with pytest.raises(WorkflowError) as err:
        server.queue(bad)
    assert err.value.node_id == "1" and "dynamic: 'sv_bogus' is not one of off, sv_ratio" in str(err.value)
    bad["2"]["inputs"]["precision"] = "fp8"
    bad["1"]["inputs"]["dynamic"] = "off"
    with pytest.raises(WorkflowError) as err:
        server.queue(bad)
    assert err.value.node_id == "2" and "precision: 'fp8' is not one of fp16, bf16, fp32" in str(err.value)


@pytest.mark.server
def test_separate_model_files_load_through_the_server(server, tiny_parts):
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_parts["unet"].name, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_parts["clip"].name, "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_parts["vae"].name}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a blue square"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["4", 0],
              "latent_image": ["5", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    outputs = server.run(prompt, timeout=300)
    assert server.output_files(outputs)


def test_separate_model_files_hold_the_checkpoints_weights(tiny_parts, loaded_checkpoint):
    """What UNETLoader / CLIPLoader / VAELoader read from the parts is the checkpoint's model, not a half-loaded one."""
    import comfy.sd
    import comfy.utils
    import torch

    model, clip, vae = loaded_checkpoint
    unet = comfy.sd.load_diffusion_model(str(tiny_parts["unet"]))
    clip_l = comfy.sd.load_clip([str(tiny_parts["clip"])])
    taesd = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_parts["vae"])))
    want, got = model.model.diffusion_model.state_dict(), unet.model.diffusion_model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k].float(), got[k].float()) for k in want)
    with torch.no_grad():
        a = clip.encode_from_tokens(clip.tokenize("a blue square"), return_pooled=True)
        b = clip_l.encode_from_tokens(clip_l.tokenize("a blue square"), return_pooled=True)
        pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        latents = vae.encode(pixels), taesd.encode(pixels)
    for x, y in zip((*a, latents[0]), (*b, latents[1]), strict=True):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(y.float(), x.float(), rtol=1e-3, atol=1e-3)


def test_example_workflows_are_valid_json():
    for path in (REPO_ROOT / "example_workflows").glob("*.json"):
        data = json.loads(path.read_text())
        assert "nodes" in data and "links" in data, path


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh" in ci
    test_command = ci[-1]
    assert test_command.startswith(".venv/bin/python -m pytest")
    assert f"```bash\n{test_command}\n```" in readme


def test_setup_is_idempotent():
    import subprocess
    import time

    start = time.monotonic()
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout
    assert time.monotonic() - start < 20


def test_fixture_model_output_depends_on_input_and_prompt(loaded_checkpoint):
    import comfy.model_management
    import torch

    model, clip, _ = loaded_checkpoint
    comfy.model_management.load_models_gpu([model])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    sigma = torch.tensor([1.0])
    a = clip.encode_from_tokens(clip.tokenize("a red circle"))
    b = clip.encode_from_tokens(clip.tokenize("a blue square"))
    with torch.no_grad():
        out_a = model.model.apply_model(x, sigma, c_crossattn=a)
        out_b = model.model.apply_model(x, sigma, c_crossattn=b)
        out_c = model.model.apply_model(x * 2, sigma, c_crossattn=a)
    assert (out_a - out_b).abs().max() > 1e-4, "the prompt does not reach the UNet"
    assert (out_a - out_c).abs().max() > 1e-4, "the input does not reach the UNet"
