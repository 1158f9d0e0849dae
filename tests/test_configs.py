"""Config files (our TOML), Load / Save Training Config through the server, the headless command, and torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness.comfy import REPO_ROOT
from harness.workflow import default_inputs

HEADLESS = REPO_ROOT / "scripts" / "train_lora.py"


@pytest.fixture(scope="module")
def rc(pack):
    from lora_foundry.training.configs import run_config
    return run_config


def test_our_toml_round_trips_every_setting(rc):
    """Every declared setting written (with its help as a comment) reads back to the same values and objects."""
    from lora_foundry.lora_core.network import NetworkConfig
    from lora_foundry.lora_core.settings import from_inputs
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.data.dataset_options import DatasetOptions
    from lora_foundry.training.engine.config import TrainConfig

    network = NetworkConfig(algorithm="loha", rank=8, alpha=4.0, conv_rank=2, include=["*.proj_out"],
                            block_ranks="1,0.5,1", dora=True)
    captions = CaptionOptions(trigger_word='sks "quoted" \\ tag', shuffle_tags=True, keep_tokens=2)
    training = TrainConfig(steps=123, learning_rate=3e-6, optimizer="Prodigy", optimizer_args=["decouple=True"],
                           sample_prompts=["a sks --w 64", "ünïcode\ttab"], ema_decay=0.99, captions=captions)
    dataset = DatasetOptions(folder="/data/x", resolution=768, repeats=3, alpha_mask=True)
    config = rc.settings_values(network, training, dataset, "run_name")
    text = rc.to_toml(config)
    assert "# Adapter rank (kohya's network_dim). (default 16)\nrank = 8\n" in text
    back = rc.parse_toml(text, "t.toml")
    assert back.unsupported == []
    assert {k: v for k, v in back.values.items() if v} == {k: v for k, v in config.values.items() if v}
    assert from_inputs(NetworkConfig, back.inputs("network")) == network
    assert from_inputs(TrainConfig, back.inputs("training"), captions=from_inputs(CaptionOptions,
                                                                                   back.inputs("captions"))) == training
    assert from_inputs(DatasetOptions, back.inputs("dataset")) == dataset


@pytest.mark.parametrize(("text", "message"), [
    ("[training]\nsteps = 'ten'", "[training] steps = 'ten' must be a whole number"),
    ("[training]\nsteps = 0", "[training] steps = 0 is outside 1 to 1e+06"),
    ("[training]\noptimizer = 'Adam'", "[training] optimizer = 'Adam' is not one of AdamW, AdamW8bit"),
    ("[network]\ndora = 1", "[network] dora = 1 must be true or false"),
    ("[training]\nlearning_rate = nan", "[training] learning_rate = nan must be a finite number"),
    ("[training\nsteps = 1", "my.toml: not valid TOML"),
])
def test_bad_values_name_the_file_and_key(rc, text, message):
    with pytest.raises(rc.ConfigError, match=None) as error:
        rc.parse_toml(text, "my.toml")
    assert message in str(error.value) and "my.toml" in str(error.value)


def test_unknown_keys_and_sections_are_listed_not_dropped(rc):
    config = rc.parse_toml("[training]\nsteps = 5\nwarp_drive = true\n[optimizer]\nlr = 1\n", "x")
    assert config.values["training"] == {"steps": 5}
    assert config.unsupported == ["[training] warp_drive: not a setting",
                                  "[optimizer]: not a section of ours (run, model, network, training, captions, "
                                  "dataset)"]
    assert "not supported (ignored):\n    [training] warp_drive: not a setting" in config.describe()


def test_optimizer_args_reach_the_optimizer(pack):
    from lora_foundry.training.engine.config import TrainConfig
    from lora_foundry.training.engine.optim import parse_optimizer_args

    assert parse_optimizer_args(["betas=0.9,0.99 eps=1e-6", "amsgrad=True foreach=False", "mode=x"]) == {
        "betas": (0.9, 0.99), "eps": 1e-6, "amsgrad": True, "foreach": False, "mode": "x"}
    with pytest.raises(ValueError, match="optimizer_args: 'betas' is not key=value"):
        TrainConfig(optimizer_args=["betas"])
    with pytest.raises(ValueError, match="weight_decay are settings of their own"):
        TrainConfig(optimizer_args=["weight_decay=0.1"])


# --- the graph and the headless command -------------------------------------------------------------------------------

RUN_TOML = """
[run]
output_name = "{name}"
save_precision = "fp32"

[dataset]
folder = "{folder}"
resolution = 64
min_side = 64
max_side = 64
bucket_step = 64

