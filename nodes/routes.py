"""Our read-only HTTP routes: LoRA file info (loras folders only), block-weight presets, live training state."""

from __future__ import annotations

import sys

from ..lora_core.block_weights import LAYOUTS, presets
from ..lora_core.files import AdapterFileError, path_inside
from ..lora_core.info import lora_info
from .live import TRAINING_LOG


def lora_path(name: str):
    """The file for a name ComfyUI lists in its loras folders; ValueError / LookupError for anything else.

    A name must be in ComfyUI's own listing and stay inside its folder after symlinks are resolved,
    so nothing outside the loras folders can be read through this route.
    """
    import folder_paths

    if not name.lower().endswith(".safetensors"):
        raise ValueError("only .safetensors files have info")
    if name not in folder_paths.get_filename_list("loras"):
        raise LookupError(f"{name!r} is not in the loras folders")
    for base in folder_paths.get_folder_paths("loras"):
        path = path_inside(base, name)
        if path.is_file():
            return path
    raise LookupError(f"{name!r} is not in the loras folders")


def register(routes) -> None:
    from aiohttp import web

    @routes.get("/lora_foundry/lora_info")
    async def get_lora_info(request):
        name = request.query.get("name", "")
        try:
            return web.json_response({"name": name, **lora_info(lora_path(name))})
        except LookupError as e:
            return web.json_response({"error": str(e)}, status=404)
        except (ValueError, AdapterFileError) as e:
            return web.json_response({"error": str(e)}, status=400)

    @routes.get("/lora_foundry/block_presets")
    async def get_block_presets(request):
        family = request.query.get("family", "sd1")
        if family not in LAYOUTS:
            return web.json_response({"error": f"family {family!r}: choose {', '.join(LAYOUTS)}"}, status=400)
        return web.json_response(presets(LAYOUTS[family]))

    @routes.get("/lora_foundry/train_state")
    async def get_train_state(request):
        return web.json_response(TRAINING_LOG.state(request.query.get("node", "")))  # null: no run on that node

    @routes.get("/lora_foundry/train_preview")
    async def get_train_preview(request):
        png = TRAINING_LOG.preview(request.query.get("node", ""))
        if png is None:
            return web.json_response({"error": "no preview"}, status=404)
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})


def _register_with_server() -> None:
    # Only a running ComfyUI has imported its server module; in-process users (tests, scripts) have none.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        register(instance.routes)


_register_with_server()

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
