"""Every model family the host runs trains through the same loop, with the inputs ComfyUI gives it at inference.

Each family is a tiny model built with the host's own classes (harness/families.py): its diffusion
model (detected by the host where detection allows a small one), its own text encoder classes at a
small width with the real tokenizers, and a VAE of its latent space.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from harness.families import FAMILIES, build_family

CAPTIONS = ["a red circle on blue", "a green square", "a yellow plus on teal", "a blue triangle", "a black ring",
            "a white star on red"]
# (modelspec.architecture, ss_base_model_version) each family's files carry.
ARCHITECTURES = {
    "sd15": ("stable-diffusion-v1", "sd_v1"), "sd2v": ("stable-diffusion-v2-768-v", "sd_v2"),
    "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"), "sd3": ("stable-diffusion-3-medium", "sd3"),
    "flux": ("flux-1-dev", "flux1"), "chroma": ("chroma", "chroma"), "qwen_image": ("qwen-image", "qwen_image"),
    "zimage": ("z-image", "z_image"), "wan21": ("wan2.1-t2v", "wan21"),
}
CLIP_FAMILIES = {"sd15", "sd2v", "sdxl", "sd3", "flux"}  # families whose text encoders include a CLIP


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Six images with captions: 64x64, and 64x96 ones that SDXL sees with a crop and an original size."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("families") / "2_toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        size = (64, 96) if i % 3 == 0 else (64, 64)
        smooth = rng.random((4, 4, 3)) * 255
        img = Image.fromarray(smooth.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder.parent


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, pack):
    return build_family(request.param)


def _dataset(folder):
    from lora_foundry.training.dataset import load_dataset

    return load_dataset(folder, resolution=64, min_side=64, max_side=64, bucket_step=64, validation_split=0.34, seed=1)


def _trainer(fam, folder, network=None, **settings):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.trainer import TrainConfig, Trainer

    config = {"steps": 12, "batch_size": 2, "learning_rate": 5e-3, "seed": 0, "validation_every": 12, **settings}
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(**{"rank": 4, "alpha": 4, "preset": "all", "seed": 0,
                                                  **(network or {})}), fam.model, fam.clip)
        return Trainer(fam.model, fam.clip, fam.vae, _dataset(folder), net, TrainConfig(**config), name=fam.name)


class Recorder:
    """Records the keyword inputs of every call of the diffusion model (what apply_model hands it)."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.model.diffusion_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append({"x": args[0].detach().clone(),
                           **{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()
                              if k not in ("transformer_options", "control")}})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_family_is_what_the_host_runs(family):
    from lora_foundry.training.objective import family as prediction

    kinds = {"sd15": "eps", "sd2v": "v", "sdxl": "eps"}
    assert prediction(family.model.get_model_object("model_sampling")) == kinds.get(family.name, "flow")
    assert family.model.get_model_object("latent_format").latent_channels == family.latent_channels


def test_family_trains_and_its_file_loads_in_comfyui(family, dataset_dir, tmp_path, caplog):
    """Held-out loss falls; the saved file loads in LoraLoader with no unloaded key and gives the trained model."""
    import comfy.sd
    from lora_foundry.lora_core.files import read_safetensors, write_safetensors
    from lora_foundry.training.conditioning import apply_model, model_inputs
    from lora_foundry.training.trainer import held_out_loss

    trainer = _trainer(family, dataset_dir)
    assert trainer.dataset.validation
    with torch.inference_mode(False):
        trainer.encode_images(trainer.dataset.validation, validation=True)
        base = held_out_loss(trainer, family.model, family.model.load_device)
        result = trainer.run()
    latent = next(iter(trainer.latents.values()))
    assert latent.shape[0] == family.latent_channels and latent.dim() == (4 if family.video else 3)
    assert all(np.isfinite(result.losses))
    assert result.validation[-1][1] < base, (base, result.validation)

    path = write_safetensors(result.network.state_dict_kohya(), tmp_path / f"{family.name}.safetensors",
                             trainer.metadata(result.steps))
    tensors, meta = read_safetensors(path)
    arch, version = ARCHITECTURES[family.name]
    assert meta["modelspec.architecture"] == f"{arch}/lora" and meta["ss_base_model_version"] == version
    assert all(k.startswith("lora_unet_") for k in tensors), sorted(tensors)[:3]
    caplog.set_level(logging.WARNING)
    loaded, _ = comfy.sd.load_lora_for_models(family.model, family.clip, tensors, 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == len(result.network.adapters)

    # The model ComfyUI patches from the file is the model the trainer ended with.
    x0 = trainer.latents[(0, False)][None]
    noisy = x0 + torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.7 if trainer.kind == "flow" else 3.0])
    inputs = model_inputs(family.model.model, trainer.conditioning([CAPTIONS[0]], "cpu"), noisy,
                          [trainer.geometry[(0, False)]], trainer.guidance)
    with torch.inference_mode(False), torch.no_grad():
        attached, _ = result.network.attach(family.model)
        result.network.eval()
        import comfy.model_management as mm

        mm.load_models_gpu([attached], force_full_load=True)
        trained = apply_model(attached.model, noisy, sigma, inputs)
        mm.load_models_gpu([loaded], force_full_load=True)
        comfy_out = apply_model(loaded.model, noisy, sigma, inputs)
        mm.load_models_gpu([family.model], force_full_load=True)
        base_out = apply_model(family.model.model, noisy, sigma, inputs)
    err = (comfy_out - trained).norm() / trained.norm()
    assert err < 1e-5, err
    assert (base_out - trained).norm() / trained.norm() > 100 * err  # the adapter changed the model


