"""kohya configs: sd-scripts training TOMLs, dataset TOMLs and kohya_ss GUI JSON read into our settings (everything
that does not map listed), and our settings written as sd-scripts training arguments that read back the same."""

from __future__ import annotations

import json

import pytest
import tomllib


@pytest.fixture(scope="module")
def kc(pack):
    from types import SimpleNamespace

    from lora_foundry.training.configs.kohya_export import export_kohya
    from lora_foundry.training.configs.reading import import_kohya
    return SimpleNamespace(import_kohya=import_kohya, export_kohya=export_kohya)


NOT_NEEDED = {
    "enable_bucket": "enable_bucket: not needed (images are always bucketed by aspect ratio)",
    "xformers": "xformers: not needed (attention runs through ComfyUI's optimized attention)",
    "sdpa": "sdpa: not needed (attention runs through ComfyUI's optimized attention)",
    "cache_latents": "cache_latents: not needed (latents are always cached; cache_latents_to_disk sets where)",
    "output_dir": "output_dir: not needed (adapters are saved in models/loras/<output_name>)",
    "logging_dir": "logging_dir: not needed (each run logs its losses to output/lora_foundry_runs/<output_name>)",
    "masked_loss": "masked_loss: not needed (a mask_folder (conditioning_data_dir) or alpha_mask turns masked loss on)",
}

# An SDXL LoCon run as sd-scripts' --config_file takes it: sections (flattened by sd-scripts) and network_args.
SDXL_LOCON = """
[model_arguments]
pretrained_model_name_or_path = "/models/checkpoints/sd_xl_base_1.0.safetensors"
vae = "/models/vae/sdxl_vae.safetensors"

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_args = ["conv_dim=8", "conv_alpha=4"]
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]
learning_rate = 1e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.05
max_grad_norm = 1.0

[training_arguments]
max_train_steps = 2000
train_batch_size = 4
gradient_accumulation_steps = 2
mixed_precision = "bf16"
save_precision = "fp16"
gradient_checkpointing = true
min_snr_gamma = 5
noise_offset = 0.0357
seed = 42
xformers = true
cache_latents = true
cache_latents_to_disk = true
save_every_n_steps = 500
output_name = "sdxl_locon"
output_dir = "/out"

[dataset_arguments]
train_data_dir = "/data/train"
resolution = "1024,1024"
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 2048
bucket_reso_steps = 64
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
"""


def test_sdxl_locon_training_toml(kc):
    config = kc.import_kohya(tomllib.loads(SDXL_LOCON), "sdxl.toml")
    assert config.values["network"] == {
        "algorithm": "locon", "targets": "locon", "train_text_encoder": False, "rank": 32, "alpha": 16.0,
        "conv_rank": 8, "conv_alpha": 4.0,
    }
    assert config.values["training"] == {
        "learning_rate": 1e-4, "optimizer": "AdamW8bit", "weight_decay": 0.1, "optimizer_args": ["betas=0.9,0.99"],
        "scheduler": "cosine_with_restarts", "warmup_steps": 100, "precision": "bf16", "cache_latents": "disk",
        "grad_clip": 1.0, "steps": 2000, "batch_size": 4, "grad_accum": 2, "gradient_checkpointing": True,
        "min_snr_gamma": 5.0, "noise_offset": 0.0357, "seed": 42, "save_every": 500,
    }
    assert config.values["captions"] == {"shuffle_tags": True, "keep_tokens": 1}
    assert config.values["dataset"] == {
        "resolution": 1024, "folder": "/data/train", "min_side": 512, "max_side": 2048, "bucket_step": 64,
        "caption_extension": ".txt",
    }
    assert config.values["model"] == {"checkpoint": "/models/checkpoints/sd_xl_base_1.0.safetensors"}
    assert config.values["run"] == {"save_precision": "fp16", "output_name": "sdxl_locon"}
    assert config.unsupported == [
        "lr_scheduler_num_cycles: not supported (3: our cosine_with_restarts uses 1)",
        NOT_NEEDED["enable_bucket"],
        "vae: not supported (a checkpoint encodes the images with its own VAE)",
        NOT_NEEDED["xformers"],
        NOT_NEEDED["cache_latents"],
        NOT_NEEDED["output_dir"],
    ]


