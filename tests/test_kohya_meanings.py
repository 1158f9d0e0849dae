"""kohya configs import as kohya means them: a value kohya accepts becomes the nearest we have (listed as changed),
what we cannot keep is refused by key and value, and no file of any form makes an import fail with anything but a
ConfigError."""

from __future__ import annotations

import json
import random
import re

import pytest
import tomllib


@pytest.fixture(scope="module")
def kc(pack):
    from types import SimpleNamespace

    from lora_foundry.training.configs import kohya_names
    from lora_foundry.training.configs.reading import import_kohya, read_config
    from lora_foundry.training.configs.run_config import ConfigError
    return SimpleNamespace(import_kohya=import_kohya, read_config=read_config, ConfigError=ConfigError,
                           names=kohya_names)


def refused(kc, data, source="p.json") -> str:
    with pytest.raises(kc.ConfigError) as error:
        kc.import_kohya(data, source)
    return str(error.value)


# --- values kohya accepts become the nearest meaning we have ---


def test_bucket_step_under_ours_is_rounded_and_listed(kc):
    config = kc.import_kohya({"LoRA_type": "Standard", "bucket_reso_steps": 1, "network_dim": 8}, "p.json")
    assert config.values["dataset"]["bucket_step"] == 8
    assert config.changed == ["bucket_reso_steps: 1 -> 8 (bucket sides here are multiples of 8 to 256 pixels; 8 "
                              "is the nearest)"]
    config = kc.import_kohya({"bucket_reso_steps": 100}, "a.toml")
    assert config.values["dataset"]["bucket_step"] == 96


def test_lycoris_full_matrix_lokr_dim_becomes_our_full_matrix_rank(kc):
    """LyCORIS' docs: a huge network_dim asks LoKr for full matrices; our rank 1024 is that for LoKr."""
    gui = {"LoRA_type": "LyCORIS/LoKr", "LyCORIS_preset": "full", "network_dim": 100000, "network_alpha": 1,
           "conv_dim": 100000, "conv_alpha": 1, "factor": 6, "use_cp": False, "optimizer": "AdamW",
           "learning_rate": 0.0001}
    config = kc.import_kohya(gui, "lokr.json")
    network = config.values["network"]
    assert (network["algorithm"], network["rank"], network["conv_rank"], network["lokr_factor"]) == (
        "lokr", 1024, 1024, 6)
    assert config.changed == [
        "conv_dim: 100000 -> 1024 (LyCORIS makes LoKr's matrices full at a dim this large; ours does at rank 1024)",
        "network_dim: 100000 -> 1024 (LyCORIS makes LoKr's matrices full at a dim this large; ours does at rank "
        "1024)"]
    with pytest.raises(kc.ConfigError, match="network_dim: \\[network\\] rank = 100000 is outside 1 to 1024"):
        kc.import_kohya({**gui, "LoRA_type": "LyCORIS/LoHa"}, "loha.json")  # no full-matrix meaning for LoHa


def test_lokr_at_rank_1024_is_full_matrix_on_every_layer(pack):
    import torch
    from lora_foundry.lora_core.adapters.lokr import LoKr

    weight = torch.zeros(8192, 64)  # factor 2: w2 is [4096, 32], which rank 1024 would leave low rank
    adapter = LoKr.create(weight, 1024, 1.0, factor=2)
    assert adapter.lokr_w2 is not None and adapter.lokr_w2_a is None and adapter.scale == 1.0
    assert LoKr.create(weight, 16, 16.0, factor=2).lokr_w2 is None


def test_dataset_config_of_subsets_only(kc):
    """sd-scripts' masked-loss and ControlNet-LLLite docs write [[datasets.subsets]] blocks alone."""
    text = '[[datasets.subsets]]\nimage_dir = "/data/zunda"\nconditioning_data_dir = "/data/zunda_mask"\n' \
           'num_repeats = 8\ncaption_extension = ".txt"\n'
    config = kc.read_config(text, "masked.toml")
    assert config.values["dataset"] == {"folder": "/data/zunda", "mask_folder": "/data/zunda_mask", "repeats": 8,
                                        "caption_extension": ".txt"}


# --- no file of any form escapes with anything but a ConfigError ---

