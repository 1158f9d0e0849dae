"""Config formats beyond our TOML: the kohya export per model family (script, network module, model files, only the
keys that script reads; import(export(x)) == x), ai-toolkit job configs and OneTrainer configs read key by key."""

from __future__ import annotations

import json

import pytest
import tomllib


@pytest.fixture(scope="module")
def cf(pack):
    from types import SimpleNamespace

    from lora_foundry.lora_core.network import NetworkConfig
    from lora_foundry.training.configs import run_config
    from lora_foundry.training.configs.kohya_export import export_kohya
    from lora_foundry.training.configs.reading import import_kohya, read_config
    from lora_foundry.training.engine.config import TrainConfig

    return SimpleNamespace(export=export_kohya, import_kohya=import_kohya, read=read_config, rc=run_config,
                           Network=NetworkConfig, Train=TrainConfig)


def _config(cf, family="", model=None, **training):
    config = cf.rc.settings_values(cf.Network(rank=8, alpha=4.0), cf.Train(**training), None, "run")
    config.section("model").update(model or {})
    if family:
        config.section("model")["family"] = family
    return config


def _back(cf, config):
    text = cf.export(config)
    return tomllib.loads(text), cf.import_kohya(tomllib.loads(text), "exported.toml"), text


FLUX_FILES = {"diffusion_model": "/m/flux1-dev.safetensors", "vae": "/m/ae.safetensors", "clip_type": "flux",
              "text_encoders": ["/t/t5xxl_fp16.safetensors", "/t/clip_l.safetensors"], "weight_dtype": "fp8_e4m3fn"}


def test_flux_exports_flux_module_and_model_file_keys(cf):
    args, back, text = _back(cf, _config(cf, model=FLUX_FILES, guidance=1.0, shift=2.0, timestep_shift="fixed",
                                         timestep_sampling="logit_normal"))
    assert args["network_module"] == "networks.lora_flux" and args["model_type"] == "flux"
    assert (args["pretrained_model_name_or_path"], args["clip_l"], args["t5xxl"], args["ae"], args["fp8_base"]) == (
        "/m/flux1-dev.safetensors", "/t/clip_l.safetensors", "/t/t5xxl_fp16.safetensors", "/m/ae.safetensors", True)
    assert "vae" not in args and "text_encoders" not in text
    assert (args["timestep_sampling"], args["discrete_flow_shift"], args["guidance_scale"]) == ("shift", 2.0, 1.0)
    assert back.values["model"] == {"diffusion_model": "/m/flux1-dev.safetensors", "vae": "/m/ae.safetensors",
                                    "clip_type": "flux", "weight_dtype": "fp8_e4m3fn",
                                    "text_encoders": ["/t/clip_l.safetensors", "/t/t5xxl_fp16.safetensors"]}


@pytest.mark.parametrize(("family", "script"), [("sd_v1", "train_network.py"),
                                                ("sdxl_base_v1-0", "sdxl_train_network.py")])
def test_sd_exports_carry_no_flow_keys(cf, family, script):
    args, back, text = _back(cf, _config(cf, family, {"checkpoint": "/c/base.safetensors"}, guidance=3.5,
                                         shift=2.0, timestep_sampling="logit_normal", timestep_shift="fixed"))
    assert text.startswith(f"# kohya sd-scripts training arguments ({script} --config_file)")
    assert args["network_module"] == "networks.lora"
    assert not {"discrete_flow_shift", "guidance_scale", "timestep_sampling", "ae", "model_type"} & set(args)
    assert "#   guidance = 3.5" in text and '#   timestep_sampling = "logit_normal"' in text
    assert back.values["model"]["checkpoint"] == "/c/base.safetensors"