# kohya_ss GUI presets: every field present, numbers sometimes as text, unused ones empty / false / 0.
LOKR_GUI = {
    "LoRA_type": "LyCORIS/LoKr", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
    "block_alphas": "", "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": True,
    "bucket_reso_steps": 64, "bypass_mode": False, "cache_latents": True, "cache_latents_to_disk": True,
    "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0.05, "caption_extension": ".txt", "clip_skip": 1,
    "color_aug": False, "constrain": 0, "conv_alpha": 1, "conv_block_alphas": "", "conv_block_dims": "",
    "conv_dim": 8, "decompose_both": False, "dim_from_weights": False, "dora_wd": False, "down_lr_weight": "",
    "enable_bucket": True, "epoch": 10, "factor": 8, "flip_aug": False, "full_bf16": False,
    "gradient_accumulation_steps": 1, "gradient_checkpointing": True, "huber_c": 0.1, "huber_schedule": "snr",
    "keep_tokens": 1, "learning_rate": 1.0, "logging_dir": "./logs", "loss_type": "l2", "lr_scheduler": "cosine",
    "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 10, "max_bucket_reso": 2048,
    "max_data_loader_n_workers": "0", "max_grad_norm": 1, "max_resolution": "1024,1024", "max_timestep": 1000,
    "max_token_length": "75", "max_train_epochs": "", "max_train_steps": "1500", "mid_lr_weight": "",
    "min_bucket_reso": 256, "min_snr_gamma": 5, "min_timestep": 0, "mixed_precision": "bf16", "module_dropout": 0,
    "multires_noise_discount": 0.3, "multires_noise_iterations": 6, "network_alpha": 16, "network_dim": 32,
    "network_dropout": 0, "network_train_unet_only": False, "noise_offset": 0.05, "noise_offset_type": "Original",
    "optimizer": "Prodigy",
    "optimizer_args": '"d0=1e-5" "d_coef=1.0" "weight_decay=0.4" "decouple=True" "safeguard_warmup=True" '
                      '"use_bias_correction=True"',
    "output_dir": "./output", "output_name": "character-lokr", "persistent_data_loader_workers": False,
    "pretrained_model_name_or_path": "/models/checkpoints/sd_xl_base_1.0.safetensors", "prior_loss_weight": 1,
    "random_crop": False, "rank_dropout": 0, "rank_dropout_scale": False, "reg_data_dir": "",
    "sample_every_n_steps": 250, "sample_prompts": "a photo of sks woman --w 1024 --h 1024\n\nsks woman --n blurry",
    "sample_sampler": "euler_a", "save_every_n_epochs": 0, "save_every_n_steps": 500, "save_model_as": "safetensors",
    "save_precision": "bf16", "sdxl": True, "seed": "1234", "shuffle_caption": True, "text_encoder_lr": 1.0,
    "train_batch_size": 2, "train_data_dir": "/data/img", "train_norm": False, "unet_lr": 1.0, "unit": 1,
    "up_lr_weight": "", "use_cp": False, "use_scalar": False, "use_tucker": False, "v2": False,
    "v_parameterization": False, "xformers": "xformers",
}


def test_gui_lycoris_lokr(kc):
    config = kc.import_kohya(json.loads(json.dumps(LOKR_GUI)), "lokr.json")
    assert config.values["network"] == {
        "algorithm": "lokr", "targets": "all", "conv_rank": 8, "conv_alpha": 1.0, "lokr_factor": 8,
        "train_text_encoder": True, "rank": 32, "alpha": 16.0,
    }
    assert config.values["training"] == {
        "learning_rate": 1.0, "text_encoder_lr": 1.0, "optimizer": "Prodigy", "weight_decay": 0.4,
        "optimizer_args": ["d0=1e-5", "d_coef=1.0", "decouple=True", "safeguard_warmup=True",
                           "use_bias_correction=True"],
        "scheduler": "cosine", "warmup_steps": 150, "precision": "bf16", "loss": "mse", "cache_latents": "disk",
        "sample_prompts": ["a photo of sks woman --w 1024 --h 1024", "sks woman --n blurry"],
        "gradient_checkpointing": True, "huber_delta": 0.1, "grad_accum": 1, "grad_clip": 1.0,
        "max_timestep": 1000, "steps": 1500, "min_snr_gamma": 5.0, "noise_offset": 0.05, "sample_every": 250,
        "save_every": 500, "seed": 1234, "batch_size": 2,
    }
    assert config.values["captions"] == {"caption_dropout": 0.05, "keep_tokens": 1, "shuffle_tags": True}
    assert config.values["dataset"] == {
        "resolution": 1024, "no_upscale": True, "bucket_step": 64, "caption_extension": ".txt", "max_side": 2048,
        "min_side": 256, "prior_loss_weight": 1.0, "folder": "/data/img",
    }
    assert config.values["model"] == {"checkpoint": "/models/checkpoints/sd_xl_base_1.0.safetensors"}
    assert config.values["run"] == {"save_precision": "bf16", "output_name": "character-lokr"}
    assert config.unsupported == [
        NOT_NEEDED["enable_bucket"],
        NOT_NEEDED["xformers"],
        NOT_NEEDED["cache_latents"],
        NOT_NEEDED["logging_dir"],
        "max_data_loader_n_workers: not needed (there are no data-loader workers: latents are cached)",
        NOT_NEEDED["output_dir"],
        "sample_sampler: not supported (no setting of ours does this)",
        "save_model_as: not needed (adapters are saved as .safetensors)",
        "sdxl: not needed (the model's family and prediction type are read from the model)",
    ]


