"""What the toolbox nodes ask of the running host: its device, and a progress bar that honours Cancel."""

from __future__ import annotations

from collections.abc import Callable


def device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def comfy_progress() -> Callable[[int, int], None]:
    """A progress callback for the engine: ComfyUI's progress bar, and the Cancel button honoured."""
    import comfy.model_management
    import comfy.utils

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return update
