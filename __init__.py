"""Lora Foundry: LoRA training and tooling for ComfyUI."""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    """The host's entry point: our nodes and routes. Imported here, not above, so that tools that import the package
    without a host (pytest collecting tests/) do not need one."""
    from .nodes import extension

    return extension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
