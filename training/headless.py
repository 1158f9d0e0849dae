"""Training without a graph: a config file in, the same engine and files out, on one process or many (torchrun).

Models load through the host's own loader nodes (CheckpointLoaderSimple, or UNETLoader + CLIPLoader + VAELoader),
the dataset as Load Dataset loads it, and the run goes through training.run.train as Train LoRA's does, so for the
same settings and seed both write the same adapter. scripts/train_lora.py sets up the host and calls `main`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..lora_core.files import write_safetensors
from ..lora_core.settings import from_inputs
from .configs.kohya_families import FAMILY_CLIP_TYPES
from .configs.reading import read_config
from .configs.run_config import GRAPH_SECTIONS, ConfigError, RunConfig
from .data.dataset_options import DatasetOptions
from .engine import distributed
from .engine.config import TrainingError
from .run import expert_name, resolve_input_folder, run_folders, settings, train

CLIP_LOADERS = {1: ("CLIPLoader", "stable_diffusion"), 2: ("DualCLIPLoader", "flux"), 3: ("TripleCLIPLoader", "")}


def host_nodes():
    """ComfyUI's nodes.py (its loaders); loaded from the host's file when `nodes` is another package's."""
    module = sys.modules.get("nodes")
    if module is None or not hasattr(module, "CheckpointLoaderSimple"):
        import folder_paths

        spec = importlib.util.spec_from_file_location("nodes", Path(folder_paths.__file__).parent / "nodes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["nodes"] = module
        spec.loader.exec_module(module)
    return module


def model_file(folder: str, name: str, key: str) -> str:
    """A name the host's loader for `folder` lists: a file's name there, or a path (its folder is added)."""
    import folder_paths

    path = Path(name).expanduser()
    if path.is_absolute() or (len(path.parts) > 1 and path.exists()):
        if not path.is_file():
            raise ConfigError(f"[model] {key}: {path} is not a file")
        folder_paths.add_model_folder_path(folder, str(path.resolve().parent))
        return path.name
    if folder_paths.get_full_path(folder, name) is None:
        raise ConfigError(f"[model] {key}: {name!r} is not in models/{folder} ({', '.join(folder_paths.get_folder_paths(folder))}); "
                          "give its name there or a path")
    return name


def load_models(config: RunConfig) -> tuple:
    """(MODEL, CLIP, VAE) from the [model] section, through the host's loader nodes."""
    nodes = host_nodes()
    value = config.run_value
    if value("model", "checkpoint"):
        name = model_file("checkpoints", value("model", "checkpoint"), "checkpoint")
        return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
    missing = [k for k in ("diffusion_model", "text_encoders", "vae") if not value("model", k)]
    if missing:
        raise ConfigError(f"{config.source}: [model] needs a checkpoint, or diffusion_model, text_encoders and vae "
                          f"(missing: {', '.join(missing)})")
    model = nodes.UNETLoader().load_unet(model_file("diffusion_models", value("model", "diffusion_model"),
                                                    "diffusion_model"), value("model", "weight_dtype"))[0]
    encoders = [model_file("text_encoders", name, "text_encoders") for name in value("model", "text_encoders")]
    loader, clip_type = clip_loader(config, len(encoders))
    clip = getattr(nodes, loader)().load_clip(*encoders, *([clip_type] if clip_type else []))[0]
    vae = nodes.VAELoader().load_vae(model_file("vae", value("model", "vae"), "vae"))[0]
    return model, clip, vae


def clip_loader(config: RunConfig, files: int) -> tuple[str, str]:
    """The host's loader node for `files` text encoders and its type: [model] clip_type, else for one file the type
    of [model] family (the host reads Wan's UMT5 as a T5-XXL and builds it as Mochi's T5 unless the type is wan), else
    the loader's own default."""
    if files not in CLIP_LOADERS:
        raise ConfigError(f"[model] text_encoders: give 1 to 3 files, not {files}")
    loader, default_type = CLIP_LOADERS[files]
    family_type = FAMILY_CLIP_TYPES.get(config.run_value("model", "family"), "") if files == 1 else ""
    return loader, config.run_value("model", "clip_type") or family_type or default_type


def progress(total: int):
    """A tqdm bar over the steps, with the loss (and held-out loss) as it goes."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def report(info: dict) -> None:
        info.pop("preview", None)
        shown = {"loss": f"{info['loss']:.4f}"}
        if info.get("validation") is not None:
            shown["held_out"] = f"{info['validation']:.4f}"
        bar.total = info["total"]  # with epochs, the steps are known once the run starts
        bar.set_postfix(shown, refresh=False)
        bar.update(info["step"] - bar.n)
        if info["step"] >= info["total"] or info.get("stopped_early"):
            bar.close()

    return report


def run(config: RunConfig, processes: distributed.Processes = distributed.SINGLE) -> Path | None:
    """Train as the config says; the adapter's path (None on processes that write nothing)."""
    import folder_paths
    import torch

    precision = config.run_value("run", "save_precision")
    network_config, train_config = settings(config.inputs(*GRAPH_SECTIONS))  # a bad setting fails before loading
    model, clip, vae = load_models(config)
    options = from_inputs(DatasetOptions, config.inputs("dataset"))
    dataset = options.load(lambda folder, setting: resolve_input_folder(folder, setting, restricted=False))
    folders = run_folders(folder_paths.get_folder_paths("loras")[0], folder_paths.get_output_directory(),
                          expert_name(config.run_value("run", "output_name"), train_config.expert),
                          config.run_value("run", "resume"))
    processes.barrier()  # every process chose the folders before the first writes to them
    on_step = progress(train_config.steps) if processes.writes else None
    network, _, result = train(model, clip, vae, dataset, network_config, train_config, folders, on_step, processes)
    if not processes.writes:
        return None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    path = folders.loras / f"{folders.name}.safetensors"
    write_safetensors(network.state_dict_kohya(dtype), path, {**network.metadata, "ss_output_name": folders.name})
    print(f"{result.steps} steps in {result.seconds:.1f}s; adapter: {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """Train as the config says; 0 when done. A setting, file or dataset the user must fix (and a run that stopped
    for a reason the user must act on) is printed as one line saying what to do, exit status 2, no traceback."""
    parser = argparse.ArgumentParser(description="Train a LoRA from a config file (ours or kohya's) without a graph.")
    parser.add_argument("config", type=Path, help="our TOML, a kohya sd-scripts TOML or a kohya_ss GUI JSON")
    parser.add_argument("--dataset-config", type=Path, help="a kohya dataset TOML (with a training TOML)")
    args = parser.parse_args(argv)
    try:
        return train_from(args)
    except (ValueError, TrainingError, OSError) as e:  # ConfigError, DatasetError, AdapterFileError: ValueErrors
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"train_lora: {'; '.join(lines)}", file=sys.stderr, flush=True)
        return 2


def train_from(args: argparse.Namespace) -> int:
    config = read_config(args.config.read_text(encoding="utf-8"), str(args.config))
    if args.dataset_config is not None:
        extra = read_config(args.dataset_config.read_text(encoding="utf-8"), str(args.dataset_config))
        for section, values in extra.values.items():  # a dataset config's subset options are captions, flip, ...
            config.section(section).update(values)
        config.unsupported += extra.unsupported
        config.changed += extra.changed
    for line in config.changed:
        print(f"changed: {line}", file=sys.stderr)
    for line in config.unsupported:
        print(f"not supported (ignored): {line}", file=sys.stderr)
    import comfy.model_management

    processes = distributed.from_environment(comfy.model_management.get_torch_device())
    try:
        run(config, processes)
    finally:
        processes.close()
    return 0
