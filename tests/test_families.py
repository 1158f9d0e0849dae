"""Every model family the host runs trains through the same loop, with the inputs ComfyUI gives it at inference.

Each family is a tiny model built with the host's own classes (harness/families.py): its diffusion
model (detected by the host where detection allows a small one), its own text encoder classes at a
small width with the real tokenizers, and a VAE of its latent space.
"""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest
import torch
from harness.families import FAMILIES, build_family
from harness.recorder import Recorder

CAPTIONS = ["a red circle on blue", "a green square", "a yellow plus on teal", "a blue triangle", "a black ring",
            "a white star on red"]
# (modelspec.architecture, ss_base_model_version) each family's files carry.
ARCHITECTURES = {
    "sd15": ("stable-diffusion-v1", "sd_v1"), "sd2v": ("stable-diffusion-v2-768-v", "sd_v2"),
    "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"), "sd3": ("stable-diffusion-3-medium", "sd3"),
    "flux": ("flux-1-dev", "flux1"), "flux2": ("Flux.2-dev", "flux2"), "chroma": ("chroma", "chroma"),
    "chroma_radiance": ("chroma", "chroma"), "qwen_image": ("qwen-image", "qwen_image"),
    "zimage": ("z-image", "z_image"), "lumina2": ("lumina-2", "lumina2"),
    "pixart_sigma": ("pixart-sigma", "pixart_sigma"), "auraflow": ("auraflow", "auraflow"),
    "hidream": ("hidream-i1", "hidream"),
    "omnigen2": ("omnigen2", "omnigen2"), "cosmos_predict2": ("cosmos-predict2", "cosmos_predict2"),
    "hunyuan_image21": ("hunyuan-image-2.1", "hunyuan_image"), "ltxv": ("ltx-video", "ltxv"),
    "hunyuan_video15": ("hunyuan-video-1.5", "hunyuan_video_1_5"),
    "wan21": ("wan2.1-t2v", "wan21"), "wan22_5b": ("wan2.2-t2v", "wan22"),
}
CLIP_FAMILIES = {"sd15", "sd2v", "sdxl", "sd3", "flux", "hidream"}  # families whose text encoders include a CLIP
# Families the memory plan cannot simulate (it trains them without an estimate, and says so in the log): HiDream's
# experts each take the tokens the router picked for them (boolean-mask indexing), which a step on storage-less tensors
# has no values to pick by.
NOT_SIMULATED = {"hidream"}


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


def _dataset(folder, side: int = 64):
    from lora_foundry.training.data.dataset import load_dataset

    return load_dataset(folder, resolution=side, min_side=side, max_side=side, bucket_step=64, validation_split=0.34,
                        seed=1)


def _trainer(fam, folder, network=None, **settings):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    config = {"steps": 12, "batch_size": 2, "learning_rate": 5e-3, "seed": 0, "validation_every": 12, **settings}
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(**{"rank": 4, "alpha": 4, "preset": "all", "seed": 0,
                                                  **(network or {})}), fam.model, fam.clip)
        return Trainer(fam.model, fam.clip, fam.vae, _dataset(folder, fam.resolution), net, TrainConfig(**config),
                       name=fam.name)


CONCAT_CHANNELS = {"hunyuan_video15": 33}  # the zero image and mask the host puts beside the latent
NOT_FLOW = {"sd15": "eps", "sd2v": "v", "sdxl": "eps", "pixart_sigma": "eps"}  # what each other family predicts


def test_family_is_what_the_host_runs(family):
    from lora_foundry.training.engine.objective import prediction

    assert prediction(family.model.get_model_object("model_sampling")) == NOT_FLOW.get(family.name, "flow")
    assert family.model.get_model_object("latent_format").latent_channels == family.latent_channels


