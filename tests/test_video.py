"""Video LoRAs and edit-model LoRAs (issue 16): clips train video models, Wan 2.2's experts train on their side of
the noise boundary, image-to-video and edit models get the image the host's own nodes give them at sampling.

The models are the harness's tiny ones (harness/families.py). Through the server they come from the test-only
tiny-family node (harness/test_models): Wan's UMT5-XXL text encoder cannot come small from a file.
"""

from __future__ import annotations

import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from harness.comfy import REPO_ROOT
from harness.examples import FAMILY_EXAMPLES, random_lora, with_tiny_family
from harness.families import build_family
from harness.recorder import Recorder
from harness.server import ComfyServer
from harness.workflow import to_api_prompt

CLIP_CAPTIONS = ["a red square moving right", "a blue ball falling", "a green bar growing"]


def _write_video(path, frames: list[np.ndarray], fps: int = 16) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _moving_square(count: int, colour, size=(64, 64), seed: int = 0) -> list[np.ndarray]:
    """A square crossing a smooth background: frames that differ, and that a tiny model can learn."""
    rng = np.random.default_rng(seed)
    background = np.kron(rng.random((4, 4, 3)) * 80, np.ones((size[1] // 4, size[0] // 4, 1)))
    frames = []
    for i in range(count):
        frame = background.copy()
        x = (4 + 3 * i) % (size[0] - 16)
        frame[24:40, x:x + 16] = colour
        frames.append(frame.astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def clip_dataset(tmp_path_factory):
    """Two captioned clips of 24 frames (mp4) and one captioned still image."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("clips") / "videos"
    folder.mkdir()
    for i, colour in enumerate([(220, 40, 40), (40, 40, 220)]):
        _write_video(folder / f"clip{i}.mp4", _moving_square(24, colour, seed=i))
        (folder / f"clip{i}.txt").write_text(CLIP_CAPTIONS[i])
    Image.fromarray(_moving_square(1, (40, 200, 40), seed=5)[0]).save(folder / "still.png")
    (folder / "still.txt").write_text(CLIP_CAPTIONS[2])
    return folder


def _clips(folder, **options):
    from lora_foundry.training.data.dataset import load_dataset

    settings = {"resolution": 64, "min_side": 64, "max_side": 64, "bucket_step": 64, "frames": 9,
                "frame_multiple": 4, **options}
    return load_dataset(folder, **settings)


def _trainer(fam, dataset, **settings):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    config = {"steps": 4, "batch_size": 1, "learning_rate": 5e-3, "seed": 0, **settings}
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(rank=4, alpha=4, preset="all", seed=0), fam.model, fam.clip)
        return Trainer(fam.model, fam.clip, fam.vae, dataset, net, TrainConfig(**config), name=fam.name)


@pytest.fixture(scope="module")
def wan(pack):
    return build_family("wan21")


# --- Wan 2.2's two experts ---------------------------------------------------------------------

@pytest.mark.parametrize("expert", ["high_noise", "low_noise", "all"])
def test_an_expert_trains_on_its_side_of_the_boundary_only(wan, pack, clip_dataset, expert):
    """Every timestep the model receives while training (and measuring held-out loss) is on the expert's side of
    sigma 0.875, with the model's own shift (Wan: 8, so most levels are high); `all` (the control) draws from both."""
    from lora_foundry.training.run import expert_name

    dataset = _clips(clip_dataset, validation_split=0.34, seed=1)
    trainer = _trainer(wan, dataset, expert=expert, steps=16, validation_every=16, timestep_sampling="uniform")
    with Recorder(wan.model) as seen:
        trainer.run()
    timesteps = torch.cat([call["t"].flatten() for call in seen.calls]) / 1000  # Wan's t is sigma * 1000
    assert len(timesteps) >= 16
    if expert == "high_noise":
        assert timesteps.min() >= 0.875 - 1e-4, timesteps
    elif expert == "low_noise":
        assert timesteps.max() <= 0.875 + 1e-4, timesteps
    else:
        assert timesteps.min() < 0.875 < timesteps.max(), timesteps
    want = "wan_lora" if expert == "all" else f"wan_lora_{expert}"
    assert expert_name("wan_lora", expert) == want == expert_name(want, expert)


def test_clip_latents_are_cached_on_disk_one_file_per_window(wan, pack, clip_dataset, tmp_path, monkeypatch):
    folder = shutil.copytree(clip_dataset, tmp_path / "videos")
    dataset = _clips(folder, frame_extraction="chunk")  # 24 frames: two windows of 9 per clip, and the still
    assert sorted(item.frame_count for item in dataset.items) == [1, 9, 9, 9, 9]
    first = _trainer(wan, dataset, latent_cache="disk")
    first.data.encode_images(dataset.items)
    assert len(list((folder / ".lora_foundry_cache").glob("*.safetensors"))) == 5
    assert first.data.latents.get(0).shape[1] in (1, 3)  # latent frames: (9 - 1) / 4 + 1 for a window, 1 for the still
    windows = [first.data.latents.get(i) for i, item in enumerate(dataset.items) if item.is_clip]
    assert not torch.equal(windows[0], windows[1])  # the windows of one clip are cached apart

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE ran although every latent is cached")

    second = _trainer(wan, dataset, latent_cache="disk")
    monkeypatch.setattr(wan.vae, "encode", no_vae)
    second.data.encode_images(dataset.items)
    for i in range(len(dataset.items)):
        torch.testing.assert_close(second.data.latents.get(i), first.data.latents.get(i), rtol=0, atol=0)


def test_an_expert_of_a_model_that_is_not_flow_is_refused(pack, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    fam = build_family("sd15")
    with pytest.raises(ValueError, match="expert: the experts split the noise levels of a flow model"):
        _trainer(fam, _clips(tmp_path), expert="low_noise")


# --- image-to-video: the start frame WanImageToVideo gives ------------------------------------

def test_image_to_video_trains_with_the_start_frame_wan_image_to_video_gives(pack, clip_dataset, comfy_nodes):
    """The I2V model's extra input channels (mask + start-frame latent) while training equal, bit for bit, what
    WanImageToVideo + KSampler give it for the clip's first frame."""
    import comfy.sample
    from comfy_extras.nodes_wan import WanImageToVideo
    from lora_foundry.training.engine.image_inputs import START_FRAME

    fam = build_family("wan21_i2v")
    dataset = _clips(clip_dataset)
    trainer = _trainer(fam, dataset, steps=1)
    assert trainer.data.image_input == START_FRAME
    trainer.data.encode_images(dataset.items)
    index = next(i for i, item in enumerate(dataset.items) if item.is_clip)
    item = dataset.items[index]
    with torch.inference_mode(False), torch.no_grad(), Recorder(fam.model) as training:
        trainer.step.batch_loss(fam.model, [index], random.Random(0), torch.Generator().manual_seed(0), "cpu", None)

    pixels = dataset.load_image(item)
    positive = comfy_nodes.CLIPTextEncode().encode(fam.clip, item.caption)[0]
    positive, negative, latent = WanImageToVideo.execute(positive, positive, fam.vae, 64, 64, item.frame_count, 1,
                                                         start_image=pixels[:1]).result
    samples = latent["samples"]
    with torch.inference_mode(), Recorder(fam.model) as sampling:
        comfy.sample.sample(fam.model, comfy.sample.prepare_noise(samples, 0), 1, 1.0, "euler", "normal", positive,
                            negative, samples, seed=0, disable_pbar=True)
    got, want = training.calls[0]["x"], sampling.calls[0]["x"]
    assert got.shape == want.shape and got.shape[1] == 36, (got.shape, want.shape)
    assert got.shape[2] == (item.frame_count - 1) // 4 + 1
    torch.testing.assert_close(got[:, 16:], want[:, 16:], rtol=0, atol=0)
    assert want[:, 20:, 0].abs().sum() > 0 and (want[:, 16:20, 0] == 1).all()  # a start frame, marked as given
    assert (want[:, 16:20, 1:] == 0).all()  # the frames after it are the model's to make


def test_image_to_video_trains_with_latents_cached_on_disk(pack, clip_dataset, tmp_path):
    """With the disk cache on, a second run still builds every start frame (they come from the pixels, so a
    start-frame model reads its clips again rather than the cached latents) and trains the same."""
    fam = build_family("wan21_i2v")
    dataset = _clips(shutil.copytree(clip_dataset, tmp_path / "videos"))
    first = _trainer(fam, dataset, steps=4, latent_cache="disk").run()
    second = _trainer(fam, dataset, steps=4, latent_cache="disk").run()
    assert first.steps == second.steps == 4 and all(np.isfinite(second.losses))
    assert second.losses == pytest.approx(first.losses, rel=1e-5)
    # Wan 2.2's image-to-video experts switch at 0.9, its text-to-video ones at 0.875 (expert_boundary 0: the model's)
    assert _trainer(fam, dataset, expert="high_noise").step.expert_boundary() == 0.9
    assert _trainer(build_family("wan21"), dataset, expert="high_noise").step.expert_boundary() == 0.875
    assert _trainer(fam, dataset, expert="high_noise", expert_boundary=0.8).step.expert_boundary() == 0.8


# --- edit models: the source image ReferenceLatent gives ---------------------------------------

@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory):
    """(source, target, instruction) triples: targets with .txt instructions, sources in control/ by file name."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("pairs") / "edits"
    (folder / "control").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(4):
        source = (np.kron(rng.random((4, 4, 3)), np.ones((16, 16, 1))) * 255).astype(np.uint8)
        Image.fromarray(source).save(folder / "control" / f"{i}.png")
        Image.fromarray(255 - source).save(folder / f"{i}.png")  # the edit: invert the colours
        (folder / f"{i}.txt").write_text("invert the colours")
    return folder


def _pairs(folder, **options):
    from lora_foundry.training.data.dataset import load_dataset

    return load_dataset(folder, resolution=64, min_side=64, max_side=64, bucket_step=64, **options)


def test_an_edit_model_receives_the_reference_latent_that_reference_latent_gives(pack, pairs_dataset, comfy_nodes):
    """Flux Kontext's layout: while training, the model's ref_latents equal what VAEEncode + ReferenceLatent +
    KSampler give it for the source image, and they are the source's, not the target's."""
    import comfy.sample
    import comfy_extras.nodes_flux as nodes_flux
    from comfy_extras.nodes_edit_model import ReferenceLatent
    from lora_foundry.training.engine.image_inputs import REFERENCE

    fam = build_family("flux")
    dataset = _pairs(pairs_dataset)
    assert dataset.has_control and len(dataset.items) == 4
    trainer = _trainer(fam, dataset, steps=1)
    assert trainer.data.image_input == REFERENCE
    trainer.data.encode_images(dataset.items)
    trainer.data.encode_control(dataset.items)
    with torch.inference_mode(False), torch.no_grad(), Recorder(fam.model) as training:
        trainer.step.batch_loss(fam.model, [1], random.Random(0), torch.Generator().manual_seed(0), "cpu", None)

    item = dataset.items[1]
    source = dataset.load_control(item)[None]
    positive = comfy_nodes.CLIPTextEncode().encode(fam.clip, item.caption)[0]
    positive = ReferenceLatent.execute(positive, comfy_nodes.VAEEncode().encode(fam.vae, source)[0]).result[0]
    positive = nodes_flux.FluxGuidance.execute(positive, 1.0).result[0]
    latent = torch.zeros((1, 16, 8, 8))
    with torch.inference_mode(), Recorder(fam.model) as sampling:
        comfy.sample.sample(fam.model, comfy.sample.prepare_noise(latent, 0), 1, 1.0, "euler", "normal", positive,
                            positive, latent, seed=0, disable_pbar=True)
    got, want = training.calls[0]["ref_latents"], sampling.calls[0]["ref_latents"]
    assert len(got) == len(want) == 1
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    target = fam.model.model.process_latent_in(fam.vae.encode(dataset.load_image(item)[None]))
    assert (got[0] - target).abs().mean() > 0.1 * target.abs().mean()  # the source's latent, not the target's


def test_edit_pairs_train_and_the_loss_falls(pack, pairs_dataset):
    fam = build_family("flux")
    result = _trainer(fam, _pairs(pairs_dataset, validation_split=0.25, seed=0), steps=24, batch_size=2,
                      validation_every=12, flip=True).run()
    assert result.validation[-1][1] < result.validation[0][1], result.validation


def test_control_images_for_a_model_without_reference_input_are_refused(pack, pairs_dataset, clip_dataset, tmp_path):
    from lora_foundry.training.engine.image_inputs import ImageInputError

    with pytest.raises(ImageInputError, match="takes no reference image"):
        _trainer(build_family("sd15"), _pairs(pairs_dataset))
    with pytest.raises(ValueError, match="clip\\(s\\).*this is an image model"):
        _trainer(build_family("sd15"), _clips(clip_dataset))


# --- through the server: the example workflows on the tiny families ----------------------------

@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("video-comfy")
    with ComfyServer(base, test_models=True) as server:
        yield server


def _example(server: ComfyServer, name: str, changes: dict) -> dict:
    """The example workflow as the frontend queues it, on its tiny family, with `changes` by node class."""
    workflow = json.loads((REPO_ROOT / "example_workflows" / f"{name}.json").read_text())
    prompt = with_tiny_family(to_api_prompt(workflow, server.object_info()), FAMILY_EXAMPLES[name])
    for node in prompt.values():
        node["inputs"].update(changes.get(node["class_type"], {}))
    return prompt


def _nodes(prompt: dict, kind: str) -> list[str]:
    return sorted((nid for nid, node in prompt.items() if node["class_type"] == kind), key=int)


def _saved(outputs: dict, prompt: dict) -> list:
    from pathlib import Path

    texts = [str(t) for nid in _nodes(prompt, "LoraFoundrySaveLoRA") for t in outputs.get(nid, {}).get("text", [])]
    assert texts, outputs
    return [Path(t) for t in texts if t.endswith(".safetensors")]


def _loads_without_warnings(path, fam, caplog) -> None:
    """ComfyUI's own LoRA loader patches every layer in the file, with no "lora key not loaded"."""
    import comfy.sd
    from lora_foundry.lora_core.files import read_safetensors

    tensors, _ = read_safetensors(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded, _ = comfy.sd.load_lora_for_models(fam.model, None, tensors, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == len({k.split(".")[0] for k in tensors}), path


FAST_TRAIN = {"steps": 4, "precision": "fp32", "gradient_checkpointing": False, "cache_latents": "memory",
              "sample_every": 0}
TINY_CLIPS = {"resolution": 64, "min_side": 64, "max_side": 64, "bucket_step": 64, "frames": 9, "frame_rate": 0.0}


@pytest.mark.server
@pytest.mark.slow
def test_the_wan_video_example_trains_on_clips_through_the_server(video_server, pack, clip_dataset, caplog):
    """Two clips (cut into 9-frame windows) and a still: the held-out loss falls, and the file loads in ComfyUI."""
    shutil.copytree(clip_dataset, video_server.base_dir / "input" / "lora_videos", dirs_exist_ok=True)
    prompt = _example(video_server, "train_wan_video_lora", {
        "LoraFoundryLoadDataset": {**TINY_CLIPS, "validation_split": 0.2, "seed": 1},
        "LoraFoundryTrainLoRA": {**FAST_TRAIN, "steps": 30, "learning_rate": 5e-3, "validation_every": 10}})
    outputs = video_server.run(prompt, timeout=900)
    (train,) = _nodes(prompt, "LoraFoundryTrainLoRA")
    validation = outputs[train]["validation"]
    assert len(validation) == 3 and validation[-1][1] < validation[0][1], validation
    (lora,) = _saved(outputs, prompt)
    _loads_without_warnings(lora, build_family("wan21"), caplog)


@pytest.mark.server
@pytest.mark.slow
def test_the_wan22_example_trains_both_experts_into_two_files(video_server, pack, clip_dataset, caplog):
    from lora_foundry.lora_core.files import read_safetensors

    shutil.copytree(clip_dataset, video_server.base_dir / "input" / "lora_videos", dirs_exist_ok=True)
    prompt = _example(video_server, "train_wan22_experts", {"LoraFoundryLoadDataset": TINY_CLIPS,
                                                           "LoraFoundryTrainLoRA": FAST_TRAIN})
    outputs = video_server.run(prompt, timeout=900)
    files = _saved(outputs, prompt)
    assert sorted(f.stem.rsplit("_", 1)[0][-len("wan22_lora_high_noise"):] for f in files) == \
        ["wan22_lora_high_noise", "wan22_lora_low_noise"], files
    for seed, expert in enumerate(("high_noise", "low_noise")):  # the tiny node's seed of each expert's loader
        (path,) = [f for f in files if expert in f.name]
        metadata = read_safetensors(path)[1]
        assert json.loads(metadata["lora_foundry_training"])["expert"] == expert
        assert metadata["modelspec.title"] == f"wan22_lora_{expert}"  # both Train LoRA nodes say wan22_lora
        _loads_without_warnings(path, build_family("wan21", seed), caplog)
    high, low = (read_safetensors(f)[0] for f in sorted(files))
    assert any(not torch.equal(high[k], low[k]) for k in high)


@pytest.mark.server
@pytest.mark.slow
def test_the_edit_example_trains_on_pairs_through_the_server(video_server, pack, pairs_dataset, caplog):
    shutil.copytree(pairs_dataset, video_server.base_dir / "input" / "lora_edit_pairs", dirs_exist_ok=True)
    prompt = _example(video_server, "train_edit_lora", {
        "LoraFoundryLoadDataset": {"resolution": 64, "min_side": 64, "max_side": 64, "bucket_step": 64},
        "LoraFoundryTrainLoRA": FAST_TRAIN})
    outputs = video_server.run(prompt, timeout=900)
    (train,) = _nodes(prompt, "LoraFoundryTrainLoRA")
    assert "reference image" in " ".join(map(str, outputs[train]["text"]))
    (lora,) = _saved(outputs, prompt)
    _loads_without_warnings(lora, build_family("flux"), caplog)



ADAPTER = "zimage_turbo_training_adapter_v2.safetensors"  # what the Z-Image example's Load LoRA (model only) names


@pytest.mark.server
@pytest.mark.slow
def test_the_zimage_example_trains_turbo_on_its_training_adapter_which_stays_out_of_the_file(
        video_server, pack, concept_dataset, caplog):
    """The Z-Image example on the tiny Z-Image model, with a generated de-distillation adapter loaded before Train
    LoRA: the adapter is part of the base while training (the same run without it trains another LoRA), the saved
    file holds only the trained rank-16 layers and loads in ComfyUI with no unloaded key."""
    from lora_foundry.lora_core.files import read_safetensors, write_safetensors

    zimage = build_family("zimage")  # seed 0: the model the tiny node gives the example's UNETLoader
    adapter = random_lora(pack, zimage.model, None, seed=7)
    write_safetensors(adapter.state_dict_kohya(), video_server.base_dir / "models" / "loras" / ADAPTER, {})
    shutil.copytree(concept_dataset, video_server.base_dir / "input" / "lora_dataset", dirs_exist_ok=True)
    images = {"resolution": 64, "min_side": 64, "max_side": 64, "bucket_step": 64}
    files = {}
    for strength in (1.0, 0.0):
        prompt = _example(video_server, "train_zimage_lora", {
            "LoraFoundryLoadDataset": images, "LoraLoaderModelOnly": {"strength_model": strength},
            "LoraFoundryTrainLoRA": {**FAST_TRAIN, "output_name": f"zimage_{strength:g}"}})
        (files[strength],) = _saved(video_server.run(prompt, timeout=900), prompt)
    assert "lora key not loaded" not in video_server.log()  # the adapter applied whole
    with_adapter, without = (read_safetensors(files[s])[0] for s in (1.0, 0.0))
    assert with_adapter.keys() == without.keys()
    assert {t.shape[0] for k, t in with_adapter.items() if k.endswith("lora_down.weight")} == {16}
    ups = [k for k in with_adapter if k.endswith("lora_up.weight")]
    change = max(float((with_adapter[k].float() - without[k].float()).norm() / without[k].float().norm()) for k in ups)
    assert change > 0.01, change  # trained on another base
    _loads_without_warnings(files[1.0], zimage, caplog)

def test_clips_whose_frame_count_the_vae_cannot_encode_are_refused(wan, pack, clip_dataset):
    """7 frames fit frame_multiple 2, but Wan's VAE compresses 4 frames into one: Train LoRA names the settings."""
    dataset = _clips(clip_dataset, frames=7, frame_multiple=2)
    with pytest.raises(ValueError, match=r"frame_multiple: .*trains 7 frames.*set frame_multiple to 4 and frames to "
                                         r"one of 5, 9"):
        _trainer(wan, dataset)