SD15_BLOCKS = "2,2,2,4,4,4,8,8,8,8,8,8,16,8,8,8,8,8,8,4,4,4,2,2,2"
SD15_BLOCK_ALPHAS = "1,1,1,2,2,2,4,4,4,4,4,4,8,4,4,4,4,4,4,2,2,2,1,1,1"
STANDARD_GUI = {
    "LoRA_type": "Standard", "LyCORIS_preset": "full", "factor": -1, "conv_dim": 1, "conv_alpha": 1,
    "block_dims": SD15_BLOCKS, "block_alphas": SD15_BLOCK_ALPHAS,
    "conv_block_dims": "4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4", "conv_block_alphas": "",
    "down_lr_weight": "1,1,1,1,1,1,0.5,0.5,0.5,0.05,0,0", "mid_lr_weight": "0.5",
    "up_lr_weight": "0,0,0,0.5,0.5,0.5,1,1,1,1,1,1", "block_lr_zero_threshold": "0.1",
    "network_dim": 16, "network_alpha": 8, "rank_dropout": 0.1, "module_dropout": 0,
    "optimizer": "AdamW", "optimizer_args": "", "learning_rate": 0.0001, "unet_lr": 0.0002, "text_encoder_lr": 0,
    "network_train_unet_only": False, "lr_scheduler": "constant_with_warmup", "lr_warmup": 5, "max_train_steps": "",
    "epoch": 20, "max_resolution": "768,512", "mixed_precision": "fp16", "train_batch_size": 1, "min_snr_gamma": 0,
    "noise_offset": 0.1, "noise_offset_type": "Multires", "multires_noise_iterations": 6,
    "multires_noise_discount": 0.3, "seed": 0, "train_data_dir": "/data/sd15", "reg_data_dir": "/data/reg",
    "output_name": "style", "save_every_n_epochs": 2, "save_precision": "fp16", "enable_bucket": True,
    "shuffle_caption": False, "keep_tokens": 0, "caption_extension": ".txt", "flip_aug": True, "cache_latents": True,
    "cache_latents_to_disk": False, "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "xformers": "sdpa", "color_aug": False, "stop_text_encoder_training": 0,
    "additional_parameters": "--max_token_length 225",
}


def test_gui_standard_with_block_dims_and_block_learning_rates(kc):
    config = kc.import_kohya(STANDARD_GUI, "standard.json")
    assert config.values["network"] == {  # text_encoder_lr 0 with a unet_lr: kohya_ss trains the UNet only
        "algorithm": "lora", "targets": "kohya", "train_text_encoder": False, "rank": 16, "alpha": 8.0,
        "rank_dropout": 0.1, "block_ranks": SD15_BLOCKS, "block_alphas": SD15_BLOCK_ALPHAS,
    }
    assert config.values["training"] == {
        "learning_rate": 0.0002, "optimizer": "AdamW", "weight_decay": 0.01,
        "optimizer_args": [], "scheduler": "constant_with_warmup", "precision": "fp16",
        # down (12) / mid / up (12); 0.05 is under the zero threshold
        "block_lrs": "1,1,1,1,1,1,0.5,0.5,0.5,0,0,0,0.5,0,0,0,0.5,0.5,0.5,1,1,1,1,1,1",
        "epochs": 20, "batch_size": 1, "flip": True, "min_snr_gamma": 0.0,
    }
    assert config.values["captions"] == {"keep_tokens": 0}
    assert config.values["dataset"] == {"resolution": 640, "folder": "/data/sd15", "reg_folder": "/data/reg",
                                        "caption_extension": ".txt"}
    assert config.values["run"] == {"save_precision": "fp16", "output_name": "style"}
    assert config.values["model"] == {}
    assert config.unsupported == [
        "lr_warmup: not supported (5% of the steps: set warmup_steps)",
        "max_resolution: not supported (768x512 is not square: resolution 640 keeps about its pixel count; buckets "
        "follow each image's aspect ratio)",
        NOT_NEEDED["enable_bucket"],
        "pretrained_model_name_or_path: not supported (runwayml/stable-diffusion-v1-5 is a diffusers folder or Hub "
        "id: set [model] checkpoint to a .safetensors file)",
        NOT_NEEDED["sdpa"],
        "multires_noise_iterations: not supported (noise_offset is the only noise augmentation)",
        "multires_noise_discount: not supported (noise_offset is the only noise augmentation)",
        "save_every_n_epochs: not supported (set save_every (steps))",
        NOT_NEEDED["cache_latents"],
        "additional_parameters: not supported (extra command-line arguments; set what they do by hand)",
        "conv_block_dims: not supported (convolutions take conv_rank everywhere)",
    ]


