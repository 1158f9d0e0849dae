"""Our nodes (V3 schema), and the extension the host loads: each module under nodes/ lists its node classes in NODES."""

from __future__ import annotations

import sys
from importlib import import_module

from comfy_api.latest import ComfyExtension, io

from .routes import register

NODE_MODULES = ("apply", "dataset", "save", "train", "merge", "extract", "resize", "caption", "configs")
NODES: list[type[io.ComfyNode]] = [node for name in NODE_MODULES for node in import_module(f".{name}", __name__).NODES]


def node_ids() -> dict[str, type[io.ComfyNode]]:
    """{node id: class}, as the host registers them."""
    return {node.GET_SCHEMA().node_id: node for node in NODES}


class LoraFoundry(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


def register_routes() -> None:
    """Our HTTP routes on the running server; in-process users (tests, scripts) have no server and get none."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        register(instance.routes)


def extension() -> LoraFoundry:
    register_routes()
    return LoraFoundry()