[network]
rank = 4
alpha = 4.0
targets = "attention"

[training]
steps = {steps}
batch_size = {batch}
learning_rate = {lr}
save_every = 2
optimizer_args = ["betas=0.9,0.98"]

[captions]
trigger_word = "sks"
"""


def headless(config: Path, base: Path, *, processes: int = 1, threads: int | None = None) -> subprocess.CompletedProcess:
    """scripts/train_lora.py on `config` with ComfyUI's base directory `base`, under torchrun for processes > 1."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(HEADLESS)]
    else:
        command = [sys.executable, str(HEADLESS)]
    result = subprocess.run([*command, str(config), "--base-directory", str(base), "--cpu"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def base_directory(root: Path, checkpoint: Path) -> Path:
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    return root


def adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.server
def test_graph_and_headless_write_the_same_lora(pack, server, tiny_checkpoint, concept_dataset, tmp_path):
    """Load Training Config (pasted TOML) drives Load Dataset and Train LoRA through the server; Save Training Config
    writes what the LoRA was trained with; the headless command on that saved file writes the same tensors."""
    from lora_foundry.training.configs.run_config import parse_toml

    text = RUN_TOML.format(name="cfg_graph", folder=concept_dataset, steps=4, batch=2, lr=1e-3)
    info = server.object_info()
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "LoraFoundryLoadTrainingConfig", "inputs": {"config_file": "(the text below)",
                                                                        "text": text}},
        # The widgets say otherwise everywhere the config speaks: the config must win.
        "3": {"class_type": "LoraFoundryLoadDataset", "inputs": {**default_inputs(info["LoraFoundryLoadDataset"]),
                                                                 "folder": "nowhere", "config": ["2", 0]}},
        "4": {"class_type": "LoraFoundryTrainLoRA", "inputs": {
            **default_inputs(info["LoraFoundryTrainLoRA"]), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
            "dataset": ["3", 0], "config": ["2", 0], "output_name": "widget_name", "rank": 32, "steps": 99}},
        "5": {"class_type": "LoraFoundrySaveLoRA", "inputs": {"lora": ["4", 0], "filename_prefix": "cfg_graph",
                                                             "precision": "fp32", "folder": "loras",
                                                             "overwrite": False}},
        "6": {"class_type": "LoraFoundrySaveTrainingConfig", "inputs": {
            "lora": ["4", 0], "filename_prefix": "cfg_graph", "format": "lora foundry toml", "overwrite": False}},
    }
    outputs = server.run(prompt, timeout=600)
    assert "[training] steps = 4" in outputs["2"]["text"][0]
    summary = outputs["4"]["text"][0]
    assert "rank 4" in summary and "4 steps" in summary and "pasted config:" in summary, summary
    graph_file = Path(outputs["5"]["text"][0])
    saved = Path(outputs["6"]["text"][0])
    assert saved.parent == server.base_dir / "models" / "lora_foundry_configs" and saved.suffix == ".toml"
    assert (server.base_dir / "models" / "loras" / "cfg_graph" / "cfg_graph-step000004.safetensors").is_file()

    # What Save Training Config wrote holds the settings the run used (everything, not only what the text set).
    written = parse_toml(saved.read_text(), saved.name)
    given = parse_toml(text, "given")
    for section, values in given.values.items():
        if section != "run":
            assert {k: written.values[section][k] for k in values} == values, section
    assert written.values["network"]["algorithm"] == "lora" and written.values["training"]["seed"] == 0

    # The headless command trains from the saved file (plus the model) and writes the same adapter, bit for bit.
    base = base_directory(tmp_path / "base", tiny_checkpoint)
    config = tmp_path / "headless.toml"
    config.write_text(saved.read_text().replace("[run]\n", '[run]\nsave_precision = "fp32"\n')
                      + f'\n[model]\ncheckpoint = "{tiny_checkpoint.name}"\n')
    result = headless(config, base)
    assert "4 steps in" in result.stdout and "loss=" in result.stderr  # tqdm's bar
    graph, alone = adapter(graph_file), adapter(base / "models" / "loras" / "cfg_graph" / "cfg_graph.safetensors")
    assert graph.keys() == alone.keys() and len(graph) > 0
    assert all(torch.equal(graph[k], alone[k]) for k in graph), "the headless adapter differs from the graph's"
    assert any(graph[k].abs().max() > 1e-4 for k in graph if "lora_up" in k)  # it trained
    assert (base / "output" / "lora_foundry_runs" / "cfg_graph" / "cfg_graph-state.safetensors").is_file()


# --- many processes ---------------------------------------------------------------------------------------------------