def _inference_conditioning(fam, nodes, prompt, geometry):
    """What a ComfyUI user's graph gives the sampler for `prompt`: the family's own text-encode node."""
    import comfy_extras.nodes_clip_sdxl as nodes_sdxl
    import comfy_extras.nodes_flux as nodes_flux

    if fam.name == "sdxl":
        width, height = geometry.original
        return nodes_sdxl.CLIPTextEncodeSDXL.execute(fam.clip, width, height, geometry.crop[1], geometry.crop[0],
                                                     *geometry.target, prompt, prompt).result[0]
    conditioning = nodes.CLIPTextEncode().encode(fam.clip, prompt)[0]
    if fam.name == "flux":  # kohya / ai-toolkit train Flux-dev at guidance 1.0: the same as FluxGuidance 1.0
        conditioning = nodes_flux.FluxGuidance.execute(conditioning, 1.0).result[0]
    return conditioning


def test_family_gets_the_inputs_comfyui_gives_it(family, dataset_dir, comfy_nodes):
    """The diffusion model receives from training exactly the conditioning inputs KSampler gives it."""
    import comfy.sample

    trainer = _trainer(family, dataset_dir, steps=1)
    index = next(i for i, item in enumerate(trainer.dataset.items) if tuple(item.size) != tuple(item.bucket)) \
        if family.name == "sdxl" else 0
    item = trainer.dataset.items[index]
    trainer.encode_images([item])
    key = (0, False)
    geometry = trainer.geometry[key]
    if family.name == "sdxl":
        assert geometry.original != geometry.target and geometry.crop != (0, 0)
    caption = trainer.fixed_caption(item)
    x0 = trainer.latents[key][None]
    with torch.inference_mode(False), torch.no_grad(), Recorder(family.model) as training:
        trainer.loss(family.model, x0, torch.randn(x0.shape), [0.5], trainer.conditioning([caption], "cpu"),
                     [geometry], torch.ones(1), None)
    positive = _inference_conditioning(family, comfy_nodes, caption, geometry)
    latent = torch.zeros((1, *x0.shape[1:]))
    with torch.inference_mode(), Recorder(family.model) as sampling:
        comfy.sample.sample(family.model, comfy.sample.prepare_noise(latent, 0), 1, 1.0, "euler", "normal",
                            positive, positive, latent, seed=0, disable_pbar=True)
    got, want = training.calls[0], sampling.calls[0]
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    assert got["x"].shape == want["x"].shape
    compared = [k for k in want if k not in ("x", "t", "timesteps", "timestep") and want[k] is not None]
    assert "context" in compared or "c_crossattn" in compared or "encoder_hidden_states" in compared, compared
    for name in compared:
        if torch.is_tensor(want[name]):
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
        else:
            assert got[name] == want[name], name
    if family.name == "sdxl":
        assert "y" in compared
    if family.name == "flux":
        assert float(got["guidance"].flatten()[0]) == 1.0


def test_family_preview_has_its_latent_shape(family, dataset_dir):
    trainer = _trainer(family, dataset_dir, steps=1, sample_steps=2, sample_prompts=["a red circle"])
    with torch.inference_mode(False):
        trainer.encode_images(trainer.dataset.items)
        patched, _ = trainer.network.attach(family.model)
        with Recorder(family.model) as calls:
            preview = trainer.sample(patched, 1)
    shape = next(iter(trainer.latents.values())).shape
    assert calls.calls and all(tuple(c["x"].shape[1:]) == tuple(shape) for c in calls.calls)
    assert preview.size == tuple(trainer.dataset.items[0].bucket)
    pixels = np.asarray(preview)
    assert pixels.std() > 0  # decoded from the family's latent space, not a blank


def test_family_text_encoder_lora(family, dataset_dir, tmp_path, caplog):
    """CLIP encoders train and load in ComfyUI; families with only T5 / LLM encoders say they stay frozen."""
    import comfy.sd

    if family.name not in CLIP_FAMILIES:
        with pytest.raises(ValueError, match="stay frozen"):
            _trainer(family, dataset_dir, network={"text_encoder": True, "preset": "attention"})
        return
    trainer = _trainer(family, dataset_dir, steps=2, validation_every=0,
                       network={"text_encoder": True, "preset": "attention"})
    with torch.inference_mode(False):
        result = trainer.run()
    te = {n: a for n, a in result.network.adapters.items() if n.startswith("lora_te")}
    assert te and any(float(a.lora_up.abs().sum()) > 0 for a in te.values())
    caplog.set_level(logging.WARNING)
    _, clip = comfy.sd.load_lora_for_models(family.model, family.clip, result.network.state_dict_kohya(), 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(clip.patcher.patches) == len(te)
