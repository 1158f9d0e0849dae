"""What the model receives while training, on the SD1.5 fixture: captions of any length, checkpointing that
engages, per-step adapter draws, previews equal to KSampler + VAEDecode, a bounded caption cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

LONG_CAPTION = ", ".join(f"tag{i} word{i}" for i in range(30))  # a WD14-length caption: several 77-token chunks


@pytest.fixture
def dataset_dir(tmp_path):
    """Four 64 px images: two with a short caption, two with a caption over 77 tokens."""
    from PIL import Image

    folder = tmp_path / "data" / "1_sks"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle" if i % 2 else LONG_CAPTION)
    return folder.parent


def _trainer(pack, loaded_checkpoint, folder, network=None, **settings):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(folder, resolution=64, min_side=64, max_side=64, bucket_step=64)
    config = {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "seed": 0, **settings}
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(**{"rank": 4, "alpha": 4, "preset": "attention", **(network or {})}),
                                 model)
        return Trainer(model, clip, vae, dataset, net, TrainConfig(**config))


def _record_contexts(model):
    """Hook the UNet: every context it is called with."""
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["context"].shape), with_kwargs=True)
    return seen, handle


def test_long_and_short_captions_share_a_batch(pack, loaded_checkpoint, dataset_dir):
    model = loaded_checkpoint[0]
    trainer = _trainer(pack, loaded_checkpoint, dataset_dir, steps=4)
    tokens = trainer.text.encode(LONG_CAPTION)[0][0].shape[1]
    assert 77 < tokens <= 4 * 77 and tokens % 77 == 0
    seen, handle = _record_contexts(model)
    try:
        with torch.inference_mode(False):
            result = trainer.run()
    finally:
        handle.remove()
    assert result.steps == 4 and all(np.isfinite(result.losses))
    # The short caption is repeated up to the long one's length, as the host's CONDCrossAttn does at sampling.
    assert torch.Size([2, tokens, 768]) in seen


def test_captions_the_host_would_not_batch_run_apart(pack, loaded_checkpoint):
    """Over 4x the length the host's CONDCrossAttn refuses to pad: such samples run as separate groups."""
    from lora_foundry.training.engine.conditioning import apply_model, encode_caption, model_inputs

    model, clip, _ = loaded_checkpoint
    very_long = ", ".join(f"tag{i} word{i}" for i in range(60))
    conds = [encode_caption(clip, very_long), encode_caption(clip, "a cat")]
    assert conds[0][0][0].shape[1] > 4 * 77
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([1.0, 2.0])
    groups = model_inputs(model.model, conds, x, [None, None])
    assert [g for g, _ in groups] == [[0], [1]]
    with torch.no_grad():
        together = apply_model(model.model, x, sigma, groups)
        apart = [model.model.apply_model(x[i:i + 1], sigma[i:i + 1], c_crossattn=conds[i][0][0]) for i in (0, 1)]
    torch.testing.assert_close(together, torch.cat(apart))


def test_gradient_checkpointing_engages_and_stores_less(pack, loaded_checkpoint, dataset_dir, checkpoint_calls):
    calls = checkpoint_calls

    def stored_bytes(checkpointing: bool) -> tuple[int, dict]:
        saved = []

        def pack_hook(t):
            saved.append(t.numel() * t.element_size())
            return t

        trainer = _trainer(pack, loaded_checkpoint, dataset_dir, steps=1, gradient_checkpointing=checkpointing,
                           network={"preset": "locon"})
        with torch.inference_mode(False), torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            result = trainer.run()
        return sum(saved), result.network.state_dict()

    plain, plain_weights = stored_bytes(False)
    assert not calls
    ckpt, ckpt_weights = stored_bytes(True)
    # One checkpoint call per ResBlock / SpatialTransformer / conv the UNet runs, forward and recompute included.
    assert len(calls) >= 6, len(calls)
    assert ckpt < 0.5 * plain, (ckpt, plain)
    for key in plain_weights:
        torch.testing.assert_close(ckpt_weights[key], plain_weights[key], rtol=1e-4, atol=1e-6)


def test_dylora_and_dropouts_draw_once_per_step_under_checkpointing(pack, loaded_checkpoint, dataset_dir,
                                                                   checkpoint_calls):
    """The recomputed forward sees the adapter the first one saw: the same weights as without checkpointing."""
    network = {"algorithm": "dylora", "rank_dropout": 0.3, "module_dropout": 0.2}
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # module / rank dropout draw from torch's generator
        trainer = _trainer(pack, loaded_checkpoint, dataset_dir, steps=3, gradient_checkpointing=checkpointing,
                           network=network)
        with torch.inference_mode(False):
            results.append(trainer.run())
        assert bool(checkpoint_calls) == checkpointing  # the second run's blocks were recomputed
    plain, ckpt = (r.network.state_dict() for r in results)
    assert all(np.isfinite(results[1].losses))
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-4, atol=1e-6)


def test_shuffled_captions_are_not_cached(pack, loaded_checkpoint, dataset_dir):
    from lora_foundry.training.data.captions import CaptionOptions

    trainer = _trainer(pack, loaded_checkpoint, dataset_dir, steps=3,
                       captions=CaptionOptions(shuffle_tags=True, keep_tokens=0))
    with torch.inference_mode(False):
        trainer.run()
    assert set(trainer.text.cache) == {""}  # the empty prompt the model check encodes, and no training caption
    fixed = _trainer(pack, loaded_checkpoint, dataset_dir, steps=1)
    with torch.inference_mode(False):
        fixed.run()
    assert set(fixed.text.cache) == {LONG_CAPTION, "a red circle", ""}


def test_preview_equals_ksampler_and_vae_decode(pack, loaded_checkpoint, dataset_dir, comfy_nodes, one_thread):
    """The preview at the last step is the final adapter sampled as a user would sample it in ComfyUI."""
    from lora_foundry.lora_core.apply import apply_lora

    model, clip, vae = loaded_checkpoint
    events = []
    trainer = _trainer(pack, loaded_checkpoint, dataset_dir, steps=2, sample_every=2, sample_steps=3,
                       sample_cfg=2.0, sample_prompts=["a red circle"], seed=5, learning_rate=5e-2)
    trainer.on_step = events.append
    with torch.inference_mode(False):
        result = trainer.run()
    preview = np.asarray(events[-1]["preview"], dtype=np.float32)

    with torch.inference_mode():  # as ComfyUI runs nodes
        patched, patched_clip, _ = apply_lora(model, clip, result.network.state_dict_kohya(), 1.0, 1.0)
        positive = comfy_nodes.CLIPTextEncode().encode(patched_clip, "a red circle")[0]
        negative = comfy_nodes.CLIPTextEncode().encode(patched_clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        images = []
        for unet in (patched, model):
            samples = comfy_nodes.KSampler().sample(unet, 5, 3, 2.0, "euler", "normal", positive, negative, latent)[0]
            images.append(comfy_nodes.VAEDecode().decode(vae, samples)[0][0].numpy() * 255)
    image, base_image = images
    assert preview.shape == image.shape == (64, 64, 3)
    assert np.abs(preview - image).max() <= 2.0, np.abs(preview - image).max()
    assert np.abs(preview - base_image).mean() > 10 * np.abs(preview - image).mean() + 0.5  # the adapter is in it
