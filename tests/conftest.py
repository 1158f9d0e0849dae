"""Shared fixtures: the real ComfyUI host in-process, generated models, and a live server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import fixtures
from harness.comfy import REPO_ROOT, import_pack, setup_inprocess
from harness.server import ComfyServer

ARTIFACTS = Path(os.environ.get("LORA_FOUNDRY_ARTIFACTS", REPO_ROOT / "test-artifacts"))


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    return setup_inprocess()


@pytest.fixture(scope="session")
def pack(comfy_root):
    """This repository imported as a package, the way ComfyUI imports a custom node pack."""
    return import_pack()


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return fixtures.tiny_sd15_checkpoint()


@pytest.fixture(scope="session")
def tiny_parts() -> dict[str, Path]:
    return fixtures.tiny_sd15_parts()


@pytest.fixture(scope="session")
def concept_dataset() -> Path:
    return fixtures.concept_dataset()


@pytest.fixture(scope="session")
def loaded_checkpoint(comfy_root, tiny_checkpoint):
    """(MODEL patcher, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded by ComfyUI itself."""
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    return model, clip, vae


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_checkpoint, tiny_parts):
    """A real ComfyUI server with the pack and the fixture models, shared by the session."""
    base = tmp_path_factory.mktemp("comfy")
    models = {
        "checkpoints": [tiny_checkpoint],
        "diffusion_models": [tiny_parts["unet"]],
        "text_encoders": [tiny_parts["clip"]],
        "vae": [tiny_parts["vae"]],
    }
    srv = ComfyServer(base, models=models)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "server.log").write_text(srv.log())
