"""What an adapter file says about itself, read from its safetensors header only (no tensor data)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from .files import check_safetensors, split_modules, unreadable

TOP_TAGS = 40
MAX_VALUE_CHARS = 2000
MAX_TAG_CHARS = 200  # a tag, trigger word, title or metadata key
MAX_TRIGGER_WORDS = 50
MAX_METADATA_KEYS = 500
MAX_COUNT = 2**53  # larger counts lose digits in the browser's JSON
JSON_KEYS = ("ss_network_args", "ss_tag_frequency", "lora_foundry_training")  # the JSON-valued ones read here
TRAINING_KEYS = {
    "ss_learning_rate": "learning_rate", "ss_unet_lr": "unet_lr", "ss_text_encoder_lr": "text_encoder_lr",
    "ss_optimizer": "optimizer", "ss_lr_scheduler": "scheduler", "ss_lr_warmup_steps": "warmup_steps",
    "ss_steps": "steps", "ss_max_train_steps": "max_steps", "ss_num_epochs": "epochs",
    "ss_num_train_images": "images", "ss_batch_size_per_device": "batch_size", "ss_resolution": "resolution",
    "ss_mixed_precision": "precision", "ss_seed": "seed", "ss_min_snr_gamma": "min_snr_gamma",
    "ss_noise_offset": "noise_offset", "ss_gradient_accumulation_steps": "grad_accum", "ss_max_grad_norm": "grad_clip",
    "ss_network_args": "network_args", "ss_training_started_at": "started_at",
}
ALGORITHM_BY_SUFFIX = (("boft_blocks", "boft"), ("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"),
                       ("oft_blocks", "oft"), ("a1.weight", "glora"), ("lora_down.weight", "lora"), ("lora_A.weight", "lora"), ("diff", "full"))
REPEATS_PREFIX = re.compile(r"^\d+_")


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor key: shape}) of a .safetensors file, reading only its JSON header."""
    from safetensors import SafetensorError, safe_open

    path = check_safetensors(path, Path(path).name)  # names only the file: these messages go to browsers
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, path.name, e) from e
    return metadata, shapes


def json_fields(metadata: dict[str, str]) -> tuple[dict[str, object], list[str]]:
    """The JSON-valued metadata this summary reads, parsed, and a note for each one that is not valid JSON."""
    parsed, notes = {}, []
    for key in JSON_KEYS:
        if not metadata.get(key):
            continue
        try:
            parsed[key] = json.loads(metadata[key])
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
            notes.append(f"{key}: not valid JSON ({_text(str(e), 120)}); shown as text under metadata")
    return parsed, notes


