"""Sample prompts as users write them (kohya's `--n --w --h --s --l --d`): the parser, bad lines failing at the start,
and the samples a run writes, the step-0 baseline equal to the host's own KSampler on the base model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

BASELINE = "a red square --n a blue circle --w 39 --h 48 --s 2 --l 2.5 --d 7"  # 39 px: the host's 32


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    """Two 64 px images with one caption: the least a run encodes."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("data") / "1_sks"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("sks circle")
    return folder.parent


@pytest.fixture(scope="module")
def prompts(pack):
    from lora_foundry.training.engine import sample_prompts
    return sample_prompts


def test_every_option_and_the_defaults(prompts):
    P, defaults = prompts.SamplePrompt, prompts.SampleDefaults(width=64, height=96, steps=12, cfg=3.0, seed=10)
    lines = ["# a comment", "", "a red circle --n blurry, dark --w 1024 --h 770 --s 20 --l 4.5 --d 1234",
             "  a blue square  ", "sks plus --L 7 --S 3 --N", "a -- b, well--known --h\t64"]
    assert prompts.parse_sample_prompts(lines, defaults) == [
        P("a red circle", "blurry, dark", 1024, 768, 20, 4.5, 1234),  # 770 px rounds down to a multiple of 8
        P("a blue square", "", 64, 96, 12, 3.0, 11),  # unset: the defaults, seed + the prompt's index
        P("sks plus", "", 64, 96, 3, 7.0, 12),
        P("a -- b, well--known", "", 64, 64, 12, 3.0, 13)]
    coarse = prompts.SampleDefaults(64, 64, 1, 1.0, 0, multiple=16)  # a VAE that downscales 16x
    got = prompts.parse_sample_prompts(["x --w 100 --h 31"], coarse)[0]
    assert (got.width, got.height) == (96, 16)
    # kohya's options previews do not use are skipped, as a kohya prompt file has them
    got = prompts.parse_sample_prompts(["x --ss euler_a --g 3.5 --d 5"], coarse)[0]
    assert (got.prompt, got.seed) == ("x", 5)


@pytest.mark.parametrize("lines, line, option", [
    (["ok", "", "# skipped", "a circle --x 5"], 4, "--x"),
    (["a circle --s many"], 1, "--s"),
    (["ok", "a circle --w 4"], 2, "--w"),  # under one latent cell
    (["a circle --l nan"], 1, "--l"),
    (["a circle --d -1"], 1, "--d"),
    (["a circle --h 512.5"], 1, "--h"),
])
def test_a_bad_option_names_its_line(prompts, lines, line, option):
    with pytest.raises(ValueError, match=f"line {line}: .*{option}"):
        prompts.parse_sample_prompts(lines, prompts.SampleDefaults(64, 64, 1, 1.0, 0))


def test_a_bad_line_fails_before_anything_is_encoded(pack, loaded_checkpoint, two_images):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.nodes.train import TrainLoRA
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    # The node checks the text as typed: blank and comment lines count.
    with pytest.raises(ValueError, match="line 4: unknown option --q"):
        TrainLoRA.execute(None, None, None, None, "x", sample_prompts="a\n\n# b\nc --q 1\n")
    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(two_images, resolution=64, min_side=64, max_side=64, bucket_step=64)
    encoded = []
    tokenize, encode = clip.tokenize, vae.encode
    clip.tokenize = lambda *a, **k: encoded.append(a) or tokenize(*a, **k)
    vae.encode = lambda *a, **k: encoded.append(a) or encode(*a, **k)
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=2, alpha=2, preset="attention"), model)
    try:
        with torch.inference_mode(False), pytest.raises(ValueError, match="line 2: --s"):
            Trainer(model, clip, vae, dataset, network, TrainConfig(steps=1, sample_prompts=["a", "b --s x"]))
    finally:
        clip.tokenize, vae.encode = tokenize, encode
    assert encoded == []


def test_samples_are_saved_at_step_0_every_n_and_the_end(pack, loaded_checkpoint, two_images, comfy_nodes, tmp_path,
                                                         one_thread):
    """Headless (no node to show them), each prompt at its own size; the baseline is the host's KSampler on the
    base model, with the prompt's seed, steps, CFG and negative."""
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer
    from PIL import Image

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(two_images, resolution=64, min_side=64, max_side=64, bucket_step=64)
    lines = ["sks circle", "# not sampled", BASELINE]
    config = TrainConfig(steps=3, sample_every=2, sample_steps=1, sample_prompts=lines, learning_rate=1e-3)
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=2, alpha=2, preset="attention"), model)
        trainer = Trainer(model, clip, vae, dataset, network, config, name="run", state_dir=tmp_path)
        trainer.run()
    folder = tmp_path / "samples"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"run-step{step:06d}-{index:02d}.png" for step in (0, 2, 3) for index in (0, 1)]
    for step in (0, 2, 3):
        assert Image.open(folder / f"run-step{step:06d}-00.png").size == (64, 64)  # the first bucket's
        assert Image.open(folder / f"run-step{step:06d}-01.png").size == (32, 48)
    assert json.loads(trainer.files.metadata(3)["lora_foundry_training"])["sample_prompts"] == lines

    # Resumed past step 0: no second baseline, the new last step sampled.
    baseline_written = (folder / "run-step000000-00.png").stat().st_mtime_ns
    with torch.inference_mode(False):
        Trainer(model, clip, vae, dataset, network, replace(config, steps=4), name="run", state_dir=tmp_path,
                resume=trainer.files.state_path).run()
    assert len(list(folder.iterdir())) == 8 and (folder / "run-step000004-01.png").is_file()
    assert (folder / "run-step000000-00.png").stat().st_mtime_ns == baseline_written

    def ksampler(negative_prompt: str) -> np.ndarray:
        with torch.inference_mode():  # as ComfyUI runs nodes
            positive, negative = (comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
                                  for text in ("a red square", negative_prompt))
            latent = comfy_nodes.EmptyLatentImage().generate(39, 48, 1)[0]
            samples = comfy_nodes.KSampler().sample(model, 7, 2, 2.5, "euler", "normal", positive, negative, latent)[0]
            return comfy_nodes.VAEDecode().decode(vae, samples)[0][0].numpy() * 255

    baseline = np.asarray(Image.open(folder / "run-step000000-01.png"), dtype=np.float32)
    host, unguided = ksampler("a blue circle"), ksampler("")
    assert baseline.shape == host.shape == (48, 32, 3)
    assert np.abs(baseline - host).max() <= 2.0, np.abs(baseline - host).max()
    assert np.abs(baseline - unguided).mean() > 10 * np.abs(baseline - host).mean() + 0.5  # the negative counts
