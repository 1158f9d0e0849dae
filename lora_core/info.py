"""What an adapter file says about itself, read from its safetensors header only (no tensor data)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from .files import AdapterFileError, split_modules

TOP_TAGS = 40
MAX_VALUE_CHARS = 2000
TRAINING_KEYS = {
    "ss_learning_rate": "learning_rate", "ss_unet_lr": "unet_lr", "ss_text_encoder_lr": "text_encoder_lr",
    "ss_optimizer": "optimizer", "ss_lr_scheduler": "scheduler", "ss_lr_warmup_steps": "warmup_steps",
    "ss_steps": "steps", "ss_max_train_steps": "max_steps", "ss_num_epochs": "epochs",
    "ss_num_train_images": "images", "ss_batch_size_per_device": "batch_size", "ss_resolution": "resolution",
    "ss_mixed_precision": "precision", "ss_seed": "seed", "ss_min_snr_gamma": "min_snr_gamma",
    "ss_noise_offset": "noise_offset", "ss_gradient_accumulation_steps": "grad_accum", "ss_max_grad_norm": "grad_clip",
    "ss_network_args": "network_args", "ss_training_started_at": "started_at",
}
ALGORITHM_BY_SUFFIX = (("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"), ("oft_blocks", "oft"),
                       ("lora_down.weight", "lora"), ("lora_A.weight", "lora"), ("diff", "full"))
REPEATS_PREFIX = re.compile(r"^\d+_")


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor key: shape}) of a .safetensors file, reading only its JSON header."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path.name}: only .safetensors files are read")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path.name}: not a readable safetensors file ({e})") from e
    return metadata, shapes


def _json(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def algorithm(metadata: dict[str, str], suffixes: set[str]) -> str:
    """lora / locon / loha / lokr / dylora / oft / full, from kohya metadata or else from the key names."""
    module = metadata.get("ss_network_module", "")
    args = _json(metadata.get("ss_network_args")) or {}
    if isinstance(args, dict) and args.get("algo"):
        return str(args["algo"])
    if "dylora" in module:
        return "dylora"
    for suffix, name in ALGORITHM_BY_SUFFIX:
        if suffix in suffixes:
            if name == "lora" and isinstance(args, dict) and args.get("conv_dim"):
                return "locon"
            return name
    return module or "unknown"


def rank(metadata: dict[str, str], modules: dict[str, dict[str, list[int]]]) -> int | None:
    """ss_network_dim, or else the most common rank among the file's LoRA down matrices."""
    dim = metadata.get("ss_network_dim", "")
    if dim.isdigit():
        return int(dim)
    ranks = Counter(shapes[s][0] for shapes in modules.values() for s in ("lora_down.weight", "lora_A.weight")
                    if s in shapes and shapes[s])
    return ranks.most_common(1)[0][0] if ranks else None


def tag_frequency(metadata: dict[str, str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(top tags over all datasets, trigger words from kohya `N_words` folder names) of ss_tag_frequency."""
    data = _json(metadata.get("ss_tag_frequency")) or {}
    counts: Counter = Counter()
    folders = []
    for folder, tags in data.items() if isinstance(data, dict) else ():
        if REPEATS_PREFIX.match(folder):
            folders.append(REPEATS_PREFIX.sub("", folder).strip())
        if isinstance(tags, dict):
            counts.update({str(t).strip(): int(n) for t, n in tags.items() if isinstance(n, (int, float))})
    return counts.most_common(TOP_TAGS), [f for f in folders if f]


def trigger_words(metadata: dict[str, str], folder_words: list[str]) -> list[str]:
    words = [metadata.get("modelspec.trigger_phrase", "")]
    training = _json(metadata.get("lora_foundry_training")) or {}
    if isinstance(training, dict) and isinstance(training.get("captions"), dict):
        words.append(str(training["captions"].get("trigger_word") or ""))
    words += folder_words
    return list(dict.fromkeys(w.strip() for w in words if w and w.strip()))


def base_model(metadata: dict[str, str]) -> str:
    for key in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name"):
        if metadata.get(key):
            return metadata[key]
    return ""


def lora_info(path: str | os.PathLike) -> dict:
    """A summary of an adapter file for people: base model, algorithm, rank, trigger words, tags, settings."""
    path = Path(path)
    metadata, shapes = read_header(path)
    modules, _ = split_modules(shapes)
    suffixes = {s for parts in modules.values() for s in parts}
    tags, folder_words = tag_frequency(metadata)
    training = {label: metadata[key] for key, label in TRAINING_KEYS.items() if metadata.get(key)}
    return {
        "file_size": path.stat().st_size,
        "title": metadata.get("modelspec.title") or metadata.get("ss_output_name") or path.stem,
        "base_model": base_model(metadata),
        "algorithm": algorithm(metadata, suffixes),
        "rank": rank(metadata, modules),
        "alpha": metadata.get("ss_network_alpha"),
        "modules": len(modules),
        "text_encoder": any(name.startswith("lora_te") for name in modules),
        "trigger_words": trigger_words(metadata, folder_words),
        "tag_frequency": tags,
        "training": training,
        "metadata": {k: v if len(v) <= MAX_VALUE_CHARS else v[:MAX_VALUE_CHARS] + "..." for k, v in metadata.items()},
    }