def test_sdxl_block_forms_and_what_blocks_cannot_say(kc):
    sdxl_dims = ",".join(str(n) for n in range(23))  # embedding, IN00-IN08, 3 middle parts, OUT00-OUT08, out
    config = kc.import_kohya({"network_module": "networks.lora", "network_args": [
        f"block_dims={sdxl_dims}", "down_lr_weight=0,0,0,1,1,1,1,1,1", "mid_lr_weight=2,2,2"]}, "x.toml")
    assert config.values["network"]["block_ranks"] == "1,2,3,4,5,6,7,8,9,11,13,14,15,16,17,18,19,20,21"
    assert config.values["training"]["block_lrs"] == "0,0,0,1,1,1,1,1,1,2,1,1,1,1,1,1,1,1,1"
    config = kc.import_kohya({"network_args": ["block_alphas=1,2,3", "down_lr_weight=sine", "mid_lr_weight=1"]},
                             "y.toml")
    assert "block_alphas" not in config.values["network"] and "block_lrs" not in config.values["training"]
    assert config.unsupported == [
        "block_alphas: not supported (3 values; kohya's SD1.x / 2.x form has 25, its SDXL form 23)",
        "down_lr_weight: not supported (block_lrs takes per-block numbers: 12 down, 1 mid, 12 up (SD1.x / 2.x) or 9, "
        "1 or 3 equal, 9 (SDXL); kohya's named curves are not supported)",
        "mid_lr_weight: not supported (block_lrs takes per-block numbers: 12 down, 1 mid, 12 up (SD1.x / 2.x) or 9, 1 "
        "or 3 equal, 9 (SDXL); kohya's named curves are not supported)",
    ]


DATASET = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = false

[[datasets]]
resolution = 1024
batch_size = 2
enable_bucket = true
min_bucket_reso = 512
max_bucket_reso = 2048
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = "/data/sks_dog"
  num_repeats = 10
  keep_tokens = 2
  caption_dropout_rate = 0.05
  caption_tag_dropout_rate = 0.1
  alpha_mask = true

  [[datasets.subsets]]
  image_dir = "/data/reg/dog"
  is_reg = true
  class_tokens = "dog"
  num_repeats = 1

  [[datasets.subsets]]
  image_dir = "/data/sks_dog_closeups"
  num_repeats = 4
  color_aug = true