def test_family_trains_and_its_file_loads_in_comfyui(family, dataset_dir, tmp_path, caplog):
    """Held-out loss falls; the saved file loads in LoraLoader with no unloaded key and gives the trained model."""
    import comfy.sd
    from lora_foundry.lora_core.files import read_safetensors, write_safetensors
    from lora_foundry.training.engine.conditioning import apply_model, image_geometry, model_inputs
    from lora_foundry.training.engine.evaluation import held_out_loss

    trainer = _trainer(family, dataset_dir)
    assert trainer.dataset.validation
    with torch.inference_mode(False):
        trainer.data.encode_images(trainer.dataset.validation, validation=True)
        base = held_out_loss(trainer.step, trainer.network, family.model, family.model.load_device)
        result = trainer.run()
    latent = trainer.data.latents.get(0)
    assert latent.shape[0] == family.latent_channels and latent.dim() == (4 if family.video else 3)
    assert all(np.isfinite(result.losses))
    assert result.validation[-1][1] < base, (base, result.validation)
    simulated = trainer.context.plan.activations > 0 and trainer.context.plan.flops > 0
    assert simulated == (family.name not in NOT_SIMULATED)  # the planner simulated this family

    path = write_safetensors(result.network.state_dict_kohya(), tmp_path / f"{family.name}.safetensors",
                             trainer.files.metadata(result.steps))
    tensors, meta = read_safetensors(path)
    arch, version = ARCHITECTURES[family.name]
    assert meta["modelspec.architecture"] == f"{arch}/lora" and meta["ss_base_model_version"] == version
    assert all(k.startswith("lora_unet_") for k in tensors), sorted(tensors)[:3]
    caplog.set_level(logging.WARNING)
    loaded, _ = comfy.sd.load_lora_for_models(family.model, family.clip, tensors, 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == len(result.network.adapters)

    # The model ComfyUI patches from the file is the model the trainer ended with.
    x0 = trainer.data.latents.get(0)[None]
    noisy = x0 + torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.7 if trainer.step.kind == "flow" else 3.0])
    inputs = model_inputs(family.model.model, trainer.text.conditioning([CAPTIONS[0]], "cpu"), noisy,
                          [image_geometry(trainer.dataset.items[0])], trainer.step.guidance)
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
        return nodes_sdxl.CLIPTextEncodeSDXL.execute(fam.clip, geometry.width, geometry.height, geometry.crop_left,
                                                     geometry.crop_top, geometry.target_width, geometry.target_height,
                                                     prompt, prompt).result[0]
    conditioning = nodes.CLIPTextEncode().encode(fam.clip, prompt)[0]
    if fam.name in ("flux", "flux2"):  # kohya / ai-toolkit train Flux-dev at guidance 1.0: FluxGuidance 1.0
        conditioning = nodes_flux.FluxGuidance.execute(conditioning, 1.0).result[0]
    return conditioning


def test_family_gets_the_inputs_comfyui_gives_it(family, dataset_dir, comfy_nodes):
    """The diffusion model receives from training exactly the conditioning inputs KSampler gives it."""
    import comfy.sample
    from lora_foundry.training.engine.conditioning import image_geometry

    trainer = _trainer(family, dataset_dir, steps=1)
    index = next(i for i, item in enumerate(trainer.dataset.items) if tuple(item.size) != tuple(item.bucket)) \
        if family.name == "sdxl" else 0
    item = trainer.dataset.items[index]
    trainer.data.encode_images(trainer.dataset.items)
    geometry = image_geometry(item)
    if family.name == "sdxl":  # a 64x96 image, resized to cover the 64x64 bucket and cropped at its centre
        assert (geometry.width, geometry.height, geometry.crop_top, geometry.crop_left) == (64, 96, 16, 0)
    caption = trainer.text.fixed_caption(item)
    x0 = trainer.data.latents.get(index)[None]
    with torch.inference_mode(False), torch.no_grad(), Recorder(family.model) as training:  # the training step's path
        trainer.step.batch_loss(family.model, [index], random.Random(0), torch.Generator().manual_seed(0), "cpu", None)
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
    if family.name in ("flux", "flux2"):
        assert float(got["guidance"].flatten()[0]) == 1.0


def test_auto_timestep_sampling_is_the_familys(family, dataset_dir):
    """The default (auto) draws logit-normal levels for the flow families and uniform ones for eps / v."""
    trainer = _trainer(family, dataset_dir, steps=1)
    assert trainer.config.timestep_sampling == "auto"
    assert trainer.step.timestep_sampling == ("uniform" if family.name in NOT_FLOW else "logit_normal")