# Adam normalises each element's gradient, so elements whose gradient is near zero turn the last-bit differences of
# a batch of 2 (one process) against two batches of 1 summed (two) into differences of up to about 3% of one step's
# update: with learning rate 1e-5 that stays under 1e-6, while a run that saw other data differs by ~1e-5.
DDP_LR = 1e-5


def run_config(tmp_path: Path, name: str, dataset: Path, steps: int, batch: int, resume: bool = False) -> Path:
    path = tmp_path / f"{name}-{steps}-{batch}.toml"
    text = RUN_TOML.format(name=name, folder=dataset, steps=steps, batch=batch, lr=DDP_LR)
    text = text.replace("[run]\n", f"[run]\nresume = {'true' if resume else 'false'}\n")
    # Modules dropped at some steps: a parameter no process has a gradient for must stay untouched, as in one.
    text = text.replace("[network]\n", "[network]\nmodule_dropout = 0.3\n")
    path.write_text(text + '\n[model]\ncheckpoint = "tiny.safetensors"\n')
    return path


@pytest.fixture(scope="module")
def ddp_base(tmp_path_factory, tiny_checkpoint):
    base = tmp_path_factory.mktemp("ddp")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "tiny.safetensors").symlink_to(tiny_checkpoint)
    return base


def test_two_processes_train_what_one_does_and_resume_in_one(ddp_base, concept_dataset, tmp_path):
    """torchrun with 2 gloo processes of batch 1 = one process of batch 2 (same seed), to 1e-6; a process of batch 1
    (other data each step) is far off, so the comparison would see a process training on its share alone. The
    2-process run continues in one process with the same global batch and ends where the one-process run does;
    another global batch is refused, naming the setting."""
    loras = ddp_base / "models" / "loras"
    headless(run_config(tmp_path, "split", concept_dataset, 2, 1), ddp_base, processes=2, threads=1)
    headless(run_config(tmp_path, "one", concept_dataset, 4, 2), ddp_base, threads=1)
    headless(run_config(tmp_path, "small", concept_dataset, 2, 1), ddp_base, threads=1)
    two, one_at_2 = adapter(loras / "split" / "split.safetensors"), adapter(loras / "one" / "one-step000002.safetensors")
    small = adapter(loras / "small" / "small.safetensors")
    assert two.keys() == one_at_2.keys()
    assert max((two[k] - one_at_2[k]).abs().max().item() for k in two) < 1e-6
    assert max((small[k] - one_at_2[k]).abs().max().item() for k in two) > 5e-6
    assert sorted(p.name for p in (loras / "split").iterdir()) == [  # one writer: no second run folder, no clash
        "split-step000002.safetensors", "split.safetensors"]
    assert not (loras / "split_2").exists()

    refused = subprocess.run([sys.executable, str(HEADLESS), str(run_config(tmp_path, "split", concept_dataset, 4, 1,
                                                                            resume=True)),
                              "--base-directory", str(ddp_base), "--cpu"], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode != 0
    assert "batch_size: this run trained 2 images per micro-batch over all processes, now 1 x 1" in refused.stderr
    headless(run_config(tmp_path, "split", concept_dataset, 4, 2, resume=True), ddp_base, threads=1)
    resumed, one = adapter(loras / "split" / "split.safetensors"), adapter(loras / "one" / "one.safetensors")
    assert max((resumed[k] - one[k]).abs().max().item() for k in one) < 1e-6


def test_epochs_set_the_steps_from_the_dataset(pack, loaded_checkpoint, concept_dataset):
    """kohya's max_train_epochs: 24 images x 10 repeats in one bucket make 60 batches of 4 per epoch; 3 epochs with
    2 micro-batches per step are 90 steps."""
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.config import TrainConfig
    from lora_foundry.training.engine.trainer import Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(concept_dataset, resolution=64, min_side=64, max_side=64)
    assert list(dataset.report.buckets.values()) == [24]
    network = LoraNetwork.create(NetworkConfig(rank=2, preset="attention"), model, None)
    trainer = Trainer(model, clip, vae, dataset, network, TrainConfig(epochs=3, batch_size=4, grad_accum=2))
    assert trainer.config.steps == 90


def test_run_keys_are_checked_too(rc):
    with pytest.raises(rc.ConfigError, match=r"\[run\] save_precision = 'fp64' is not one of fp16, bf16, fp32"):
        rc.parse_toml("[run]\nsave_precision = 'fp64'\n", "r.toml")
    with pytest.raises(rc.ConfigError, match=r"\[model\] text_encoders = 3 must be a list of strings"):
        rc.parse_toml("[model]\ntext_encoders = 3\n", "r.toml")