SDXL_SECTIONS = """
[model_arguments]
pretrained_model_name_or_path = "/m/sdxl.safetensors"
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=4", "conv_alpha=1"]
[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.1"]
learning_rate = 1e-4
lr_scheduler = "cosine"
lr_warmup_steps = 0.1
[training_arguments]
max_train_steps = 1000
train_batch_size = 2
mixed_precision = "bf16"
[dataset_arguments]
train_data_dir = "/d"
resolution = "1024,1024"
"""
DATASET = """
[general]
shuffle_caption = true
caption_extension = ".txt"
[[datasets]]
resolution = [768, 768]
batch_size = 2
validation_split = 0.1
  [[datasets.subsets]]
  image_dir = "/d/10_dog"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "/d/reg"
  is_reg = true
"""
MUSUBI = """
[general]
resolution = [960, 544]
[[datasets]]
video_directory = "/v"
target_frames = [1, 25]
frame_extraction = "head"
"""
GUI = {"LoRA_type": "LyCORIS/LoCon", "LyCORIS_preset": "full", "network_dim": 32, "network_alpha": 16,
       "conv_dim": 8, "conv_alpha": 4, "optimizer": "Prodigy", "optimizer_args": "decouple=True",
       "learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 1.0, "max_resolution": "1024,1024", "epoch": 4,
       "lr_warmup": 10, "max_train_steps": "800", "train_data_dir": "/d", "noise_offset_type": "Original",
       "noise_offset": 0.05, "xformers": "sdpa", "sample_prompts": "a dog"}
WRONG = [[1, 2], ["a", "b"], "abc", "1e400", "nan", {"x": 1}, {"x": {"y": 1}}, True, -7, 10**30, 1.5, 0, "",
         float("inf"), [{"x": 1}], [[1]]]


def _forms() -> list[tuple[str, dict]]:
    data = tomllib.loads(DATASET)
    return [("sections", tomllib.loads(SDXL_SECTIONS)), ("flat", {k: v for t in tomllib.loads(SDXL_SECTIONS).values()
                                                                  for k, v in t.items()}),
            ("gui", dict(GUI)), ("dataset", data), ("musubi", tomllib.loads(MUSUBI))]


def _keys(kc) -> list[str]:
    n = kc.names
    return sorted({*n.kohya_names(), *n.CONVERTED, *n.NETWORK_ARG_KEYS, *n.NOT_NEEDED, *n.REASONS, *n.NO_EFFECT,
                   *n.GUI_NETWORK_KEYS, *n.KOHYA_DEFAULTS, *n.DATASET_CONFIG_ONLY, *GUI, "LoRA_type", "algo", "preset",
                   "unet_lr", "network_train_unet_only", "network_train_text_encoder_only", "use_8bit_adam",
                   "lr_scheduler_num_cycles", "huber_schedule", "sigmoid_scale", "enable_bucket", "clip_l", "t5xxl",
                   "clip_g", "ae", "vae", "fp8_base", "save_precision", "image_dir", "is_reg", "batch_size",
                   "video_directory", "target_frames", "frame_extraction", "control_directory", "datasets",
                   "general", "subsets", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "epoch", "lr_warmup",
                   "noise_offset_type", "max_resolution", "optimizer", "validation_split", "flux1_checkbox"})


def _variants(form: str, data: dict, key: str, value) -> list[dict]:
    """`data` with `key` set to `value` wherever a file of this form could hold it."""
    out = []
    if form == "sections":
        out += [{**data, "training_arguments": {**data["training_arguments"], key: value}}, {**data, key: value}]
    elif form in ("flat", "gui"):
        out.append({**data, key: value})
    else:
        out.append({**data, "general": {**data.get("general", {}), key: value}})
        out.append({**data, "datasets": [{**data["datasets"][0], key: value}]})
        if "subsets" in data["datasets"][0]:
            subsets = data["datasets"][0]["subsets"]
            out.append({**data, "datasets": [{**data["datasets"][0], "subsets": [{**subsets[0], key: value},
                                                                                 *subsets[1:]]}]})
        out.append({**data, key: value})
    return out


def test_every_form_with_every_wrong_value_gives_a_config_or_a_config_error(kc):
    from lora_foundry.training.configs.run_config import RunConfig

    for form, data in _forms():
        assert isinstance(kc.import_kohya(data, "f"), RunConfig), form
        for key in _keys(kc):
            for value in WRONG:
                for variant in _variants(form, data, key, value):
                    try:
                        assert isinstance(kc.import_kohya(variant, "f"), RunConfig)
                    except kc.ConfigError:
                        pass
                    except Exception as error:  # noqa: BLE001 - the failure names the case
                        pytest.fail(f"{form}: {key} = {value!r}: {type(error).__name__}: {error}")


