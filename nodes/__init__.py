"""Node registry: each module under nodes/ exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS."""

from importlib import import_module

NODE_MODULES = ("apply", "dataset", "save", "train", "merge", "extract", "resize", "routes", "caption")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in NODE_MODULES:
    _module = import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