def test_family_preview_has_its_latent_shape(family, dataset_dir):
    from lora_foundry.training.engine.blocks import BlockOptions

    trainer = _trainer(family, dataset_dir, steps=1, sample_steps=2, sample_prompts=["a red circle"])
    with torch.inference_mode(False):
        trainer.data.encode_images(trainer.dataset.items)
        patched, _ = trainer.network.attach(family.model)
        with Recorder(family.model) as calls:
            preview, = trainer.run_context(patched, None, BlockOptions(), None).previews.sample(patched)
    shape = trainer.data.latents.get(0).shape
    channels = shape[0] + CONCAT_CHANNELS.get(family.name, 0)
    assert calls.calls and all(tuple(c["x"].shape)[1:] == (channels, *shape[1:]) for c in calls.calls)
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
    import comfy.model_management as mm
    from torch._subclasses.fake_tensor import is_fake

    loads = []
    original = mm.load_models_gpu

    def recording(models, *args, **kwargs):
        loads.append(any(is_fake(p) for m in models for p in m.model.parameters()))
        return original(models, *args, **kwargs)

    mm.load_models_gpu = recording
    try:
        with torch.inference_mode(False):
            result = trainer.run()
    finally:
        mm.load_models_gpu = original
    assert loads and not any(loads)  # the simulated step never asked the host to load storage-less weights
    te = {n: a for n, a in result.network.adapters.items() if n.startswith("lora_te")}
    assert te and any(float(a.lora_up.abs().sum()) > 0 for a in te.values())
    # The plan's simulated step ran the text encoders' adapters too.
    assert (trainer.context.plan.activations > 0) == (family.name not in NOT_SIMULATED)
    caplog.set_level(logging.WARNING)
    _, clip = comfy.sd.load_lora_for_models(family.model, family.clip, result.network.state_dict_kohya(), 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(clip.patcher.patches) == len(te)


def _flux_layers(model):
    return model.double_blocks[0].img_attn.qkv, model.double_blocks[0].txt_mlp[0]


def _ltxv_layers(model):
    return model.transformer_blocks[0].attn1.to_q, model.transformer_blocks[1].ff.net[0].proj


# Latent shapes and two layers each: one early in a block, one after the block's in-place sums.
IN_PLACE = {"flux": ((1, 16, 8, 8), _flux_layers), "flux2": ((1, 128, 4, 4), _flux_layers),
            "chroma": ((1, 16, 8, 8), _flux_layers),
            "ltxv": ((1, 128, 1, 2, 2), _ltxv_layers)}


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_blocks_that_add_in_place_get_true_gradients(pack, name):
    """Flux's blocks add residuals in place (`x += ...`), LTX-Video's with `x.addcmul_(...)`, which autograd refuses;
    summed out of place and with what autograd saves of the residual stream saved apart, the gradient equals the
    directional derivative forward-mode AD computes independently (it allows in-place sums), with and without
    gradient checkpointing."""
    import torch.autograd.forward_ad as fwAD
    from lora_foundry.training.engine.blocks import BlockOptions, training_blocks
    from lora_foundry.training.engine.conditioning import apply_model, encode_caption, model_inputs

    fam = build_family(name)
    model = fam.model.model
    gen = torch.Generator().manual_seed(0)
    shape, layers = IN_PLACE[name]
    noisy, sigma = torch.randn(shape, generator=gen), torch.tensor([0.7])
    inputs = model_inputs(model, [encode_caption(fam.clip, CAPTIONS[0])], noisy, [None], 1.0)
    projection = torch.randn(noisy.shape, generator=gen)
    for layer in layers(model.diffusion_model):
        weight = layer.weight
        direction = torch.randn(weight.shape, generator=gen)
        with torch.inference_mode(False):
            weight.requires_grad_(True)
            options = BlockOptions()
            with training_blocks(model.diffusion_model, options):
                with pytest.raises(RuntimeError, match="inplace"):
                    (apply_model(model, noisy, sigma, inputs) * projection).sum().backward()
                options.out_of_place = True
                (grad,) = torch.autograd.grad((apply_model(model, noisy, sigma, inputs) * projection).sum(), weight)
                # Checkpointed: the block runs again in the backward pass (its hooks hand what they save to the
                # checkpoint's), and the copies keep the recomputed values the in-place sums would change.
                options.checkpointing, calls, forward = True, [], layer.forward
                layer.forward = lambda *a, _calls=calls, _forward=forward, **k: _calls.append(1) or _forward(*a, **k)
                try:
                    (again,) = torch.autograd.grad((apply_model(model, noisy, sigma, inputs) * projection).sum(),
                                                   weight)
                finally:
                    del layer.forward
                assert len(calls) == 2 and torch.equal(again, grad)
            weight.requires_grad_(False)
            with fwAD.dual_level():
                del layer._parameters["weight"]
                layer.weight = fwAD.make_dual(weight.detach(), direction)
                tangent = fwAD.unpack_dual(apply_model(model, noisy, sigma, inputs)).tangent
                del layer.weight
                layer._parameters["weight"] = weight
        want, got = float((tangent * projection).sum().detach()), float((grad * direction).sum())
        assert abs(want) > 1e-7
        assert abs(got - want) <= 1e-4 * abs(want), (got, want)


def test_a_block_that_changes_another_saved_tensor_in_place_still_fails(pack):
    """Saving the residual stream apart takes autograd's own version check away from a block's saved tensors: a
    tensor other than the stream, changed in place after it was saved, still fails loudly instead of giving a
    wrong gradient."""
    from lora_foundry.training.engine.blocks import INPLACE_ERROR, BlockOptions, wrapped_blocks

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            h = self.linear(x)
            y = h.sin()  # saves h
            h.mul_(2)
            return x + y + h

    block = Block()
    with torch.inference_mode(False), wrapped_blocks([block], BlockOptions(out_of_place=True)):
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            block(torch.randn(2, 4)).sum().backward()


def test_a_prediction_we_do_not_train_is_named(pack, dataset_dir):
    """A model whose sampling predicts something else (X0, image-to-image) fails with a message, not a shape error."""
    import comfy.model_sampling as ms

    fam = build_family("sd15")

    class X0Sampling(ms.ModelSamplingDiscrete, ms.X0):
        pass

    patched = fam.model.clone()
    patched.add_object_patch("model_sampling", X0Sampling(fam.model.model.model_config))
    with pytest.raises(ValueError, match="predict X0"):
        _trainer(dataclasses.replace(fam, model=patched), dataset_dir)


def test_cosmos_learns_the_velocity_its_sampler_reads(pack, dataset_dir):
    """Cosmos-Predict2 samples in sigmas that run to 80 (x = x0 + sigma noise, COSMOS_RFLOW), read as rectified flow
    at t = sigma / (sigma + 1): the loss is the squared error of the velocity the model outputs (noise - x0), not of
    the denoised latent scaled by 1 / sigma."""
    from lora_foundry.training.engine.conditioning import apply_model, image_geometry

    fam = build_family("cosmos_predict2")
    trainer = _trainer(fam, dataset_dir, steps=1)
    step, model_sampling = trainer.step, fam.model.get_model_object("model_sampling")
    with torch.inference_mode(False):
        trainer.data.encode_images(trainer.dataset.items)
        x0 = trainer.data.latents.get(0)[None]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        sigma = step.sigmas(fam.model, [0.7], x0)
        assert 1 < float(sigma) < float(model_sampling.sigma_max)  # the host's sigma, not the flow time
        conditioning = trainer.text.conditioning([CAPTIONS[0]], "cpu")
        with torch.no_grad():
            x, inputs = step.model_call(fam.model, x0, noise, sigma, conditioning,
                                        [image_geometry(trainer.dataset.items[0])])
            loss = float(step.prediction_loss(fam.model, x, x0, sigma, inputs, None, None))
            time = float(sigma / (sigma + 1))
            denoised = apply_model(fam.model.model, x, sigma, inputs)  # the host's x(1 - t) - t * output
    velocity = (x * (1 - time) - denoised) / time  # what the model output
    want = float(((velocity - (noise - x0)) ** 2).mean())
    assert abs(loss - want) <= 1e-4 * want, (loss, want)


DIT_LISTS = {"sd3": ["J"], "flux": ["D", "S"], "flux2": ["D", "S"], "chroma": ["D", "S"],
             "chroma_radiance": ["D", "S", "N"],
             "qwen_image": ["T"], "zimage": ["N", "C", "L"], "lumina2": ["N", "C", "L"],
             "pixart_sigma": ["B"], "auraflow": ["D", "S"], "hidream": ["D", "S", "C"],
             "omnigen2": ["N", "R", "C", "L"], "cosmos_predict2": ["B"], "hunyuan_image21": ["D", "S"], "hunyuan_video15": ["D", "S"], "ltxv": ["T"],
             "wan21": ["B"], "wan22_5b": ["B"]}


@pytest.mark.parametrize("name", sorted(DIT_LISTS))
def test_dit_block_weights_scale_each_block(pack, name):
    """Block weights on a DiT: one value per block (long) or per block list (short); layers outside blocks keep 1."""
    from conftest import comfy_weights
    from lora_foundry.lora_core import block_weights as bw
    from lora_foundry.lora_core.apply import apply_lora
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig

    fam = build_family(name)
    layout = bw.layout_of(fam.model)
    assert layout.short_ids == ["BASE", *DIT_LISTS[name]]
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=2, alpha=2, preset="all", seed=1), fam.model)
        gen = torch.Generator().manual_seed(1)
        for adapter in network.adapters.values():
            adapter.lora_up.data = torch.randn(adapter.lora_up.shape, generator=gen) * 0.1
    tensors = network.state_dict_kohya()
    keys = sorted(network.weight_keys.values())
    long = [1.0] + [0.25 * (i + 1) for i in range(len(layout.all_ids) - 1)]
    weights = bw.parse_block_weights(long, layout)
    plain, _, _ = apply_lora(fam.model, None, tensors, 1.0, 0.0)
    scaled, _, report = apply_lora(fam.model, None, tensors, 1.0, 0.0, block_strength=weights.for_key)
    base = {k: v.float() for k, v in fam.model.model.state_dict().items()}
    full, got = comfy_weights(plain, keys), comfy_weights(scaled, keys)
    in_blocks = 0
    for key in keys:
        block = bw.block_of(key, layout)
        w = 1.0 if block is None else weights.weights[block]
        in_blocks += block is not None
        torch.testing.assert_close(got[key] - base[key], w * (full[key] - base[key]), rtol=1e-5, atol=1e-6, msg=key)
    assert in_blocks >= len(layout.all_ids) - 1  # every block holds adapted layers
    assert any(bw.block_of(k, layout) is None for k in keys)  # embedders / final layer: outside every block

    short = bw.parse_block_weights(",".join(["1"] + ["0"] * len(DIT_LISTS[name])), layout)
    zeroed, _, _ = apply_lora(fam.model, None, tensors, 1.0, 0.0, block_strength=short.for_key)
    assert set(zeroed.patches) == {k for k in keys if bw.block_of(k, layout) is None}
    unet = bw.parse_block_weights("UNET", layout).weights
    assert unet["BASE"] == 0 and all(v == 1 for k, v in unet.items() if k != "BASE")
    with pytest.raises(ValueError, match=f"names UNet blocks; a {type(fam.model.model.model_config).__name__}"):
        bw.parse_block_weights("INALL", layout)
    with pytest.raises(ValueError, match="BASE and one per block list"):
        bw.parse_block_weights("1,1,1,1,1,1,1,1,1", layout)