"""


def test_dataset_toml(kc):
    config = kc.import_kohya(tomllib.loads(DATASET), "dataset.toml")
    assert config.values["dataset"] == {
        "folder": "/data/sks_dog", "resolution": 1024, "caption_extension": ".txt", "repeats": 10,
        "min_side": 512, "max_side": 2048, "no_upscale": True, "alpha_mask": True, "reg_folder": "/data/reg/dog",
    }
    assert config.values["captions"] == {"keep_tokens": 2, "shuffle_tags": True, "caption_dropout": 0.05,
                                         "tag_dropout": 0.1}
    assert config.values["training"] == {"flip": False, "batch_size": 2}
    assert config.values["network"] == {}
    assert config.unsupported == dataset_lines()


def dataset_lines() -> list[str]:
    return [
        NOT_NEEDED["enable_bucket"],
        "datasets[0].subsets[1].keep_tokens: not supported (the image subset's value holds for every image)",
        "datasets[0].subsets[1].class_tokens: not supported (an image without a caption file takes the tokens of a "
        "folder named `N_tokens`; write caption files or name the folder so)",
        "datasets[0].subsets[2]: not supported (one dataset folder and one regularisation folder per run: put the "
        "images of /data/sks_dog_closeups in a `4_name` sub-folder of the dataset folder)",
    ]


def test_dataset_regularisation_folder_and_folder_named_repeats(kc):
    data = tomllib.loads(DATASET)
    data["datasets"][0]["subsets"][0]["image_dir"] = "C:\\train\\5_sks dog"
    data["datasets"][0]["subsets"][1]["num_repeats"] = 2
    config = kc.import_kohya(data, "dataset.toml")
    assert config.values["dataset"]["folder"] == "C:\\train\\5_sks dog"
    assert config.values["dataset"]["reg_folder"] == "/data/reg/dog"
    assert config.unsupported[:3] == [
        "num_repeats: not supported (10: the folder's name '5_sks dog' sets 5 repeats here (kohya's dataset config "
        "ignores it); rename the folder)",
        NOT_NEEDED["enable_bucket"],
        "datasets[0].subsets[1].num_repeats: not supported (2: put the regularisation images in a `2_name` "
        "sub-folder of the regularisation folder)",
    ]
    assert config.unsupported[3:] == dataset_lines()[1:]


def test_unknown_and_no_effect_keys_are_listed(kc):
    text = """
    lr_scheduler = "rex"
    mixed_precision = "no"
    loss_type = "smooth_l1"
    timestep_sampling = "sigmoid"
    sigmoid_scale = 2.0
    max_train_epochs = 10
    clip_skip = 1
    persistent_data_loader_workers = true
    max_data_loader_n_workers = 8
    xformers = true
    logging_dir = "/logs"
    my_custom_key = 3
    block_lr = "1,1,1"
    """
    config = kc.import_kohya(tomllib.loads(text), "odd.toml")
    assert config.unsupported == [
        "lr_scheduler: not supported (rex: ours are constant, constant_with_warmup, linear, cosine, "
        "cosine_with_restarts, polynomial; constant is used)",
        "loss_type: not supported (smooth_l1: ours are l2 (mse), l1, huber)",
        "sigmoid_scale: not supported (our logit-normal levels have scale 1)",
        "persistent_data_loader_workers: not needed (there are no data-loader workers: latents are cached)",
        "max_data_loader_n_workers: not needed (there are no data-loader workers: latents are cached)",
        NOT_NEEDED["xformers"],
        NOT_NEEDED["logging_dir"],
        "my_custom_key: not supported (no setting of ours does this)",
        "block_lr: not supported (sdxl_train.py's full fine-tuning; a LoRA's per-block learning rates are "
        "network_args down_lr_weight / mid_lr_weight / up_lr_weight)",
    ]
    # kohya's defaults where they differ from ours, and what did map
    assert config.values["network"] == {"train_text_encoder": True, "rank": 4, "alpha": 1.0}
    assert config.values["training"] == {"optimizer": "AdamW", "weight_decay": 0.01, "optimizer_args": [],
                                         "precision": "fp32", "timestep_sampling": "logit_normal",
                                         "timestep_shift": "none", "epochs": 10, "min_snr_gamma": 0.0}
    assert config.values["captions"] == {"keep_tokens": 0}
    assert config.values["dataset"] == {"caption_extension": ".caption"}
    assert config.values["run"] == {"save_precision": "fp32"}


@pytest.mark.parametrize(("data", "message"), [
    ({"network_module": "networks.lora", "network_dim": 2048},
     "bad.toml: network_dim: [network] rank = 2048 is outside 1 to 1024"),
    ({"network_module": "networks.lora", "network_args": ["conv_dim=four"]},
     "bad.toml: conv_dim: [network] conv_rank = 'four' must be a whole number"),
    ({"optimizer_type": "AdamW", "optimizer_args": ["weight_decay=2"]},
     "bad.toml: optimizer_args weight_decay: [training] weight_decay = 2.0 is outside 0 to 1"),
    ({"LoRA_type": "Standard", "bucket_reso_steps": -8},
     "bad.toml: bucket_reso_steps: [dataset] bucket_step = -8 is outside 8 to 256"),
    ({"LoRA_type": "Standard", "optimizer": "SGD", "max_resolution": "16,16"},
     "bad.toml: max_resolution: [dataset] resolution = 16 is outside 32 to 4096"),
    ({"datasets": [{"subsets": [{"image_dir": "/x", "num_repeats": 0}]}]},
     "bad.toml: num_repeats: [dataset] repeats = 0 is outside 1 to 10000"),
])
def test_out_of_range_values_name_the_file_and_key(kc, data, message):
    from lora_foundry.training.configs.run_config import ConfigError

    with pytest.raises(ConfigError) as error:
        kc.import_kohya(data, "bad.toml")
    assert str(error.value) == message


def _objects():
    from lora_foundry.lora_core.network import NetworkConfig
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.data.dataset_options import DatasetOptions
    from lora_foundry.training.engine.config import TrainConfig

    return NetworkConfig, TrainConfig, CaptionOptions, DatasetOptions


def _round_trip(kc, network, training, dataset, name="rt"):
    from lora_foundry.lora_core.settings import from_inputs
    from lora_foundry.training.configs.run_config import settings_values

    NetworkConfig, TrainConfig, CaptionOptions, DatasetOptions = _objects()
    text = kc.export_kohya(settings_values(network, training, dataset, name))
    back = kc.import_kohya(tomllib.loads(text), "exported.toml")
    captions = from_inputs(CaptionOptions, back.inputs("captions"))
    return text, back, (from_inputs(NetworkConfig, back.inputs("network")),
                        from_inputs(TrainConfig, back.inputs("training"), captions=captions),
                        from_inputs(DatasetOptions, back.inputs("dataset")))


def test_export_then_import_gives_back_every_kohya_setting(kc):
    NetworkConfig, TrainConfig, CaptionOptions, DatasetOptions = _objects()
    blocks = "0,1,1,2,2,2,4,4,4,8,8,8,16,8,8,8,4,4,4,2,2,2,1,1,1"
    network = NetworkConfig(algorithm="locon", rank=32, alpha=16.0, conv_rank=8, conv_alpha=4.0, block_ranks=blocks,
                            block_alphas=blocks, rank_dropout=0.1, module_dropout=0.05, network_dropout=0.1,
                            text_encoder=True)
    captions = CaptionOptions(prefix="masterpiece", suffix="best quality", shuffle_tags=True, keep_tokens=2,
                              caption_dropout=0.05, tag_dropout=0.1)
    training = TrainConfig(
        steps=1000, epochs=5, batch_size=2, learning_rate=2e-4, text_encoder_lr=5e-5, optimizer="AdamW8bit",
        optimizer_args=["betas=0.9,0.99"], weight_decay=0.05, scheduler="cosine", warmup_steps=50,
        block_lrs="0,0,0,0.5,0.5,0.5,1,1,1,1,1,1,2,1,1,1,1,1,1,0.5,0.5,0.5,0,0,0", lora_plus_ratio=16.0,
        grad_clip=0.5, grad_accum=2, seed=7, precision="bf16", gradient_checkpointing=True, loss="huber",
        huber_delta=0.2, min_snr_gamma=3.0, noise_offset=0.05, timestep_sampling="logit_normal",
        timestep_shift="fixed", shift=2.5, guidance=3.5, min_timestep=100, max_timestep=900, flip=True,
        save_every=100, latent_cache="disk", validation_every=50, sample_every=200, captions=captions)
    dataset = DatasetOptions(folder="/data/x", resolution=768, min_side=384, max_side=1536, bucket_step=32,
                             no_upscale=True, caption_extension=".txt", validation_split=0.1, seed=3,
                             reg_folder="/data/reg", prior_loss_weight=0.5, alpha_mask=True)
    text, back, (network_back, training_back, dataset_back) = _round_trip(kc, network, training, dataset)
    assert (network_back, training_back, dataset_back) == (network, training, dataset)
    assert back.values["run"] == {"output_name": "rt", "save_precision": "fp16"}
    assert back.unsupported == [NOT_NEEDED["enable_bucket"], NOT_NEEDED["cache_latents"], NOT_NEEDED["masked_loss"]]
    args = tomllib.loads(text)
    assert args["network_module"] == "networks.lora"
    assert args["network_args"] == [
        "conv_dim=8", "conv_alpha=4", f"block_dims={blocks}", f"block_alphas={blocks}", "rank_dropout=0.1",
        "module_dropout=0.05", "loraplus_lr_ratio=16", "down_lr_weight=0,0,0,0.5,0.5,0.5,1,1,1,1,1,1",
        "mid_lr_weight=2", "up_lr_weight=1,1,1,1,1,1,0.5,0.5,0.5,0,0,0",
    ]
    assert args["optimizer_args"] == ["betas=0.9,0.99", "weight_decay=0.05"]
    assert (args["mixed_precision"], args["loss_type"], args["huber_schedule"], args["timestep_sampling"]) == (
        "bf16", "huber", "constant", "shift")
    assert (args["resolution"], args["train_data_dir"], args["reg_data_dir"]) == ("768,768", "/data/x", "/data/reg")
    assert "network_train_unet_only" not in args and args["text_encoder_lr"] == 5e-5


@pytest.mark.parametrize(("network", "optimizer", "module", "network_args"), [
    (dict(algorithm="loha", rank=16, alpha=8.0, preset="all", use_tucker=True, dora=True, conv_rank=4,
          conv_alpha=2.0), ("Adafactor", []), "lycoris.kohya",
     ["algo=loha", "preset=full", "conv_dim=4", "conv_alpha=2", "dora_wd=True", "use_tucker=True"]),
    (dict(algorithm="lokr", rank=8, alpha=8.0, lokr_factor=4, preset="attention"), ("SGD", ["nesterov=True"]),
     "lycoris.kohya", ["algo=lokr", "preset=attn-only", "factor=4"]),
    (dict(algorithm="dylora", rank=16, alpha=16.0, dylora_unit=4), ("SGD", []), "networks.dylora", ["unit=4"]),
    (dict(algorithm="oft", rank=8, alpha=0.0, preset="attention"), ("SGD", []), "lycoris.kohya",
     ["algo=diag-oft", "preset=attn-only"]),
    (dict(algorithm="boft", rank=16, alpha=0.0, preset="all"), ("SGD", []), "lycoris.kohya",
     ["algo=boft", "preset=full"]),
    (dict(algorithm="glora", rank=8, alpha=4.0, preset="kohya"), ("SGD", []), "lycoris.kohya",
     ["algo=glora", "preset=attn-mlp"]),
    (dict(algorithm="lora", rank=4, alpha=1.0, preset="all"), ("Lion", ["betas=0.95,0.98"]), "lycoris.kohya",
     ["algo=locon", "preset=full"]),
])
def test_round_trip_of_each_network_module_and_optimizer(kc, network, optimizer, module, network_args):
    NetworkConfig, TrainConfig, _, DatasetOptions = _objects()
    net = NetworkConfig(**network, text_encoder=False)
    training = TrainConfig(optimizer=optimizer[0], optimizer_args=optimizer[1], weight_decay=0.0, precision="fp32")
    text, back, (network_back, training_back, dataset_back) = _round_trip(kc, net, training, DatasetOptions())
    assert (network_back, training_back, dataset_back) == (net, training, DatasetOptions())
    args = tomllib.loads(text)
    assert (args["network_module"], args["network_args"]) == (module, network_args)
    assert args["mixed_precision"] == "no" and back.values["training"]["precision"] == "fp32"
    assert args["network_train_unet_only"] is True


def test_kohya_optimizer_defaults_are_made_ours(kc):
    def imported(args: dict) -> dict:
        training = kc.import_kohya(args, "o.toml").values["training"]
        return {k: training[k] for k in ("optimizer", "weight_decay", "optimizer_args")}

    assert imported({"optimizer_type": "sgd"}) == {"optimizer": "SGD", "weight_decay": 0.0,
                                                   "optimizer_args": ["momentum=0"]}
    assert imported({"optimizer_type": "SGDNesterov", "optimizer_args": ["momentum=0.8"]}) == {
        "optimizer": "SGD", "weight_decay": 0.0, "optimizer_args": ["nesterov=True", "momentum=0.8"]}
    assert imported({"use_8bit_adam": True}) == {"optimizer": "AdamW8bit", "weight_decay": 0.01,
                                                 "optimizer_args": []}
    assert imported({"optimizer_type": "AdaFactor", "optimizer_args": ["relative_step=False"]}) == {
        "optimizer": "Adafactor", "weight_decay": 0.0, "optimizer_args": ["scale_parameter=True"]}
    config = kc.import_kohya({"optimizer_type": "Adafactor"}, "o.toml")  # kohya's default: relative steps, kept
    assert config.values["training"]["optimizer_args"] == ["relative_step=True", "scale_parameter=True"]
    assert config.unsupported == [
        "learning_rate: not needed (Adafactor's relative steps set the step size; kohya logs learning_rate only)"]


def test_export_lists_what_kohya_has_no_key_for(kc):
    from lora_foundry.training.configs.run_config import settings_values

    NetworkConfig, TrainConfig, CaptionOptions, DatasetOptions = _objects()
    network = NetworkConfig(rank=8, alpha=8.0, include=["*.proj_out"], block_ranks="1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1")
    training = TrainConfig(ema_decay=0.99, sample_prompts=["a sks dog"], captions=CaptionOptions(trigger_word="sks"))
    text = kc.export_kohya(settings_values(network, training, DatasetOptions(repeats=3, mask_folder="masks"), "x"))
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [
        "# kohya sd-scripts training arguments (train_network.py --config_file), written by Lora Foundry.",
        "# output_dir: set where kohya saves the LoRA.",
        "# Settings kohya has no key for, left out (those at their defaults are not listed):",
        '#   include = ["*.proj_out"]',
        "#   ema_decay = 0.99",
        '#   sample_prompts = ["a sks dog"]',
        '#   trigger_word = "sks"',
        '# block_ranks = "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1": kohya takes per-block values for networks.lora only, '
        "every block listed (SD1.x / 2.x 25 values, SDXL 19); left out",
        '# mask_folder = "masks": kohya has conditioning_data_dir in a dataset config\'s subsets only',
        "# repeats = 3: kohya has num_repeats in a dataset config's subsets only (or train_data_dir sub-folders "
        "named `N_name`)",
    ]
    args = tomllib.loads(text)
    assert args["mixed_precision"] == "no" and args["masked_loss"] is True
    assert "trigger_word" not in args and "block_dims" not in str(args.get("network_args"))


FLUX = """
pretrained_model_name_or_path = "/models/unet/flux1-dev.safetensors"
clip_l = "/models/clip/clip_l.safetensors"
t5xxl = "/models/clip/t5xxl_fp16.safetensors"
ae = "/models/vae/ae.safetensors"
fp8_base = true
network_module = "networks.lora_flux"
network_dim = 16
network_alpha = 16
network_args = ["down_lr_weight=1,1,1,1,1,1,1,1,1,1,1,0"]
network_train_unet_only = true
timestep_sampling = "flux_shift"
guidance_scale = 1.0
discrete_flow_shift = 3.1582
model_prediction_type = "raw"
loss_type = "l2"
optimizer_type = "adamw8bit"
learning_rate = 1e-4
max_train_steps = 1000
mixed_precision = "bf16"
cache_text_encoder_outputs = true
apply_t5_attn_mask = true
"""


def test_flux_training_toml_models_and_timesteps(kc):
    config = kc.import_kohya(tomllib.loads(FLUX), "flux.toml")
    assert config.values["model"] == {
        "diffusion_model": "/models/unet/flux1-dev.safetensors",
        "text_encoders": ["/models/clip/clip_l.safetensors", "/models/clip/t5xxl_fp16.safetensors"],
        "clip_type": "flux", "vae": "/models/vae/ae.safetensors", "weight_dtype": "fp8_e4m3fn",
    }
    assert config.values["network"] == {"algorithm": "lora", "targets": "kohya", "train_text_encoder": False,
                                        "rank": 16, "alpha": 16.0}
    assert config.values["training"] == {
        "learning_rate": 1e-4, "optimizer": "AdamW8bit", "weight_decay": 0.01, "optimizer_args": [],
        "precision": "bf16", "loss": "mse", "timestep_sampling": "logit_normal", "timestep_shift": "resolution",
        "guidance": 1.0, "shift": 3.1582, "steps": 1000, "min_snr_gamma": 0.0,
    }
    assert config.unsupported == [
        "down_lr_weight: not needed (kohya's networks.lora_flux ignores it)",
        "cache_text_encoder_outputs: not needed (the outputs of frozen text encoders are always cached)",
        "apply_t5_attn_mask: not supported (no setting of ours does this)",
    ]


def test_gui_dylora_types(kc):
    kohya = kc.import_kohya({"LoRA_type": "Kohya DyLoRA", "network_dim": 16, "network_alpha": 8, "unit": 4,
                             "conv_dim": 8, "block_dims": SD15_BLOCKS, "factor": 4}, "dylora.json")
    assert kohya.values["network"] == {"algorithm": "dylora", "targets": "locon", "conv_rank": 8, "conv_alpha": 1.0,
                                       "dylora_unit": 4, "train_text_encoder": True, "rank": 16, "alpha": 8.0}
    assert kohya.unsupported == ["block_dims: not needed (kohya's networks.dylora ignores it)"]
    lycoris = kc.import_kohya({"LoRA_type": "LyCORIS/DyLoRA", "LyCORIS_preset": "attn-mlp", "network_dim": 16,
                               "network_alpha": 8, "conv_dim": 8}, "dylora.json")
    # LyCORIS' defaults: conv_alpha = network_alpha, 4 ranks a step
    assert lycoris.values["network"] == {"algorithm": "dylora", "targets": "kohya", "conv_rank": 8, "conv_alpha": 8.0,
                                         "dylora_unit": 4, "train_text_encoder": True, "rank": 16, "alpha": 8.0}
    assert lycoris.unsupported == []


MUSUBI_VIDEO = """
[general]
resolution = [256, 256]
caption_extension = ".txt"
enable_bucket = true