def _text(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def algorithm(metadata: dict[str, str], suffixes: set[str], args: object = None) -> str:
    """lora / locon / loha / lokr / dylora / oft / boft / glora / full, from kohya metadata (args: ss_network_args parsed) or
    else from the key names."""
    module = _text(metadata.get("ss_network_module", ""), MAX_TAG_CHARS)
    args = args if isinstance(args, dict) else {}
    if args.get("algo"):
        return _text(args["algo"], MAX_TAG_CHARS)
    if "dylora" in module:
        return "dylora"
    for suffix, name in ALGORITHM_BY_SUFFIX:
        if suffix in suffixes:
            if name == "lora" and args.get("conv_dim"):
                return "locon"
            return name
    return module or "unknown"


def rank(metadata: dict[str, str], modules: dict[str, dict[str, list[int]]]) -> int | None:
    """ss_network_dim, or else the most common rank among the file's LoRA down matrices (OFT / BOFT: block size)."""
    dim = metadata.get("ss_network_dim", "")
    if dim.isdecimal() and len(dim) < 10:  # isdigit() takes "²", which int() refuses
        return int(dim)
    ranks = Counter(shapes[s][0] for shapes in modules.values() for s in ("lora_down.weight", "lora_A.weight")
                    if s in shapes and shapes[s])
    ranks += Counter(shapes["oft_blocks"][-1] for shapes in modules.values() if shapes.get("oft_blocks"))  # block size
    return ranks.most_common(1)[0][0] if ranks else None


def _is_count(value: object) -> bool:
    # The comparisons are False for NaN and refuse infinities and numbers the browser cannot hold exactly.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def tag_frequency(data: object, notes: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(top tags over all datasets, trigger words from kohya `N_words` folder names) of ss_tag_frequency parsed;
    what is not a count is left out, with a note."""
    if data is None:
        return [], []
    if not isinstance(data, dict):
        notes.append("ss_tag_frequency: not a {folder: {tag: count}} object; left out")
        return [], []
    counts: Counter = Counter()
    folders, bad = [], 0
    for folder, tags in data.items():
        if REPEATS_PREFIX.match(folder):
            folders.append(_text(REPEATS_PREFIX.sub("", folder).strip(), MAX_TAG_CHARS))
        if not isinstance(tags, dict):
            bad += 1
            continue
        for tag, n in tags.items():
            if _is_count(n):
                counts[_text(tag.strip(), MAX_TAG_CHARS)] += int(n)
            else:
                bad += 1
    if bad:
        notes.append(f"ss_tag_frequency: {bad} entries that are not counts (not numbers, negative, NaN, infinite "
                     "or huge) left out")
    return counts.most_common(TOP_TAGS), [f for f in folders if f]


def trigger_words(metadata: dict[str, str], training: object, folder_words: list[str]) -> list[str]:
    words = [metadata.get("modelspec.trigger_phrase", "")]
    if isinstance(training, dict) and isinstance(training.get("captions"), dict):
        words.append(str(training["captions"].get("trigger_word") or ""))
    words += folder_words
    unique = dict.fromkeys(_text(w.strip(), MAX_TAG_CHARS) for w in words if w and w.strip())
    return list(unique)[:MAX_TRIGGER_WORDS]


def base_model(metadata: dict[str, str]) -> str:
    for key in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name"):
        if metadata.get(key):
            return _text(metadata[key], MAX_TAG_CHARS)
    return ""


def shown_metadata(metadata: dict[str, str], notes: list[str]) -> dict[str, str]:
    """The metadata as text, each value cut at MAX_VALUE_CHARS and at most MAX_METADATA_KEYS keys, the kohya,
    modelspec and our own ones first."""
    if len(metadata) > MAX_METADATA_KEYS:
        notes.append(f"metadata: {len(metadata) - MAX_METADATA_KEYS} of {len(metadata)} keys not shown")
    keys = sorted(metadata, key=lambda k: not k.startswith(("ss_", "modelspec.", "lora_foundry")))[:MAX_METADATA_KEYS]
    return {_text(k, MAX_TAG_CHARS): _text(metadata[k]) for k in keys}


def lora_info(path: str | os.PathLike) -> dict:
    """A summary of an adapter file for people: base model, algorithm, rank, trigger words, tags, settings.

    Only an unreadable header raises (AdapterFileError); metadata that is not what it should be is shown as
    text or left out, and `notes` says which.
    """
    path = Path(path)
    metadata, shapes = read_header(path)
    modules, _ = split_modules(shapes)
    suffixes = {s for parts in modules.values() for s in parts}
    if any(len(parts.get("oft_blocks", ())) == 4 for parts in modules.values()):
        suffixes.add("boft_blocks")  # BOFT's butterfly stages: the same key as OFT's blocks, one dimension more
    parsed, notes = json_fields(metadata)
    tags, folder_words = tag_frequency(parsed.get("ss_tag_frequency"), notes)
    training = {label: _text(metadata[key]) for key, label in TRAINING_KEYS.items() if metadata.get(key)}
    return {
        "file_size": path.stat().st_size,
        "title": _text(metadata.get("modelspec.title") or metadata.get("ss_output_name") or path.stem, MAX_TAG_CHARS),
        "base_model": base_model(metadata),
        "algorithm": algorithm(metadata, suffixes, parsed.get("ss_network_args")),
        "rank": rank(metadata, modules),
        "alpha": _text(metadata["ss_network_alpha"], MAX_TAG_CHARS) if metadata.get("ss_network_alpha") else None,
        "modules": len(modules),
        "text_encoder": any(name.startswith("lora_te") for name in modules),
        "trigger_words": trigger_words(metadata, parsed.get("lora_foundry_training"), folder_words),
        "tag_frequency": tags,
        "training": training,
        "metadata": shown_metadata(metadata, notes),
        "notes": notes,
    }
