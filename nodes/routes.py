"""Our read-only HTTP routes: LoRA file info (loras folders only), block-weight presets, live training state."""

from __future__ import annotations

from ..lora_core.block_weights import LAYOUTS, presets
from ..lora_core.files import AdapterFileError
from ..lora_core.info import lora_info
from .live import TRAINING_LOG
from .loras import lora_file


def register(routes) -> None:
    """Add our routes to the server's route table (called once, when the host loads the pack)."""
    from aiohttp import web

    @routes.get("/lora_foundry/lora_info")
    async def get_lora_info(request):
        name = request.query.get("name", "")
        try:
            if not name.lower().endswith(".safetensors"):
                raise ValueError("only .safetensors files have info")
            return web.json_response({"name": name, **lora_info(lora_file(name))})
        except FileNotFoundError as e:
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