[[datasets]]
video_directory = "/data/walks"
target_frames = [1, 25, 45]
frame_extraction = "chunk"
frame_stride = 10
source_fps = 30.0
num_repeats = 2

[[datasets]]
image_directory = "/data/edits"
control_directory = "/data/edits_src"
"""


def test_musubi_video_dataset_toml(kc):
    """musubi-tuner's dataset keys: videos, sample lengths, extraction, control folders; what we cannot do is listed."""
    config = kc.import_kohya(tomllib.loads(MUSUBI_VIDEO.replace("image_directory", "image_dir")), "video.toml")
    dataset = config.values["dataset"]
    assert (dataset["folder"], dataset["frames"], dataset["frame_extraction"], dataset["repeats"]) == \
        ("/data/walks", 45, "chunk", 2)
    assert "control_folder" not in dataset  # the second dataset's control folder belongs to its images
    lines = "\n".join(config.unsupported)
    assert "target_frames: not supported ([1, 25, 45]: one sample length per clip; 45 is used" in lines
    assert "frame_stride: not supported (chunk takes consecutive windows" in lines
    assert "source_fps: not supported (set frame_rate" in lines
    assert "datasets[1].subsets[0]" in lines or "datasets[1]" in lines

    edits = kc.import_kohya(tomllib.loads('[[datasets]]\nimage_dir = "/d/t"\ncontrol_directory = "/d/s"\n'), "e.toml")
    assert edits.values["dataset"]["control_folder"] == "/d/s"