@pytest.mark.parametrize("text", [
    "", "# nothing\n", "{}", "[]", "{\"LoRA_type\": [1]}", "{\"LoRA_type\": \"Standard\", \"network_dim\": {}}",
    "datasets = 3", "datasets = [1, 2]", "[[datasets]]\nsubsets = 4\n", "[[datasets]]\nsubsets = [\"x\"]\n",
    "general = \"x\"\n[[datasets]]\n", "[general]\n[general.deeper]\nx = 1\n", "network_args = 5",
    "network_args = [[\"a=1\"]]", "optimizer_args = {a = 1}", "[[datasets.subsets]]\nimage_dir = 3\n",
    "[[datasets]]\n[[datasets.subsets]]\nimage_dir = [\"/a\"]\ntarget_frames = [\"x\"]\n",
    "text_encoder_lr = [\"a\", 1]", "[a]\n[a.b]\nc = 1\n", "learning_rate = \"fast\"", "max_train_steps = 1e400",
    "lr_warmup_steps = 0.5\nmax_train_steps = inf", "{\"LoRA_type\": \"Standard\", \"max_train_steps\": \"inf\", "
    "\"lr_warmup\": 10}", "{\"LoRA_type\": \"Standard\", \"epoch\": [1], \"lr_scheduler\": \"cosine_with_restarts\"}",
])
def test_fragments_and_empty_files(kc, text):
    from lora_foundry.training.configs.run_config import RunConfig

    try:
        assert isinstance(kc.read_config(text, "frag"), RunConfig)
    except kc.ConfigError:
        pass


# --- meaning first ---


def test_gui_text_encoder_lr_zero_with_a_unet_rate_trains_the_unet_only(kc):
    config = kc.import_kohya({"LoRA_type": "Standard", "learning_rate": 0.0003, "unet_lr": 0.0003,
                              "text_encoder_lr": 0, "network_dim": 16}, "flux.json")
    assert config.values["network"]["train_text_encoder"] is False
    assert "text_encoder_lr" not in config.values["training"]
    message = refused(kc, {"LoRA_type": "Standard", "learning_rate": 0.0001, "unet_lr": 0, "text_encoder_lr": 5e-5})
    assert message.startswith("p.json: text_encoder_lr = 5e-05 with unet_lr = 0: kohya_ss trains the text encoders "
                              "only")


@pytest.mark.parametrize("args", [
    {"network_module": "networks.lora_flux", "noise_offset": 0.05},
    {"network_module": "networks.lora_sd3", "noise_offset": 0.05},
    {"LoRA_type": "Flux1", "noise_offset_type": "Original", "noise_offset": 0.05},
    {"LoRA_type": "Standard", "flux1_checkbox": True, "noise_offset": 0.05},
])
def test_no_noise_offset_where_kohyas_trainer_applies_none(kc, args):
    config = kc.import_kohya(args, "flux")
    assert "noise_offset" not in config.values["training"]
    assert any(re.match(r"noise_offset: not needed \(kohya's \w+ trainer applies no noise offset", line)
               for line in config.unsupported), config.unsupported
    sdxl = kc.import_kohya({"network_module": "networks.lora", "noise_offset": 0.05}, "sdxl")
    assert sdxl.values["training"]["noise_offset"] == 0.05


def test_d_adaptation_becomes_prodigy_never_adamw(kc):
    gui = {"LoRA_type": "Standard", "optimizer": "DAdaptAdam", "learning_rate": 1.0, "unet_lr": 1.0,
           "text_encoder_lr": 1.0, "optimizer_args": '"decouple=True" "weight_decay=0.2" "betas=0.9,0.99" '
                                                     '"growth_rate=1.02" "log_every=10"'}
    config = kc.import_kohya(gui, "dadapt.json")
    training = config.values["training"]
    assert (training["optimizer"], training["learning_rate"], training["weight_decay"]) == ("Prodigy", 1.0, 0.2)
    assert training["optimizer_args"] == ["decouple=True", "betas=0.9,0.99", "growth_rate=1.02"]
    assert config.changed[0].startswith("optimizer: DAdaptAdam -> Prodigy (")
    assert "optimizer_args log_every: not supported (Prodigy has no log_every)" in config.unsupported
    adam = kc.import_kohya({"optimizer_type": "DAdaptAdam", "learning_rate": 1.0}, "d.toml").values["training"]
    assert adam["optimizer_args"] == ["decouple=False"]  # D-Adaptation's Adam couples its decay unless told
    for name in ("AdamWScheduleFree", "torch.optim.RAdam", "SomethingNew"):
        message = refused(kc, {"optimizer_type": name, "learning_rate": 1e-3}, "o.toml")
        assert message.startswith(f"o.toml: optimizer_type = {name!r}: "), message
    for name, ours in (("PagedAdamW8bit", "AdamW8bit"), ("Lion8bit", "Lion"), ("bitsandbytes.optim.AdamW8bit",
                                                                               "AdamW8bit"), ("DAdaptLion", "Prodigy")):
        assert kc.import_kohya({"optimizer_type": name}, "o.toml").values["training"]["optimizer"] == ours


