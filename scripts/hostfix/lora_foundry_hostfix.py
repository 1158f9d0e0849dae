"""Workarounds for packaging problems of the development host, installed by scripts/setup.sh.

This is the one place where the project works around its dev environment. It is copied
into the virtual environment's site-packages and imported at interpreter start through
`lora_foundry_hostfix.pth`; the pack itself never imports it, so a user's ComfyUI is
untouched.

Problem: the only torchvision the package registry offers for torch 2.13 (CPU) is a build
whose compiled operators cannot load. `torchvision/_meta_registrations.py` then calls
`torch.library.register_fake("torchvision::nms")` (and `qnms`) for operators that were
never defined, and `import torchvision` raises `RuntimeError: operator torchvision::nms
does not exist`. ComfyUI imports torchvision at module level.

Fix: just before `torchvision._meta_registrations` is imported (torchvision's own
extension module has been loaded by then), define the two operator schemas if, and only
if, torchvision reports that its compiled operators are missing. Nothing is imported at
interpreter start; a working torchvision (e.g. a CUDA build on a GPU machine) is left alone.
"""

import importlib.abc
import sys

_TARGET = "torchvision._meta_registrations"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []  # keeps the torch.library.Library objects (and so the schemas) alive


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        extension = sys.modules.get("torchvision.extension")
        if extension is not None and not extension._has_ops():
            import torch.library

            lib = torch.library.Library("torchvision", "FRAGMENT")
            for schema in _SCHEMAS:
                lib.define(schema)
            _libraries.append(lib)
        return None  # let the normal import machinery load the module


def install() -> None:
    if not any(isinstance(f, _TorchvisionOpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionOpsFinder())


install()
