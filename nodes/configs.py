"""Load Training Config and Save Training Config: a run's settings as a file (ours or kohya's) in the graph."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from ..lora_core.files import numbered_path, path_inside, write_bytes_atomic
from ..training.configs.kohya_export import export_kohya
from ..training.configs.reading import read_config
from ..training.configs.run_config import ConfigError, RunConfig, from_metadata, to_toml
from .inputs import CATEGORY, Lora, Node, TrainingConfig

CONFIGS_FOLDER = "lora_foundry_configs"  # models/lora_foundry_configs: not a folder other tools read
CONFIG_EXTENSIONS = (".toml", ".json", ".yaml", ".yml")
PASTED = "(the text below)"
FORMATS = {"lora foundry toml": (".toml", to_toml), "kohya sd-scripts toml": (".toml", export_kohya)}


def configs_folder() -> Path:
    """models/lora_foundry_configs (registered with ComfyUI's folder_paths, so other model paths can add more)."""
    import folder_paths

    if CONFIGS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CONFIGS_FOLDER, os.path.join(folder_paths.models_dir, CONFIGS_FOLDER))
    return Path(folder_paths.get_folder_paths(CONFIGS_FOLDER)[0])


def config_files() -> list[str]:
    import folder_paths

    configs_folder()
    return sorted(f for f in folder_paths.get_filename_list(CONFIGS_FOLDER) if f.endswith(CONFIG_EXTENSIONS))


class LoadTrainingConfig(Node):
    CHECKED_AT_RUN = ("config_file",)  # a file deleted since the list was made gets its own message

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryLoadTrainingConfig", display_name="Load Training Config", category=CATEGORY,
            description="Settings for Train LoRA and Load Dataset from a file in models/lora_foundry_configs or "
                        "pasted text: our TOML, a kohya sd-scripts TOML (training arguments or dataset config), "
                        "a kohya_ss GUI JSON, an ai-toolkit job (YAML / JSON) or a OneTrainer config (JSON). Keys "
                        "that do not map are listed on the node.",
            inputs=[io.Combo.Input("config_file", options=[PASTED, *config_files()], default=PASTED),
                    io.String.Input("text", default="", multiline=True,
                                    tooltip="Config text, used when config_file is the text below.")],
            outputs=[TrainingConfig.Output(display_name="config"), io.String.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, config_file: str, text: str) -> io.NodeOutput:
        import folder_paths

        if config_file == PASTED:
            if not text.strip():
                raise ConfigError("text: paste a config, or choose a file in config_file")
            config = read_config(text, "pasted config")
        else:
            path = folder_paths.get_full_path(CONFIGS_FOLDER, config_file)
            if path is None:
                raise ConfigError(f"config_file: {config_file!r} is not in {configs_folder()}; refresh the list")
            config = read_config(Path(path).read_text(encoding="utf-8"), config_file)
        shown = config.describe()
        return io.NodeOutput(config, shown, ui={"text": [shown]})

    @classmethod
    def fingerprint_inputs(cls, config_file: str, text: str):
        if config_file == PASTED:
            return text
        import folder_paths

        path = folder_paths.get_full_path(CONFIGS_FOLDER, config_file)
        return os.stat(path).st_mtime_ns if path else config_file  # an edited file is read again


class SaveTrainingConfig(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundrySaveTrainingConfig", display_name="Save Training Config", category=CATEGORY,
            is_output_node=True,
            description="Save the settings a LoRA was trained with (Train LoRA's lora output) as our TOML or as a "
                        "kohya sd-scripts training TOML, in models/lora_foundry_configs.",
            inputs=[Lora.Input("lora"),
                    io.String.Input("filename_prefix", default="my_lora"),
                    io.Combo.Input("format", options=list(FORMATS), default="lora foundry toml"),
                    io.Boolean.Input("overwrite", default=False, tooltip="Write exactly <prefix>.toml, replacing "
                                     "it; otherwise a counter is added and nothing is replaced.")],
            outputs=[io.String.Output(display_name="path"), io.String.Output(display_name="text")],
        )

    @classmethod
    def execute(cls, lora, filename_prefix: str, format: str, overwrite: bool) -> io.NodeOutput:
        config: RunConfig = from_metadata(dict(getattr(lora, "metadata", None) or {}), "the lora input")
        suffix, write = FORMATS[format]
        text = write(config)
        base = configs_folder()
        path = path_inside(base, filename_prefix + suffix) if overwrite else numbered_path(base, filename_prefix,
                                                                                            suffix)
        write_bytes_atomic(text.encode("utf-8"), path, overwrite=overwrite)
        return io.NodeOutput(str(path), text, ui={"text": [str(path)]})


NODES = [LoadTrainingConfig, SaveTrainingConfig]