def test_adafactor_relative_step_is_kept_relative(kc):
    config = kc.import_kohya({"optimizer_type": "Adafactor", "learning_rate": 1.0}, "a.toml")
    assert config.values["training"]["optimizer_args"] == ["relative_step=True", "scale_parameter=True"]
    fixed = kc.import_kohya({"optimizer_type": "Adafactor", "optimizer_args": [
        "scale_parameter=False", "relative_step=False", "warmup_init=False"]}, "a.toml").values["training"]
    assert fixed["optimizer_args"] == []
    warm = kc.import_kohya({"optimizer_type": "Adafactor", "optimizer_args": ["relative_step=False",
                                                                              "warmup_init=True"]}, "a.toml")
    assert warm.values["training"]["optimizer_args"] == ["relative_step=True", "warmup_init=True",
                                                         "scale_parameter=True"]


def test_our_adafactor_takes_relative_steps(pack):
    import torch
    from lora_foundry.training.engine.optim import build_optimizer, parse_optimizer_args

    def moved(args: list[str], steps: int = 1) -> float:
        p = torch.nn.Parameter(torch.zeros(8, 8))
        optimizer = build_optimizer("Adafactor", [{"params": [p]}], lr=1.0, weight_decay=0.0,
                                    extra=parse_optimizer_args(args))
        for _ in range(steps):
            p.grad = torch.ones(8, 8)
            optimizer.step()
        return p.detach().abs().mean().item()

    assert moved(["relative_step=True"]) == pytest.approx(1e-2, rel=1e-3)  # min(1e-2, 1 / sqrt(1)), not lr 1.0
    assert moved(["relative_step=True", "scale_parameter=True"]) == pytest.approx(1e-5, rel=1e-3)  # RMS(0) -> eps2
    assert moved(["relative_step=True", "warmup_init=True"]) == pytest.approx(1e-6, rel=1e-3)
    assert moved([]) == pytest.approx(1.0, rel=1e-3)


def test_keep_tokens_separator_keeps_the_front_and_is_never_in_the_caption(kc, pack):
    from lora_foundry.training.data.captions import CaptionOptions, process_caption

    config = kc.import_kohya({"shuffle_caption": True, "keep_tokens_separator": "|||"}, "c.toml")
    assert config.values["captions"]["keep_tokens_separator"] == "|||"
    assert not any("keep_tokens_separator" in line for line in config.unsupported)
    options = CaptionOptions(shuffle_tags=True, keep_tokens=0, keep_tokens_separator="|||", tag_dropout=0.3)
    rng = random.Random(0)
    for _ in range(50):
        caption = process_caption("sks dog, red collar ||| running, grass, sunny ||| best quality", options, rng)
        tags = caption.split(", ")
        assert "|||" not in caption
        assert tags[:2] == ["sks dog", "red collar"] and tags[-1] == "best quality"
        assert set(tags[2:-1]) <= {"running", "grass", "sunny"}
    plain = CaptionOptions(keep_tokens=1, keep_tokens_separator="|||", trigger_word="sks")
    assert process_caption("a, b, c", plain, rng) == "sks, a, b, c"
    assert process_caption("a, sks ||| b", plain, rng) == "sks, a, b"


@pytest.mark.parametrize(("data", "message"), [
    ({"LoRA_type": "LyCORIS/iA3", "network_dim": 1024}, "LoRA_type = 'LyCORIS/iA3'"),
    ({"LoRA_type": "LyCORIS/Native Fine-Tuning"}, "LoRA_type = 'LyCORIS/Native Fine-Tuning'"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"]}, "algo = 'ia3'"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=full"]}, "algo = 'full'"),
    ({"network_module": "networks.oft"}, "network_module = 'networks.oft'"),
])
def test_algorithms_we_do_not_have_are_refused_by_name(kc, data, message):
    assert refused(kc, data).startswith(f"p.json: {message}: ")