@pytest.mark.server
@pytest.mark.slow
def test_sd3_trains_through_the_server_from_files(pack, tmp_path_factory, dataset_dir, tiny_parts, caplog):
    """A flow-matching family from files through a real server: UNETLoader (detected as SD3), CLIPLoader, VAELoader,
    Load Dataset, Train LoRA, Save LoRA. The LoRA folder then lists only LoRAs ComfyUI loads without a warning.
    (The MMDiT reads a plain CLIP-L: see harness.families.sd3_files.)"""
    import comfy.sd
    import comfy.utils
    from harness.families import sd3_files
    from harness.server import ComfyServer
    from lora_foundry.lora_core.files import read_safetensors

    files = sd3_files()
    base = tmp_path_factory.mktemp("sd3server")
    models = {"diffusion_models": [files["unet"]], "text_encoders": [tiny_parts["clip"]], "vae": [files["vae"]]}
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_parts["clip"].name, "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"].name}},
        "4": {"class_type": "LoraFoundryLoadDataset", "inputs": {
            "folder": str(dataset_dir), "resolution": 64, "min_side": 64, "max_side": 64, "bucket_step": 64,
            "no_upscale": False, "caption_extension": ".txt", "validation_split": 0.34, "seed": 1}},
        "5": {"class_type": "LoraFoundryTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "dataset": ["4", 0], "trigger_word": "",
            "output_name": "sd3_toy", "algorithm": "lora", "rank": 4, "alpha": 4.0, "targets": "all", "dora": False,
            "steps": 12, "learning_rate": 5e-3, "batch_size": 2, "optimizer": "AdamW", "scheduler": "constant",
            "warmup_steps": 0, "seed": 0, "precision": "fp32", "save_every": 6, "validation_every": 6}},
        "6": {"class_type": "LoraFoundrySaveLoRA", "inputs": {
            "lora": ["5", 0], "filename_prefix": "sd3/toy", "precision": "fp32", "folder": "loras",
            "overwrite": False}},
    }
    with ComfyServer(base, models=models) as server:
        outputs = server.run(prompt, timeout=600)
        listed = server.object_info()["LoraLoader"]["input"]["required"]["lora_name"][0]
    train_ui, saved = outputs["5"], outputs["6"]["text"][0]
    assert len(train_ui["loss"]) == 12 and all(np.isfinite(train_ui["loss"]))
    assert train_ui["validation"][-1][1] < train_ui["validation"][0][1]
    tensors, meta = read_safetensors(saved)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora" and meta["ss_base_model_version"] == "sd3"

    loras = base / "models" / "loras"
    assert sorted(listed) == ["sd3/toy_00001.safetensors", "sd3_toy/sd3_toy-step000006.safetensors",
                              "sd3_toy/sd3_toy-step000012.safetensors"]
    assert (base / "output" / "lora_foundry_runs" / "sd3_toy" / "sd3_toy-state.safetensors").is_file()
    model = comfy.sd.load_diffusion_model(str(files["unet"]))
    clip = comfy.sd.load_clip([str(tiny_parts["clip"])])
    caplog.set_level(logging.WARNING)
    for name in listed:
        comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(loras / name)), 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(tensors) == 3 * len({k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_up.weight")})


def test_a_model_conditioned_on_images_is_named(pack, dataset_dir):
    """An inpainting / image-to-video model would silently train on blank images: it fails with a message."""
    fam = build_family("sd15")
    fam.model.model.set_inpaint()
    with pytest.raises(ValueError, match="conditioned on an image as well as text"):
        _trainer(fam, dataset_dir, steps=1)  # before any image is encoded


def test_a_diffusers_flux_lora_applies_like_the_same_kohya_lora(pack, caplog):
    """A Flux LoRA in the diffusers / PEFT layout other trainers write (`transformer.transformer_blocks.0.attn.to_q`,
    q, k and v apart where ComfyUI fuses them) applies through Apply LoRA exactly as the same change in our layout, and
    reads (for merge and resize) as that change."""
    import comfy.utils
    from conftest import comfy_weights
    from lora_foundry.lora_core.apply import apply_lora
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig

    fam = build_family("flux")
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=2, alpha=2, preset="kohya", seed=2), fam.model)
        gen = torch.Generator().manual_seed(2)
        for adapter in network.adapters.values():
            adapter.lora_up.data = torch.randn(adapter.lora_up.shape, generator=gen) * 0.1
    ours = {network.weight_keys[name]: adapter for name, adapter in network.adapters.items()}
    diffusers = {}
    for name, target in comfy.utils.flux_to_diffusers(fam.model.model.model_config.unet_config,
                                                      output_prefix="diffusion_model.").items():
        if isinstance(target, str):
            target = (target, None)
        if not name.endswith(".weight") or target[0] not in ours or len(target) > 2:  # 3: a transformed adaLN weight
            continue
        key, rows = target
        up, down = ours[key].lora_up.detach(), ours[key].lora_down.detach()
        if rows is not None:
            up = up[rows[1]:rows[1] + rows[2]]
        module = "transformer." + name[:-len(".weight")]
        diffusers[f"{module}.lora_A.weight"], diffusers[f"{module}.lora_B.weight"] = down.clone(), up.clone()
    covered = {network.weight_keys[name] for name in network.adapters} & {
        (t if isinstance(t, str) else t[0]) for n, t in comfy.utils.flux_to_diffusers(
            fam.model.model.model_config.unet_config, output_prefix="diffusion_model.").items()
        if n.endswith(".weight") and (isinstance(t, str) or len(t) == 2)}
    assert any(".qkv." in k for k in covered) and any("linear1" in k for k in covered)
    theirs, _, report = apply_lora(fam.model, None, diffusers, 1.0, 0.0)
    assert report.ok and len(report.applied) == len(diffusers) // 2, report.summary()
    mine, _, _ = apply_lora(fam.model, None, network.state_dict_kohya(), 1.0, 0.0)
    got, want = comfy_weights(theirs, sorted(covered)), comfy_weights(mine, sorted(covered))
    assert len(covered) >= 12
    read = LoraNetwork.from_state_dict(diffusers, model=fam.model)  # what merge / resize read: the parts joined
    assert read.weight_keys == {n: k for n, k in network.weight_keys.items() if k in covered}
    with torch.no_grad():
        for name, key in read.weight_keys.items():
            torch.testing.assert_close(read.adapters[name].delta(), ours[key].delta(), rtol=1e-5, atol=1e-6)
    for key in covered:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_flux_resumes_exactly_across_the_switch_to_out_of_place_sums(pack, dataset_dir, tmp_path):
    """Every run of a Flux model meets the in-place error at its first backward and reruns that micro-batch: with
    DyLoRA, dropouts and accumulation, 6 steps straight still equal 3 steps, a cancel, and 3 resumed steps."""
    import comfy.model_management as mm
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    fam = build_family("flux")

    def run(folder, stop=None, resume=None):
        torch.manual_seed(0)
        config = TrainConfig(steps=6, batch_size=2, grad_accum=2, learning_rate=1e-3, seed=3, save_every=stop or 0)
        with torch.inference_mode(False):
            network = LoraNetwork.create(NetworkConfig(algorithm="dylora", rank=4, alpha=4, preset="kohya",
                                                       rank_dropout=0.2, module_dropout=0.1, seed=3), fam.model)

            def cancel(info):
                if info["step"] == stop:
                    mm.interrupt_current_processing(True)

            trainer = Trainer(fam.model, fam.clip, fam.vae, _dataset(dataset_dir), network, config, output_dir=folder,
                              resume=resume, on_step=cancel)
            if stop is None:
                return trainer, trainer.run()
            with pytest.raises(mm.InterruptProcessingException):
                trainer.run()
            mm.interrupt_current_processing(False)
            return trainer, None

    _, straight = run(tmp_path / "straight")
    first, _ = run(tmp_path / "split", stop=3)
    _, resumed = run(tmp_path / "resumed", resume=first.files.state_path)
    assert resumed.losses[:3] == straight.losses[:3] and len(resumed.losses) == 6
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flux2_prompts_tokenize_through_the_hosts_mistral_tokenizer(comfy_root):
    """The host builds Flux.2's tokenizer from the Tekken vocabulary its text encoder file carries (through
    transformers' MistralConverter, which in transformers 5 wants a vocab_file the host does not give: hence the
    4.57 pin) and wraps the prompt in Flux.2's system prompt: the text side of the flux2 family."""
    import comfy.text_encoders.flux
    from harness.families import TEKKEN_SPECIALS, tekken_stand_in

    tokenizer = comfy.text_encoders.flux.Flux2Tokenizer(tokenizer_data={"tekken_model": tekken_stand_in((b"to", b"toy"))})
    ids = [token for token, _ in tokenizer.tokenize_with_weights("toy cat")["mistral3_24b"][0]]
    special = {name: i for i, name in enumerate(TEKKEN_SPECIALS)}
    first = len(TEKKEN_SPECIALS)  # the byte-level vocabulary's ids follow the special tokens
    assert ids[:2] == [special["<s>"], special["[SYSTEM_PROMPT]"]], ids
    assert special["[/SYSTEM_PROMPT]"] in ids and ids[-1] == special["[/INST]"], ids
    prompt = ids[ids.index(special["[INST]"]) + 1:-1]
    assert prompt == [first + 257] + [first + b for b in b" cat"], prompt  # "toy" by its two merges, " cat" by bytes