FAMILIES = {
    "sd_v1": {"checkpoint": "/c/sd15.safetensors"},
    "sd_v2": {"checkpoint": "/c/sd21.safetensors"},
    "sdxl_base_v1-0": {"checkpoint": "/c/sdxl.safetensors"},
    "sd3": {"diffusion_model": "/m/sd3.safetensors", "vae": "/m/sd3_vae.safetensors",
            "text_encoders": ["/t/clip_l.safetensors", "/t/clip_g.safetensors", "/t/t5xxl.safetensors"]},
    "flux1": {**FLUX_FILES, "text_encoders": ["/t/clip_l.safetensors", "/t/t5xxl_fp16.safetensors"]},
    "chroma": {"diffusion_model": "/m/chroma.safetensors", "text_encoders": ["/t/t5xxl.safetensors"],
               "clip_type": "chroma", "vae": "/m/ae.safetensors"},
    "lumina2": {"diffusion_model": "/m/lumina2.safetensors", "text_encoders": ["/t/gemma_2_2b.safetensors"],
                "clip_type": "lumina2", "vae": "/m/ae.safetensors"},
}
FLOW = dict(timestep_sampling="logit_normal", timestep_shift="fixed", shift=2.5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("with_files", [True, False])
def test_round_trip_of_every_family(cf, family, with_files):
    """With the model files (the family told by them), and without (a Save Training Config of a LoRA's metadata)."""
    from lora_foundry.lora_core.settings import from_inputs
    from lora_foundry.training.configs.kohya_families import family_of
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.data.dataset_options import DatasetOptions

    flow = FLOW if family in ("sd3", "flux1", "chroma", "lumina2") else {}
    network, training = cf.Network(rank=8, alpha=4.0, rank_dropout=0.1), cf.Train(learning_rate=3e-4, **flow)
    config = cf.rc.settings_values(network, training, DatasetOptions(folder="/d", resolution=768), "run")
    config.section("model").update({**(FAMILIES[family] if with_files else {}), "family": family})
    args, back, _ = _back(cf, config)
    captions = from_inputs(CaptionOptions, back.inputs("captions"))
    assert from_inputs(cf.Network, back.inputs("network")) == network
    assert from_inputs(cf.Train, back.inputs("training"), captions=captions) == training
    assert from_inputs(DatasetOptions, back.inputs("dataset")) == DatasetOptions(folder="/d", resolution=768)
    assert family_of(back) == ("" if family == "sd_v1" else family)  # train_network.py's keys are every SD's
    if with_files:
        assert {k: v for k, v in back.values["model"].items() if k != "family"} == FAMILIES[family]


def test_sd3_and_sd2_keys(cf):
    args, back, _ = _back(cf, _config(cf, "sd3", **FLOW))
    assert (args["network_module"], args["weighting_scheme"], args["training_shift"]) == (
        "networks.lora_sd3", "logit_normal", 2.5)
    assert "timestep_sampling" not in args and "discrete_flow_shift" not in args
    assert back.values["training"]["shift"] == 2.5 and back.values["model"] == {"family": "sd3"}
    args, back, text = _back(cf, _config(cf, "sd_v2"))
    assert args["v2"] is True and "v_parameterization" in text


def test_family_without_an_sd_scripts_trainer_is_refused(cf):
    with pytest.raises(cf.rc.ConfigError, match="wan21: kohya sd-scripts has no LoRA trainer"):
        cf.export(_config(cf, "wan21"))


def test_a_text_encoders_loader_type_names_the_family_and_a_family_names_its_loader_type(cf):
    """[model] clip_type flux2 is Flux.2 (an sd-scripts export is refused by name, not written for train_network.py),
    and one text encoder of a family that loads as its own type (Wan's UMT5, Flux.2's Mistral) loads as that type
    when [model] names the family and no clip_type; the config's clip_type wins, two files load as Flux."""
    from lora_foundry.training.headless import clip_loader

    files = {"diffusion_model": "/m/flux2-dev.safetensors", "vae": "/m/flux2-vae.safetensors",
             "text_encoders": ["/t/mistral_3_small_flux2_bf16.safetensors"]}
    with pytest.raises(cf.rc.ConfigError, match="flux2: kohya sd-scripts has no LoRA trainer"):
        cf.export(_config(cf, model={**files, "clip_type": "flux2"}))
    assert clip_loader(_config(cf, "flux2", model=files), 1) == ("CLIPLoader", "flux2")
    assert clip_loader(_config(cf, "wan22"), 1) == ("CLIPLoader", "wan")
    assert clip_loader(_config(cf, "wan21", model={"clip_type": "stable_diffusion"}), 1) == (
        "CLIPLoader", "stable_diffusion")
    assert clip_loader(_config(cf, "sd_v1"), 1) == ("CLIPLoader", "stable_diffusion")
    assert clip_loader(_config(cf, "flux2"), 2) == ("DualCLIPLoader", "flux")
    with pytest.raises(cf.rc.ConfigError, match="give 1 to 3 files, not 4"):
        clip_loader(_config(cf), 4)


def test_metadata_names_the_family(cf):
    network = cf.Network(rank=4)
    metadata = {"lora_foundry_config": network.to_json(), "lora_foundry_training": json.dumps({"steps": 10}),
                "ss_base_model_version": "flux1"}
    config = cf.rc.from_metadata(metadata)
    assert config.base_family == "flux1" and not config.values["model"]  # our TOML of it takes the user's [model]
    assert "networks.lora_flux" in cf.export(config)


AI_TOOLKIT = """
job: extension
config:
  name: "sks_dog_flux"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      trigger_word: "sks dog"
      network:
        type: "lora"
        linear: 32
        linear_alpha: 16
      save:
        dtype: float16
        save_every: 500
        max_step_saves_to_keep: 3
      datasets:
        - folder_path: "/data/dog"
          caption_ext: "txt"
          caption_dropout_rate: 0.1
          shuffle_tokens: true
          cache_latents_to_disk: true
          resolution: [ 512, 1024 ]
        - folder_path: "/data/dogs_reg"
          is_reg: true
      train:
        batch_size: 2
        steps: 1500
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: "flowmatch"
        optimizer: "adamw8bit"
        optimizer_params:
          weight_decay: 0.05
        lr: 2e-4
        timestep_type: sigmoid
        content_or_style: style
        ema_config:
          use_ema: true
          ema_decay: 0.99
        dtype: bf16
      model:
        name_or_path: "black-forest-labs/FLUX.1-dev"
        is_flux: true
        quantize: true
      sample:
        sampler: "flowmatch"
        sample_every: 250
        width: 768
        height: 1024
        prompts:
          - "sks dog on a beach"
        neg: ""
        seed: 7
        walk_seed: true
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
  version: '1.0'
"""


def test_ai_toolkit_job(cf):
    config = cf.read(AI_TOOLKIT, "flux.yaml")
    assert config.values["network"] == {"algorithm": "lora", "rank": 32, "alpha": 16.0, "train_text_encoder": False}
    assert config.values["training"] == {
        "learning_rate": 2e-4, "steps": 1500, "batch_size": 2, "grad_accum": 1, "gradient_checkpointing": True,
        "min_snr_gamma": 0.0, "precision": "bf16", "optimizer": "AdamW8bit", "weight_decay": 0.05,
        "optimizer_args": [], "timestep_sampling": "logit_normal", "timestep_shift": "none", "ema_decay": 0.99,
        "save_every": 500, "sample_every": 250, "sample_steps": 20, "sample_cfg": 4.0,
        "sample_prompts": ["sks dog on a beach --w 768 --h 1024 --d 7"], "cache_latents": "disk"}
    assert config.values["dataset"] == {"folder": "/data/dog", "caption_extension": ".txt", "resolution": 1024,
                                        "resolutions": "512, 1024", "reg_folder": "/data/dogs_reg"}
    assert config.values["captions"] == {"caption_dropout": 0.1, "shuffle_tags": True, "trigger_word": "sks dog"}
    assert config.values["model"] == {"family": "flux1"}
    assert config.values["run"] == {"output_name": "sks_dog_flux", "save_precision": "fp16"}
    lines = "\n".join(config.unsupported)
    for expected in ("config.process[0].train.content_or_style: not supported (no content / style",
                     "config.process[0].model.name_or_path: not supported (black-forest-labs/FLUX.1-dev is a Hub id",
                     "config.process[0].model.quantize: not supported (set [model] diffusion_model",
                     "config.process[0].save.max_step_saves_to_keep: not supported (every saved checkpoint is kept)",
                     "config.process[0].train.noise_scheduler: not needed (the training objective is read",
                     "config.process[0].training_folder: not needed", "config.process[0].device: not needed"):
        assert expected in lines
    assert "walk_seed" not in lines and "train_unet" not in lines  # at values that change nothing
    flux2 = cf.read(AI_TOOLKIT.replace("is_flux: true", "arch: flux2"), "flux2.yaml")
    assert flux2.values["model"] == {"family": "flux2"} and "arch" not in "\n".join(flux2.unsupported)
    assert cf.read(json.dumps(tomllib.loads("x = 1") | {"job": "extension", "config": {"process": [
        {"type": "sd_trainer", "network": {"linear": 4}}]}}), "job.json").values["network"]["rank"] == 4


def test_ai_toolkit_regularisation_keeps_its_meaning(cf):
    """A reg dataset with prior_reg is trained toward the base model's own prediction, as ai-toolkit does
    (prior_target base); without it, toward its images; train.reg_weight is its loss weight."""
    prior = cf.read(AI_TOOLKIT.replace("is_reg: true", "is_reg: true\n          prior_reg: true")
                    .replace("batch_size: 2", "batch_size: 2\n        reg_weight: 0.5"), "reg.yaml")
    assert prior.values["training"]["prior_target"] == "base"
    assert prior.values["dataset"]["reg_folder"] == "/data/dogs_reg"
    assert prior.values["dataset"]["prior_loss_weight"] == 0.5
    assert not any("prior_reg" in line or "reg_weight" in line for line in prior.unsupported), prior.unsupported
    plain = cf.read(AI_TOOLKIT, "flux.yaml")
    assert "prior_target" not in plain.values["training"] and "prior_loss_weight" not in plain.values["dataset"]


def test_ai_toolkit_output_preservation(cf):
    """diff_output_preservation: its class (ai-toolkit's default "person") and multiplier; off, neither is listed. The
    same for blank_prompt_preservation and its multiplier."""
    def job(train: str) -> str:
        return f"job: extension\nconfig:\n  process:\n    - type: sd_trainer\n      trigger_word: ohwx\n      train: {train}\n"

    def preservation(config) -> dict:
        return {k: v for k, v in config.values["training"].items() if k.startswith("preservation")}

    on = cf.read(job("{diff_output_preservation: true, diff_output_preservation_class: woman, "
                     "diff_output_preservation_multiplier: 0.5}"), "dop.yaml")
    assert preservation(on) == {"preservation_class": "woman", "preservation_weight": 0.5}
    assert on.values["captions"] == {"trigger_word": "ohwx"} and "preservation" not in " ".join(on.unsupported)
    assert preservation(cf.read(job("{diff_output_preservation: true}"), "dop.yaml")) == {
        "preservation_class": "person"}
    off = cf.read(job("{diff_output_preservation: false, diff_output_preservation_class: person, "
                      "diff_output_preservation_multiplier: 1}"), "dop.yaml")
    assert preservation(off) == {} and "preservation" not in " ".join(off.unsupported)
    def blank(train: str) -> float | None:
        config = cf.read(job(train), "bpp.yaml")
        assert "blank" not in " ".join(config.unsupported)
        return config.values["training"].get("blank_preservation_weight")

    assert blank("{blank_prompt_preservation: true, blank_prompt_preservation_multiplier: 0.5}") == 0.5
    assert blank("{blank_prompt_preservation: true}") == 1.0  # ai-toolkit's default multiplier
    assert blank("{blank_prompt_preservation: false, blank_prompt_preservation_multiplier: 2}") is None


def test_ai_toolkit_concept_slider(cf):
    """A concept_slider process: its prompts and guidance (ai-toolkit's default 3) as our slider settings; an anchor
    strength other than 1 is listed as not supported."""
    def job(slider: str) -> str:
        return f"job: extension\nconfig:\n  process:\n    - type: concept_slider\n      slider: {slider}\n"

    def slider(config) -> dict:
        return {k: v for k, v in config.values["training"].items() if k.startswith("slider")}

    read = cf.read(job("{positive_prompt: old person, negative_prompt: young person, target_class: person, "
                       "anchor_class: a cat}"), "slider.yaml")
    assert slider(read) == {"slider_positive": "old person", "slider_negative": "young person",
                            "slider_target": "person", "slider_anchor": "a cat", "slider_guidance": 3.0}
    assert not [u for u in read.unsupported if "slider" in u]
    strong = cf.read(job("{positive_prompt: a, negative_prompt: b, guidance_strength: 1.5, anchor_strength: 2}"),
                     "slider.yaml")
    assert slider(strong) == {"slider_positive": "a", "slider_negative": "b", "slider_guidance": 1.5}
    assert [u for u in strong.unsupported if "anchor_strength" in u], strong.unsupported


@pytest.mark.parametrize(("text", "message"), [
    ("job: extension\nconfig:\n  process: {type: sd_trainer}\n", "bad.yaml: config.process must be a list"),
    ("job: extension\nconfig:\n  process:\n    - train: [1, 2]\n", "bad.yaml: config.process[0].train must be a table"),
    ("job: extension\nconfig:\n  process:\n    - datasets: {a: 1}\n", "config.process[0].datasets must be a list"),
    ("job: extension\nconfig:\n  process:\n    - datasets: [{resolution: big}]\n",
     "config.process[0].datasets[0].resolution must be a size"),
    ("job: extension\nconfig:\n  process:\n    - train: {steps: -5}\n", "config.process[0].train.steps"),
    ("job: extension\nconfig:\n  process:\n    - train: {lr: fast}\n", "config.process[0].train.lr"),
    ("job: extract\nconfig:\n  process: []\n", "job: 'extract' is not a training job"),
    ("job: extension\nconfig: {process: [1]}\n", "config.process[0] must be a table"),
    ("job: [extension\n", "bad.yaml: not valid TOML (Expected '=' after a key in a key/value pair (at line 1, column 4)) nor YAML"),
    ("- a\n- b\n", "bad.yaml: a config is a table of keys, not list"),
])
def test_ai_toolkit_errors_name_the_file_and_key(cf, text, message):
    with pytest.raises(cf.rc.ConfigError, match=None) as error:
        cf.read(text, "bad.yaml")
    assert message in str(error.value)


ONETRAINER = {
    "__version": 6, "training_method": "LORA", "model_type": "STABLE_DIFFUSION_XL_10_BASE",
    "base_model_name": "/models/sd_xl_base_1.0.safetensors", "output_model_destination": "models/sks_xl.safetensors",
    "output_model_format": "SAFETENSORS", "output_dtype": "BFLOAT_16", "batch_size": 2, "epochs": 20,
    "learning_rate": 0.0003, "learning_rate_scheduler": "COSINE", "learning_rate_warmup_steps": 50,
    "learning_rate_cycles": 2, "layer_filter_preset": "attn-mlp", "lora_rank": 16, "lora_alpha": 8,
    "resolution": "1024", "train_dtype": "BFLOAT_16", "loss_weight_fn": "MIN_SNR_GAMMA", "loss_weight_strength": 5.0,
    "timestep_distribution": "LOGIT_NORMAL", "ema": "GPU", "ema_decay": 0.998, "save_every": 200,
    "save_every_unit": "STEP", "sample_after": 10, "sample_after_unit": "MINUTE", "workspace_dir": "ws",
    "optimizer": {"optimizer": "ADAMW_8BIT", "weight_decay": 0.02, "beta1": 0.9, "beta2": 0.99, "eps": None,
                  "fused": True, "factored": True},
    "unet": {"train": True, "weight_dtype": "FLOAT_16"},
    "text_encoder": {"train": False, "weight_dtype": "FLOAT_16"}, "text_encoder_2": {"train": False},
    "vae": {"weight_dtype": "FLOAT_32"},
    "concepts": [{"name": "dog", "path": "/data/dog", "balancing": 3, "balancing_strategy": "REPEATS",
                  "text": {"prompt_source": "sample", "enable_tag_shuffling": True, "keep_tags_count": 2},
                  "image": {"enable_random_flip": True, "enable_crop_jitter": True}},
                 {"name": "cat", "path": "/data/cat", "enabled": True}],
}


def test_onetrainer_config(cf):
    config = cf.read(json.dumps(ONETRAINER), "sdxl.json")
    assert config.values["model"] == {"family": "sdxl_base_v1-0", "checkpoint": "/models/sd_xl_base_1.0.safetensors"}
    assert config.values["run"] == {"output_name": "sks_xl", "save_precision": "bf16"}
    assert config.values["network"] == {"algorithm": "lora", "rank": 16, "alpha": 8.0, "targets": "kohya",
                                        "train_text_encoder": False}
    training = config.values["training"]
    assert {k: training[k] for k in ("learning_rate", "scheduler", "warmup_steps", "epochs", "batch_size",
                                     "precision", "optimizer", "weight_decay", "optimizer_args", "min_snr_gamma",
                                     "timestep_sampling", "timestep_shift", "ema_decay", "save_every",
                                     "gradient_checkpointing", "flip")} == {
        "learning_rate": 0.0003, "scheduler": "cosine", "warmup_steps": 50, "epochs": 20, "batch_size": 2,
        "precision": "bf16", "optimizer": "AdamW8bit", "weight_decay": 0.02, "optimizer_args": ["betas=0.9,0.99"],
        "min_snr_gamma": 5.0, "timestep_sampling": "logit_normal", "timestep_shift": "none", "ema_decay": 0.998,
        "save_every": 200, "gradient_checkpointing": True, "flip": True}
    assert config.values["dataset"] == {"resolution": 1024, "folder": "/data/dog", "repeats": 3}
    assert config.values["captions"] == {"shuffle_tags": True, "keep_tokens": 2}
    four_bit = cf.read(json.dumps({**ONETRAINER, "unet": {"train": True, "weight_dtype": "NFLOAT_4"}}), "sdxl.json")
    assert four_bit.values["training"]["base_quantization"] == "nf4"
    lines = "\n".join(config.unsupported)
    for expected in ("learning_rate_cycles: not supported (our cosine_with_restarts uses 1 cycle)",
                     "sample_after: not supported (every 10 minute: sample_every counts steps)",
                     "workspace_dir: not needed", "optimizer.fused: not needed",
                     "optimizer.factored: not supported", "concepts[1].path: not supported (one dataset folder",
                     "vae: not needed", "output_model_format: not needed"):
        assert expected in lines


@pytest.mark.parametrize(("data", "message"), [
    ({"training_method": "LORA", "concepts": {"a": 1}}, "ot.json: concepts must be a list"),
    ({"training_method": "LORA", "optimizer": "ADAMW"}, "ot.json: optimizer must be a table"),
    ({"training_method": "FINE_TUNE"}, "ot.json: training_method FINE_TUNE"),
    ({"training_method": "LORA", "lora_rank": 0}, "ot.json: lora_rank"),
    ({"model_type": "FLUX_DEV_1", "concepts": [["x"]]}, "ot.json: concepts[0] must be a table"),
])
def test_onetrainer_errors_name_the_file_and_key(cf, data, message):
    with pytest.raises(cf.rc.ConfigError) as error:
        cf.read(json.dumps(data), "ot.json")
    assert message in str(error.value)


def test_formats_are_told_apart_by_contents(cf, pack):
    from lora_foundry.nodes.configs import CONFIG_EXTENSIONS

    assert cf.read("[training]\nsteps = 5\n", "a").values["training"] == {"steps": 5}
    assert cf.read("max_train_steps = 5\n", "b").values["training"]["steps"] == 5
    assert cf.read(json.dumps({"LoRA_type": "Standard", "max_train_steps": 5}), "c").values["training"]["steps"] == 5
    assert cf.read(json.dumps({"model_type": "FLUX_DEV_1", "epochs": 3}), "d").values["training"]["epochs"] == 3
    assert cf.read("job: extension\nconfig:\n  process:\n    - train: {steps: 5}\n", "e").values["training"][
        "steps"] == 5
    assert {".yaml", ".yml"} <= set(CONFIG_EXTENSIONS)
