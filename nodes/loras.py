"""LoRA files by the names ComfyUI lists in its loras folders: the one way every node and route finds them."""

from __future__ import annotations

from pathlib import Path

from ..lora_core.files import path_inside
from ..lora_core.network import read_network

NONE = "None"


def lora_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def lora_choices() -> list[str]:
    """The loras as a combo with a leading None (no file chosen)."""
    return [NONE, *lora_names()]


def lora_file(name: str) -> Path:
    """The file for a name ComfyUI lists in its loras folders; FileNotFoundError naming it for anything else.

    The name must be in ComfyUI's own listing and stay inside its folder once symlinks are resolved, so nothing
    outside the loras folders is ever read through a name.
    """
    import folder_paths

    if name in lora_names():
        for base in folder_paths.get_folder_paths("loras"):
            try:
                path = path_inside(base, name)
            except ValueError:
                continue
            if path.is_file():
                return path
    raise FileNotFoundError(f"{name!r} is not in the loras folders ({', '.join(folder_paths.get_folder_paths('loras'))}); "
                            "put the file there and refresh the node")


def read_lora(name: str, model=None, clip=None):
    """A file of the loras folders as a LoraNetwork (names bound to `model` / `clip` when given)."""
    return read_network(lora_file(name), model, clip)
