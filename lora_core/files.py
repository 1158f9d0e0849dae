"""Adapter files: safetensors only, atomic writes, and splitting a file into per-module tensors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# Longest first, so "lora_down.weight" wins over "weight"-like shorter endings.
MODULE_SUFFIXES = tuple(sorted((
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "lora.down.weight", "lora.up.weight", "alpha", "dora_scale", "diff", "diff_b", "set_weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "w_norm", "b_norm", "oft_blocks", "oft_diag", "rescale",
), key=len, reverse=True))


class AdapterFileError(ValueError):
    """A file that cannot be read as an adapter; the message names the file and what to do."""


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file (no pickle formats are ever loaded)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(
            f"{path}: only .safetensors files are read (pickle formats such as .ckpt/.pt/.bin can run code); "
            "convert it to safetensors first"
        )
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({e}); re-download or re-save it") from e
    return tensors, metadata


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write atomically: a temporary file in the same folder, flushed, then renamed over `path`."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return write_bytes_atomic(data, path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a temporary file in the same folder, flush it, then rename it to `path`.

    With overwrite=False an existing `path` is never replaced (FileExistsError), even one that
    appears while writing: the temporary file is hard-linked to `path`, which fails if it exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes owner-only files; keep a replaced file's mode
            os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _link_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: a check, then the rename
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


def write_text_atomic(text: str, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """UTF-8 text written like write_bytes_atomic (caption sidecars, for instance)."""
    return write_bytes_atomic(text.encode("utf-8"), path, overwrite)


def split_modules(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group a file's tensors by module: ({module name: {suffix: tensor}}, keys with no known suffix)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        for suffix in MODULE_SUFFIXES:
            if key.endswith("." + suffix):
                modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            unknown.append(key)
    return modules, unknown


def path_inside(base: str | os.PathLike, relative: str) -> Path:
    """`base/relative`, refusing absolute paths and anything that escapes `base` (e.g. `..`)."""
    if not relative or relative.strip() != relative:
        raise ValueError(f"name {relative!r}: give a plain relative name such as 'my_lora' or 'folder/my_lora'")
    if os.path.isabs(relative) or "\\" in relative or any(part == ".." for part in Path(relative).parts):
        raise ValueError(f"name {relative!r}: absolute paths, backslashes and '..' are not allowed")
    base = Path(base).resolve()
    path = (base / relative).resolve()
    if base != path and base not in path.parents:
        raise ValueError(f"name {relative!r} points outside {base}")
    return path


def numbered_path(base: str | os.PathLike, prefix: str, suffix: str = ".safetensors") -> Path:
    """The first free `<prefix>_00001<suffix>`, `_00002`, ... inside `base`: never an existing file."""
    stem = path_inside(base, prefix)
    stem.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = stem.with_name(f"{stem.name}_{n:05d}{suffix}")
        if not path.exists():
            return path
        n += 1
