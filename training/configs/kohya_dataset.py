"""An sd-scripts / musubi-tuner dataset config (the `--dataset_config` TOML) read into a RunConfig."""

from __future__ import annotations

from typing import Any

from .kohya_args import read_buckets, read_resolution
from .kohya_names import REASONS, REPEATS_NAME, SUBSET_DEFAULTS, as_number, file_name, is_true
from .kohya_reader import Reader
from .run_config import ConfigError, RunConfig


def _tables(value: Any, label: str, source: str) -> list[dict]:
    """A list of tables (one table alone counts as a list of it), or a ConfigError naming `label`."""
    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}: {label} = {value!r} must be tables ([[{label}]])")
    return tables


def import_dataset(data: dict, config: RunConfig) -> None:
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise ConfigError(f"{config.source}: general = {general!r} must be a table ([general])")
    for key in data:
        if key not in ("general", "datasets"):
            config.unsupported.append(f"{key}: not supported (a dataset config has [general] and [[datasets]])")
    subsets = []  # (label, values with [general] and [[datasets]] under the subset's own)
    # [[datasets.subsets]] alone (as sd-scripts' masked-loss docs write it) is one dataset.
    for i, dataset in enumerate(_tables(data.get("datasets", []), "datasets", config.source)):
        level = {k: v for k, v in dataset.items() if k != "subsets"}
        if "subsets" not in dataset:  # musubi-tuner: a dataset is one folder, with no subsets
            subsets.append((f"datasets[{i}]", {**SUBSET_DEFAULTS, **general, **level}))
        for j, subset in enumerate(_tables(dataset.get("subsets", []), "datasets.subsets", config.source)):
            subsets.append((f"datasets[{i}].subsets[{j}]", {**SUBSET_DEFAULTS, **general, **level, **subset}))
    held_out = [s for s in subsets if _validation_only(s[1])]
    subsets = [s for s in subsets if not _validation_only(s[1])]
    images = [s for s in subsets if not is_true(s[1].get("is_reg", False))]
    regs = [s for s in subsets if is_true(s[1].get("is_reg", False))]
    if held_out and not images:
        raise ConfigError(f"{config.source}: validation_split = {held_out[0][1]['validation_split']!r}: every image "
                          "subset is validation only, so nothing would train")
    for label, values in held_out:
        config.unsupported.append(
            f"{label}: not supported (validation only (validation_split = {values['validation_split']}): our "
            f"held-out images are a share of the dataset folder, so {values.get('image_dir', 'this subset')} is not "
            "used; set validation_split (up to 0.5) to hold out a share of the training images)")
    main = images[0][1] if images else {**SUBSET_DEFAULTS, **general}
    _import_subset(main, config)
    if regs:
        _import_reg(*regs[0], main, config)
    for label, values in images[1:]:
        _extra_subset(label, values, "dataset", config)
    for label, values in regs[1:]:
        _extra_subset(label, values, "regularisation", config)


def _validation_only(values: dict) -> bool:
    """sd-scripts trains on none of a dataset whose validation_split is 1: all of it is held out."""
    split = as_number(values.get("validation_split"))
    return split is not None and split >= 1


def _import_subset(values: dict, config: RunConfig) -> None:
    r = Reader({k: v for k, v in values.items() if k != "is_reg"}, config)
    folder = r.take("image_dir")
    if folder is not None:
        r.set("dataset", "folder", folder, "image_dir")
        named = REPEATS_NAME.match(file_name(folder)) if isinstance(folder, str) else None
        if named and int(named.group(1)) != as_number(r.values["num_repeats"]):
            r.unsupported("num_repeats", f"{r.values['num_repeats']}: the folder's name {file_name(folder)!r} sets "
                                         f"{named.group(1)} repeats here (kohya's dataset config ignores it); "
                                         "rename the folder")
    if "batch_size" in r.values:
        r.values["train_batch_size"] = r.take("batch_size")
    _clips(r, folder)
    read_resolution(r)
    read_buckets(r)
    r.rest()


def _clips(r: Reader, image_dir: str | None) -> None:
    """musubi-tuner's video and edit subset keys (its dataset config is sd-scripts' with these added)."""
    videos = r.take("video_directory")
    if videos is not None and image_dir is not None:
        r.unsupported("video_directory", f"{videos}: this subset's image_dir is the folder; put the videos in it "
                                         "(Load Dataset reads images and videos together)")
    elif videos is not None:
        r.set("dataset", "folder", videos, "video_directory")
    targets = r.take("target_frames")
    if targets is not None:
        counts = [as_number(t) for t in (targets if isinstance(targets, list) else [targets])]
        if not counts or not all(isinstance(c, int) for c in counts):
            counts = [targets]  # checked_value says what it takes
        r.set("dataset", "frames", max(counts), "target_frames")
        if len(counts) > 1:
            r.unsupported("target_frames", f"{counts}: one sample length per clip; {max(counts)} is used (clips "
                                           "shorter than it train with the longest length they have)")
    extraction = r.take("frame_extraction")
    if extraction in ("head", "chunk", "uniform"):
        r.set("dataset", "frame_extraction", extraction, "frame_extraction")
    elif extraction is not None:
        r.unsupported("frame_extraction", f"{extraction}: ours are head, chunk and uniform")
    control = r.take("control_directory")
    if control is not None:
        r.set("dataset", "control_folder", control, "control_directory")


def _import_reg(label: str, values: dict, main: dict, config: RunConfig) -> None:
    r = Reader({}, config)
    if "image_dir" in values:
        r.set("dataset", "reg_folder", values["image_dir"], f"{label}.image_dir")
    repeats = values.get("num_repeats", 1)
    if as_number(repeats) != 1:
        r.unsupported(f"{label}.num_repeats", f"{repeats}: put the regularisation images in a `{repeats}_name` "
                                              "sub-folder of the regularisation folder")
    for key, value in values.items():
        if key in ("image_dir", "is_reg", "num_repeats") or main.get(key) == value:
            continue
        r.unsupported(f"{label}.{key}", REASONS.get(key, "the image subset's value holds for every image"))


def _extra_subset(label: str, values: dict, kind: str, config: RunConfig) -> None:
    repeats = values.get("num_repeats", 1)
    config.unsupported.append(
        f"{label}: not supported (one dataset folder and one regularisation folder per run: put the images of "
        f"{values.get('image_dir', 'this subset')} in a `{repeats}_name` sub-folder of the {kind} folder)")
