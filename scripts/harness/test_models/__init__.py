"""A test-only ComfyUI node (never installed for users): the harness's tiny model of a family, built with the host's
own classes (harness.families), as MODEL / CLIP / VAE.

For server tests of families whose text encoder cannot come small from a file: the host builds UMT5-XXL (Wan) and
T5-XXL from fixed configs (5.7B and 4.7B parameters), and detects a Wan model's text width as 4096 whatever the
file holds. ComfyServer(test_models=True) links this folder into the server's custom_nodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = str(Path(__file__).resolve().parents[2])
if SCRIPTS not in sys.path:
    sys.path.append(SCRIPTS)

from harness.families import FAMILIES, IMAGE_CONDITIONED, build_family  # noqa: E402  (after scripts/ is importable)


class TinyFamily:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (the host's name)
        return {"required": {"family": (list(FAMILIES + IMAGE_CONDITIONED),), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def build(self, family: str, seed: int) -> tuple:
        built = build_family(family, seed)
        return built.model, built.clip, built.vae


NODE_CLASS_MAPPINGS = {"LoraFoundryTestTinyFamily": TinyFamily}