def test_lycoris_oft_and_boft_import_with_their_meanings(kc):
    """network_dim is the block size in LyCORIS and here; network_alpha means nothing to LyCORIS' OFT, while our
    alpha is the cap on the rotation: it becomes 0 (no cap, LyCORIS' default), said; a LyCORIS constraint (scaled
    by each layer's width there, not in ComfyUI) and a rescale are refused."""
    gui = kc.import_kohya({"LoRA_type": "LyCORIS/Diag-OFT", "network_dim": 8, "network_alpha": 16,
                           "LyCORIS_preset": "attn-only"}, "p.json")
    assert {k: gui.values["network"][k] for k in ("algorithm", "rank", "alpha", "targets")} == {
        "algorithm": "oft", "rank": 8, "alpha": 0, "targets": "attention"}
    assert any(line.startswith("network_alpha: 16 -> 0 (LyCORIS' OFT / BOFT ignore it") for line in gui.changed)
    toml = kc.import_kohya({"network_module": "lycoris.kohya", "network_dim": 16,
                            "network_args": ["algo=boft", "constraint=0", "rescaled=False"]}, "p.toml")
    assert (toml.values["network"]["algorithm"], toml.values["network"]["alpha"]) == ("boft", 0)
    assert refused(kc, {"LoRA_type": "LyCORIS/BOFT", "constrain": 1e-4}).startswith(
        "p.json: constrain = 0.0001: LyCORIS caps the rotation at this times each layer's outputs")
    assert refused(kc, {"network_module": "lycoris.kohya", "network_args": ["algo=diag-oft", "rescaled=True"]}
                   ).startswith("p.json: rescaled = 'True': we train no per-row rescale")


def test_what_training_refuses_is_refused_at_import(kc):
    gui = {"LoRA_type": "LyCORIS/LoKr", "network_dim": 64, "network_alpha": 64, "conv_dim": 64, "use_cp": True,
           "factor": -1}
    assert refused(kc, gui).startswith("p.json: use_cp = True: ")
    config = kc.import_kohya({**gui, "network_dim": 100000, "conv_dim": 100000}, "p.json")  # full: no Tucker core
    assert "use_tucker" not in config.values["network"]
    assert "use_cp: not needed (full-matrix LoKr has no Tucker core)" in config.unsupported


def test_validation_only_dataset_is_not_trained_on(kc):
    text = """
    [[datasets]]
    validation_split = 1.0
      [[datasets.subsets]]
      image_dir = "/d/val"
    [[datasets]]
      [[datasets.subsets]]
      image_dir = "/d/train"
      num_repeats = 2
    """
    config = kc.import_kohya(tomllib.loads(text), "v.toml")
    assert config.values["dataset"]["folder"] == "/d/train"
    assert "validation_split" not in config.values["dataset"]
    lines = [line for line in config.unsupported if line.startswith("datasets[0]")]
    assert lines == ["datasets[0].subsets[0]: not supported (validation only (validation_split = 1.0): our "
                     "held-out images are a share of the dataset folder, so /d/val is not used; set "
                     "validation_split (up to 0.5) to hold out a share of the training images)"]
    with pytest.raises(kc.ConfigError, match="every image subset is validation only"):
        kc.import_kohya(tomllib.loads('[general]\nvalidation_split = 1.0\n[[datasets.subsets]]\nimage_dir = "/v"\n'),
                        "v.toml")


def test_readme_lists_every_kohya_key_as_the_tables_say(kc):
    from harness.comfy import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    start, end = "<!-- kohya keys: start -->\n", "<!-- kohya keys: end -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == kc.names.key_table() + "\n"


def test_gui_presets_of_every_kind_import(kc):
    """Forms of kohya_ss' presets/lora that were refused whole: each imports, with what changed listed."""
    presets = [
        {"LoRA_type": "LyCORIS/LoKr", "LyCORIS_preset": "full", "network_dim": 100000, "network_alpha": 1,
         "conv_dim": 100000, "conv_alpha": 1, "factor": 6, "use_cp": True, "bucket_reso_steps": 1,
         "optimizer": "Prodigy", "optimizer_args": '"d0=1e-5" "d_coef=1.0" "weight_decay=0.4"', "learning_rate": 1.0,
         "unet_lr": 1.0, "text_encoder_lr": 1.0},
        {"LoRA_type": "Standard", "network_dim": 64, "network_alpha": 64, "bucket_reso_steps": 1,
         "optimizer": "Adafactor", "optimizer_args": "scale_parameter=False relative_step=False warmup_init=False",
         "learning_rate": 4e-07, "unet_lr": 4e-07, "text_encoder_lr": 0.0},
    ]
    for preset in presets:
        config = kc.import_kohya(json.loads(json.dumps(preset)), "preset.json")
        assert config.values["dataset"]["bucket_step"] == 8
