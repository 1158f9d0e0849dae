"""Our HTTP routes: LoRA file info (loras folders only), block-weight presets, live training state, and the one
that writes: a caption edited on the Caption Images node."""

from __future__ import annotations

import asyncio
import functools

from ..lora_core.block_weights import LAYOUTS, presets
from ..lora_core.files import AdapterFileError, path_inside
from ..lora_core.info import lora_info
from .live import TRAINING_LOG
from .loras import lora_file
from .shown_captions import CAPTION_EDITS, CaptionEditError


def checked_lora_name(name: str) -> str:
    """`name` if it can only name a .safetensors file inside the loras folders; ValueError (a 400) for one with a
    NUL byte, an absolute path, '..', or a link out of those folders, before any file is opened."""
    import folder_paths

    if not name.lower().endswith(".safetensors"):
        raise ValueError(f"{name!r}: only .safetensors files have info (pickle formats such as .ckpt are never read)")
    for base in folder_paths.get_folder_paths("loras"):
        path_inside(base, name)
    return name


def refusing_bad_requests(handler):
    """`handler`, answering 400 with the reason when the request itself is at fault in a way the handler did not
    foresee (a value of the wrong type, text no file name can hold, JSON nested past Python's recursion limit):
    what a request sends never makes a 500."""
    from aiohttp import web

    @functools.wraps(handler)
    async def answer(request):
        try:
            return await handler(request)
        except (ValueError, TypeError, RecursionError) as e:  # UnicodeError is a ValueError
            return web.json_response({"error": f"the request cannot be used ({type(e).__name__}: {e})"}, status=400)

    return answer


def register(routes) -> None:
    """Add our routes to the server's route table (called once, when the host loads the pack). Every handler is
    wrapped by `refusing_bad_requests`."""
    from aiohttp import web

    def get(path):
        return lambda handler: routes.get(path)(refusing_bad_requests(handler))

    def post(path):
        return lambda handler: routes.post(path)(refusing_bad_requests(handler))

    @get("/lora_foundry/lora_info")
    async def get_lora_info(request):
        name = request.query.get("name", "")
        try:
            path = lora_file(checked_lora_name(name))
            info = await asyncio.to_thread(lora_info, path)  # a header may be 100 MB: not on the event loop
            return web.json_response({"name": name, **info})
        except FileNotFoundError as e:
            return web.json_response({"error": str(e)}, status=404)
        except (ValueError, AdapterFileError) as e:
            return web.json_response({"error": str(e)}, status=400)
        except OSError as e:
            return web.json_response({"error": f"{name}: the file cannot be read ({e})"}, status=500)

    @get("/lora_foundry/block_presets")
    async def get_block_presets(request):
        family = request.query.get("family", "sd1")
        if family not in LAYOUTS:
            return web.json_response({"error": f"family {family!r}: choose {', '.join(LAYOUTS)}"}, status=400)
        return web.json_response(presets(LAYOUTS[family]))

    @get("/lora_foundry/train_state")
    async def get_train_state(request):
        return web.json_response(TRAINING_LOG.state(request.query.get("node", "")))  # null: no run on that node

    @get("/lora_foundry/train_preview")
    async def get_train_preview(request):
        png = TRAINING_LOG.preview(request.query.get("node", ""))
        if png is None:
            return web.json_response({"error": "no preview"}, status=404)
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})

    @post("/lora_foundry/caption")
    async def post_caption(request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than the parser goes
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "body: send a JSON object {token, image, caption}", "field": "body"},
                                     status=400)
        try:
            path = CAPTION_EDITS.save(body.get("token"), body.get("image"), body.get("caption"))
        except CaptionEditError as e:
            return web.json_response({"error": str(e), "field": e.field}, status=400)
        except OSError as e:
            return web.json_response({"error": f"the caption file cannot be written ({type(e).__name__}: {e})"},
                                     status=500)
        return web.json_response({"ok": True, "path": path})
