"""Adapter files: safetensors only, atomic writes, and splitting a file into per-module tensors."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Longest first, so "lora_down.weight" wins over "weight"-like shorter endings.
MODULE_SUFFIXES = tuple(sorted((
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "lora.down.weight", "lora.up.weight", "alpha", "dora_scale", "diff", "diff_b", "set_weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "w_norm", "b_norm", "oft_blocks", "oft_diag", "rescale", "a1.weight", "a2.weight", "b1.weight", "b2.weight",
), key=len, reverse=True))


class AdapterFileError(ValueError):
    """A file that cannot be read as an adapter; the message names the file and what to do."""


HEADER_LIMIT = 100_000_000  # safetensors' own limit on a header's length; it refuses longer ones
# How pickle (protocol 2+) and zip (torch.save since 1.6) files begin.
PICKLE_STARTS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
REDOWNLOAD = "re-download the file or re-save it as safetensors"


def check_safetensors(path: str | os.PathLike, shown: str | None = None) -> Path:
    """`path` if it names a regular .safetensors file whose header fits in it; AdapterFileError otherwise.

    Pickle formats are refused by name and by content, never loaded. `shown` is how messages name the file.
    """
    path = Path(path)
    shown = shown or str(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{shown}: only .safetensors files are read (pickle formats such as .ckpt/.pt/.bin "
                               "can run code); convert it to safetensors first")
    if not path.is_file():  # also keeps FIFOs and devices, which would block or never end, from being opened
        raise AdapterFileError(f"{shown}: file not found")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise AdapterFileError(f"{shown}: cannot be opened ({e.strerror or e}); check its permissions") from e
    if size < 8:
        raise AdapterFileError(f"{shown}: the file is {size} bytes, too short to be a safetensors file; {REDOWNLOAD}")
    length = int.from_bytes(head, "little")
    if 8 + length > size or length > HEADER_LIMIT:
        if head.startswith(PICKLE_STARTS):
            raise AdapterFileError(f"{shown}: this is a PyTorch pickle / zip file named .safetensors; such files can "
                                   "run code and are never read: convert it to safetensors with a trusted tool")
        claim = (f"more than the {HEADER_LIMIT:,} safetensors allows" if length > HEADER_LIMIT
                 else f"but the file has only {size:,}")
        raise AdapterFileError(f"{shown}: its header claims {length:,} bytes, {claim}: the file is cut short or not a "
                               f"safetensors file; {REDOWNLOAD}")
    return path


def unreadable(path: Path, shown: str, error: Exception) -> AdapterFileError:
    """A clear error for a file safetensors refused: cut-short data is named as such, the rest quoted."""
    needed = _data_end(path)
    size = path.stat().st_size if path.exists() else 0
    if needed is not None and needed > size:
        return AdapterFileError(f"{shown}: the file is cut short: its tensors need {needed:,} bytes, it has "
                                f"{size:,} (an incomplete download?); {REDOWNLOAD}")
    return AdapterFileError(f"{shown}: not a readable safetensors file ({error}); {REDOWNLOAD}")


def _data_end(path: Path) -> int | None:
    """Where the header says the tensor data ends, or None when the header cannot tell."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return 8 + length + max(int(end) for end in ends) if ends else None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError):
        return None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file (no pickle formats are ever loaded)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, str(path), e) from e
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
    with atomic_target(path, overwrite) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(path, e) from e
    return path


@contextmanager
def atomic_target(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary `.<name>.<random>.tmp` beside `path` to write; it becomes `path` when the block succeeds and
    is removed when it fails, so `path` is either the old file or the whole new one.

    The name ends in .tmp so that a leftover of a killed process is never listed as a model. With
    overwrite=False an existing `path` is never replaced (FileExistsError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes owner-only files; keep a replaced file's mode
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        yield Path(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_error(path: Path, error: OSError) -> OSError:
    """An OSError (same errno) saying that `path` was not written, that what was there is intact, and what to do."""
    before = "the previous file is unchanged" if path.exists() else "no file was written"
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        todo = "free some space and run again"
    else:
        todo = "check that the folder is writable and run again"
    out = OSError(f"{path}: could not be written ({error.strerror or error}); {before}; {todo}")
    out.errno = error.errno
    return out


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


def factor_problems(parts: dict[str, torch.Tensor]) -> list[str]:
    """Why a module's tensors cannot be used as numbers: NaN or infinite values, or a factor that is not a float
    (an integer alpha is fine); empty when they can."""
    problems = []
    for suffix, value in sorted(parts.items()):
        integer_alpha = suffix == "alpha" and not value.is_complex() and value.dtype != torch.bool
        if suffix == "alpha" and value.numel() != 1:  # kohya and LyCORIS write one number per module
            problems.append(f"alpha has {value.numel()} values (shape {list(value.shape)}), not one number")
        elif not (value.is_floating_point() or integer_alpha):
            problems.append(f"{suffix} is {str(value.dtype).removeprefix('torch.')}, not a float")
        elif value.is_floating_point():
            values = value if value.element_size() > 1 else value.float()  # no isnan for some 8-bit floats
            bad = [word for word, test in (("NaN", torch.isnan), ("infinite", torch.isinf)) if bool(test(values).any())]
            if bad:
                problems.append(f"{suffix} has {' and '.join(bad)} values")
    return problems


MAX_NAME = 200  # characters of one part of a name we write or read: room for "-step000100.safetensors" and "_2"


def path_inside(base: str | os.PathLike, relative: str, setting: str = "name") -> Path:
    """`base/relative`, refusing absolute paths, anything that escapes `base` (e.g. `..`), hidden or empty parts
    ('.', '.cache', 'a//b') and parts longer than MAX_NAME characters (`setting`: the input the name came from)."""
    if not relative or relative.strip() != relative:
        raise ValueError(f"{setting} {relative!r}: give a plain relative name such as 'my_lora' or 'folder/my_lora'")
    if "\x00" in relative:
        raise ValueError(f"{setting} {relative!r}: contains a NUL byte, which no file name can; give the file's name")
    parts = relative.split("/")
    if os.path.isabs(relative) or "\\" in relative or ".." in parts:
        raise ValueError(f"{setting} {relative!r}: absolute paths, backslashes and '..' are not allowed")
    if any(not part or part.startswith(".") for part in parts):
        raise ValueError(f"{setting} {relative!r}: a name (and each folder in it) must not be empty or start with "
                         "'.' (hidden); give a plain name such as 'my_lora' or 'folder/my_lora'")
    longest = max(len(part) for part in parts)
    if longest > MAX_NAME:
        raise ValueError(f"{setting} {relative[:40]!r}...: a name (and each folder in it) may have at most "
                         f"{MAX_NAME} characters, this has {longest}; give a shorter one")
    base = Path(base).resolve()
    path = (base / relative).resolve()
    if base != path and base not in path.parents:
        raise ValueError(f"{setting} {relative!r} points outside {base} (through a link?); only files inside it are "
                         "used")
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
