"""Training: the objective of each model family, the loop in-process, and the example workflow end to end."""

from __future__ import annotations

import json
import logging
import math
import random
import re

import numpy as np
import pytest
import torch
from harness.comfy import REPO_ROOT


@pytest.fixture(scope="module")
def training(pack):
    from lora_foundry.training.engine import objective, trainer
    return objective, trainer


def _sampling(kind: str):
    import comfy.model_sampling as ms

    base = {"eps": (ms.ModelSamplingDiscrete, ms.EPS), "v": (ms.ModelSamplingDiscrete, ms.V_PREDICTION),
            "flow": (ms.ModelSamplingDiscreteFlow, ms.CONST)}[kind]

    class Sampling(*base):
        pass

    return Sampling()


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_each_family_trains_on_its_own_target(training, kind):
    objective, _ = training
    sampling = _sampling(kind)
    assert objective.prediction(sampling) == kind
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    sigma = objective.sigmas_for(sampling, [0.2, 0.5, 0.9])
    s = sigma.view(-1, 1, 1, 1)
    x = sampling.noise_scaling(s, noise, x0)
    output = torch.randn(3, 4, 8, 8, generator=gen)  # an arbitrary raw model prediction
    denoised = sampling.calculate_denoised(sigma, output, x)
    if kind == "eps":
        target = noise
    elif kind == "flow":
        target = noise - x0
    else:
        sd = sampling.sigma_data
        target = (x * sd**2 / (s**2 + sd**2) - x0) * torch.sqrt(s**2 + sd**2) / (s * sd)
    expected = ((output - target) ** 2).flatten(1).mean(1)
    got = objective.prediction_loss(kind, denoised, x0, sigma, "mse", sigma_data=getattr(sampling, "sigma_data", 1.0))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_min_snr_weights(training):
    objective, _ = training
    sigma = torch.tensor([0.1, 1.0, 10.0])
    w = objective.min_snr_weight("eps", sigma, gamma=5.0)
    torch.testing.assert_close(w, torch.tensor([5.0 / 100.0, 1.0, 1.0]))
    wv = objective.min_snr_weight("v", sigma, gamma=5.0)
    torch.testing.assert_close(wv, torch.tensor([5.0 / 101.0, 0.5, 0.01 / 1.01]))


def test_noise_levels_respect_range_and_sampling(training):
    objective, _ = training
    rng = random.Random(0)
    levels = objective.sample_noise_levels(500, rng, "logit_normal", 0.2, 0.6)
    assert all(0.2 < u <= 0.6 for u in levels)
    with pytest.raises(ValueError, match="timestep_sampling"):
        objective.sample_noise_levels(1, rng, "cosine")
    # auto: the family's distribution, decided by the model's prediction before any level is drawn
    assert objective.family_sampling("auto", "flow") == "logit_normal"
    assert objective.family_sampling("auto", "eps") == objective.family_sampling("auto", "v") == "uniform"
    assert objective.family_sampling("uniform", "flow") == "uniform"
    with pytest.raises(ValueError, match="timestep_sampling"):
        objective.sample_noise_levels(1, rng, "auto")


def _train(pack, loaded_checkpoint, concept_dataset, tmp_path, **overrides):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(concept_dataset, resolution=64, min_side=32, max_side=128, bucket_step=32,
                           validation_split=0.15, seed=0)
    net_cfg = NetworkConfig(rank=4, alpha=4, preset="attention", seed=0)
    settings = {"steps": 20, "batch_size": 2, "learning_rate": 2e-3, "seed": 0, "validation_every": 10}
    settings.update(overrides)
    with torch.inference_mode(False):
        network = LoraNetwork.create(net_cfg, model)
        trainer = Trainer(model, clip, vae, dataset, network, TrainConfig(**settings), output_dir=tmp_path)
        return trainer, trainer.run()


@pytest.mark.slow
def test_training_lowers_the_loss_and_freezes_the_base(pack, loaded_checkpoint, concept_dataset, tmp_path):
    model, _, _ = loaded_checkpoint
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    trainer, result = _train(pack, loaded_checkpoint, concept_dataset, tmp_path, steps=30)
    assert result.steps == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first, (first, last)
    assert result.validation[-1][1] < result.validation[0][1] * 1.05
    import comfy.model_management as mm
    from lora_foundry.training.engine.evaluation import held_out_loss

    mm.load_models_gpu([model], force_full_load=True)  # the base again, without the training patches
    with torch.inference_mode(False):
        base = held_out_loss(trainer.step, trainer.network, model, model.load_device)
    assert result.validation[-1][1] < 0.85 * base, (base, result.validation)
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed a base weight"
    assert any(a.lora_up.abs().sum() > 0 for a in result.network.adapters.values())


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_adapter(pack, loaded_checkpoint, concept_dataset, tmp_path):
    from lora_foundry.training.engine.trainer import TrainingError

    with pytest.raises(TrainingError, match="loss became (nan|inf)") as err:
        _train(pack, loaded_checkpoint, concept_dataset, tmp_path, steps=5, learning_rate=1e30, grad_clip=0)
    kept = list(tmp_path.glob("*last-good.safetensors"))
    assert kept and str(kept[0]) in str(err.value)
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(kept[0])).values())
    failed = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    with safe_open(str(kept[0]), "pt") as f:
        kept_steps = int(f.metadata()["ss_steps"])
    assert 0 <= kept_steps < failed
    # The kept adapter is the one those steps make (the same run stopped there), and it gave a finite loss.
    if kept_steps:
        (tmp_path / "again").mkdir()
        _, again = _train(pack, loaded_checkpoint, concept_dataset, tmp_path / "again", steps=kept_steps,
                          learning_rate=1e30, grad_clip=0)
        for key, value in again.network.state_dict_kohya().items():
            torch.testing.assert_close(load_file(str(kept[0]))[key], value)


def test_checkpoints_are_written_every_n_steps(pack, loaded_checkpoint, concept_dataset, tmp_path):
    from safetensors import safe_open

    _, result = _train(pack, loaded_checkpoint, concept_dataset, tmp_path, steps=4, save_every=2)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == ["lora-state.safetensors", "lora-step000002.safetensors", "lora-step000004.safetensors"]
    with safe_open(str(tmp_path / names[1]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "2" and meta["ss_network_module"] == "networks.lora"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.server
@pytest.mark.slow
def test_example_workflow_trains_through_the_server(server, tiny_checkpoint, concept_dataset, comfy_root, caplog):
    from main_job import run_example
    from PIL import Image
    from safetensors import safe_open

    result = run_example(server, tiny_checkpoint, concept_dataset, steps=30, timeout=900)
    lora = result["lora"]
    assert lora is not None and lora.is_file(), result["outputs"]
    assert lora.parent.parent == server.base_dir / "models" / "loras"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "16"
    assert "sks" in meta["ss_tag_frequency"]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1") for k in keys)  # the example's LoCon
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "16", "conv_alpha": "16.0"}
    for key in ("loss_graph", "before", "after"):
        assert result[key], key
        with Image.open(result[key][0]) as img:
            assert img.size[0] > 0
    train_ui = next(out for out in result["outputs"].values() if "loss" in out)
    losses = train_ui["loss"]
    assert len(losses) == 30
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10

    # ComfyUI's own LoraLoader reads the file with no unloaded key.
    import comfy.sd
    import comfy.utils

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    caplog.set_level(logging.WARNING)
    comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(lora)), 1.0, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]


def test_example_workflow_file_uses_only_core_nodes_and_ours():
    import json

    workflow = json.loads((REPO_ROOT / "example_workflows" / "train_lora_before_after.json").read_text())
    types = {n["type"] for n in workflow["nodes"]}
    ours = {t for t in types if t.startswith("LoraFoundry")}
    assert {"LoraFoundryLoadDataset", "LoraFoundryTrainLoRA", "LoraFoundrySaveLoRA"} <= ours


def test_resume_continues_exactly(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """2N steps straight equal N steps, a saved state, and N resumed steps (CPU, fp32)."""
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(concept_dataset, resolution=64, min_side=32, max_side=128, bucket_step=32)
    captions = CaptionOptions(trigger_word="sks", shuffle_tags=True, keep_tokens=1)

    def run(steps, folder, resume=None, total=8):
        cfg = TrainConfig(steps=total, batch_size=2, learning_rate=1e-3, scheduler="cosine", warmup_steps=2,
                          seed=3, flip=True, captions=captions, save_every=steps if steps < total else 0)
        with torch.inference_mode(False):
            network = LoraNetwork.create(NetworkConfig(algorithm="dylora", rank=4, alpha=4, preset="attention",
                                                       module_dropout=0.1, seed=3), model)
            import comfy.model_management as mm

            def cancel_after(info):  # what the UI's cancel button does: raise the host's interrupt flag
                if info["step"] == steps and steps < total:
                    mm.interrupt_current_processing(True)

            trainer = Trainer(model, clip, vae, dataset, network, cfg, output_dir=folder, resume=resume,
                              on_step=cancel_after)
            if steps < total and resume is None:
                with pytest.raises(mm.InterruptProcessingException):
                    trainer.run()
                mm.interrupt_current_processing(False)
                return trainer, None
            return trainer, trainer.run()

    _, straight = run(8, tmp_path / "straight")
    first, _ = run(4, tmp_path / "split")
    assert (tmp_path / "split" / "lora-interrupted.safetensors").is_file(), "cancel must leave the adapter on disk"
    _, resumed = run(8, tmp_path / "resumed", resume=first.files.state_path)
    assert resumed.steps == 8 and len(resumed.losses) == 8
    assert resumed.losses[:4] == straight.losses[:4]
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_new_run_never_reuses_a_folder_and_resume_needs_a_state(pack, tmp_path):
    from lora_foundry.training.run import run_folders

    loras, output = tmp_path / "loras", tmp_path / "output"
    folders = run_folders(str(loras), str(output), "style", resume=False)
    assert (folders.loras, folders.states, folders.resume) == (loras / "style", output / "lora_foundry_runs" / "style",
                                                               None)
    folders.loras.mkdir(parents=True)
    (folders.loras / "style-step000010.safetensors").write_bytes(b"x")
    assert run_folders(str(loras), str(output), "style", resume=False).loras == loras / "style_2"
    with pytest.raises(ValueError, match="no saved state"):
        run_folders(str(loras), str(output), "style", resume=True)
    folders.states.mkdir(parents=True)
    (folders.states / "style-state.safetensors").write_bytes(b"x")
    resumed = run_folders(str(loras), str(output), "style", resume=True)
    assert (resumed.loras, resumed.resume) == (folders.loras, folders.states / "style-state.safetensors")
    # A run whose LoRAs were moved away still owns its state: the next new run takes the next name.
    (folders.loras / "style-step000010.safetensors").unlink()
    assert run_folders(str(loras), str(output), "style", resume=False).name == "style_2"
    with pytest.raises(ValueError, match="not allowed"):
        run_folders(str(loras), str(output), "../escape", resume=False)


@pytest.mark.slow
def test_text_encoder_adapters_train_with_their_own_learning_rate(pack, loaded_checkpoint, concept_dataset, tmp_path):
    import comfy.model_management
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(concept_dataset, resolution=64, min_side=32, max_side=128, bucket_step=32)
    config = TrainConfig(steps=3, batch_size=2, learning_rate=1e-3, text_encoder_lr=5e-4, seed=0)
    # The base weights, not whatever LoRA an earlier test's clone of this CLIP left patched in (the host restores
    # those when it next loads another patcher of the model).
    comfy.model_management.unload_all_models()
    clip_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=4, alpha=4, preset="attention", text_encoder=True), model, clip)
        result = Trainer(model, clip, vae, dataset, network, config).run()
    te = {n: a for n, a in result.network.adapters.items() if n.startswith("lora_te_")}
    assert te and all(a.lora_up.abs().sum() > 0 for a in te.values()), "text-encoder adapters did not learn"
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(clip_before[k], after[k]) for k in clip_before), "training changed a CLIP weight"


def test_mixed_precision_and_gradient_checkpointing_train(pack, loaded_checkpoint, concept_dataset, tmp_path,
                                                          checkpoint_calls):
    for settings in ({"precision": "bf16"}, {"gradient_checkpointing": True}):
        trainer, result = _train(pack, loaded_checkpoint, concept_dataset, tmp_path, steps=3, validation_every=0,
                                 **settings)
        assert result.steps == 3 and all(math.isfinite(x) for x in result.losses), settings
        assert trainer.context.compute_dtype == (torch.bfloat16 if "precision" in settings else torch.float32)
        assert bool(checkpoint_calls) == ("gradient_checkpointing" in settings), settings  # it engaged, only here


def test_gradient_checkpointing_gives_the_same_gradients(pack, loaded_checkpoint, concept_dataset, tmp_path,
                                                         checkpoint_calls):
    _, plain = _train(pack, loaded_checkpoint, concept_dataset, tmp_path / "a", steps=2, validation_every=0)
    assert not checkpoint_calls
    _, ckpt = _train(pack, loaded_checkpoint, concept_dataset, tmp_path / "b", steps=2, validation_every=0,
                     gradient_checkpointing=True)
    assert checkpoint_calls  # the second run did checkpoint its blocks
    a, b = plain.network.state_dict(), ckpt.network.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_preview_samples_come_with_progress(pack, loaded_checkpoint, concept_dataset, tmp_path, one_thread):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(concept_dataset, resolution=64, min_side=64, max_side=64, bucket_step=64)
    config = TrainConfig(steps=2, sample_every=2, sample_prompts=["sks circle", "a red square --w 32 --h 48"],
                         sample_steps=2)
    events = []
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=2, alpha=2, preset="attention"), model)
        Trainer(model, clip, vae, dataset, network, config, on_step=events.append).run()
    assert [e["step"] for e in events] == [1, 2]
    # step 1 shows the step-0 baseline (the base model); the grid is one row of both sizes, top-aligned on black
    baseline, last = events[0]["preview"], events[1]["preview"]
    assert baseline.size == last.size == (96, 64)
    assert np.asarray(baseline)[48:, 64:].max() == 0 and np.asarray(baseline)[:48, 64:].max() > 0
    assert events[1]["eta"] == 0 and events[0]["lr"] > 0


def test_disk_latent_cache_is_reused_and_follows_image_changes(pack, loaded_checkpoint, concept_dataset, tmp_path,
                                                                caplog):
    import os
    import shutil

    from lora_foundry.training.data.latent_cache import FOLDER

    data = tmp_path / "data"
    shutil.copytree(concept_dataset, data, ignore=shutil.ignore_patterns(FOLDER))
    _, _, vae = loaded_checkpoint
    calls = []
    encode = vae.encode

    def counting_encode(pixels):
        calls.append(len(pixels))
        return encode(pixels)

    vae.encode = counting_encode
    try:
        first, _ = _train(pack, loaded_checkpoint, data, tmp_path / "a", steps=1, latent_cache="disk")
        cached = sorted((data / "10_sks circle" / FOLDER).glob("*.safetensors"))
        images = len(first.dataset.items) + len(first.dataset.validation)
        assert len(cached) == images and sum(calls) == images

        calls.clear()
        second, _ = _train(pack, loaded_checkpoint, data, tmp_path / "b", steps=1, latent_cache="disk")
        assert calls == []  # every latent came from disk
        a, b = dict(first.data.latents.items()), dict(second.data.latents.items())
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a)

        # An edited image is encoded again; a corrupt cache file is replaced, not trusted.
        edited = second.dataset.items[0].path
        os.utime(edited, ns=(1, 1))
        victim = next(p for p in cached if not p.name.startswith(edited.stem + "-"))
        victim.write_bytes(b"not a safetensors file")
        calls.clear()
        with caplog.at_level(logging.WARNING, logger="lora_foundry"):
            _train(pack, loaded_checkpoint, data, tmp_path / "c", steps=1, latent_cache="disk")
        assert sum(calls) == 2
        assert any("unreadable" in r.getMessage() and victim.name in r.getMessage() for r in caplog.records)

        # A cache folder that cannot be written: one warning, training goes on from memory.
        shutil.rmtree(data / "10_sks circle" / FOLDER)
        (data / "10_sks circle" / FOLDER).write_text("in the way")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lora_foundry"):
            _, result = _train(pack, loaded_checkpoint, data, tmp_path / "d", steps=1, latent_cache="disk")
        assert result.steps == 1
        assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1
    finally:
        vae.encode = encode


def test_text_encoder_outputs_are_cached_on_disk_and_a_second_run_encodes_nothing(pack, loaded_checkpoint,
                                                                                   concept_dataset, tmp_path, caplog):
    """latent_cache = disk keeps each fixed caption's host conditioning in the dataset's hidden cache: the second run
    never calls the text encoder and trains on exactly the same conditioning; a CLIP with a LoRA on it (other
    outputs) neither reads nor writes the cache; an unreadable file is encoded again."""
    import shutil

    from lora_foundry.training.data.latent_cache import FOLDER
    from lora_foundry.training.engine import text

    data = tmp_path / "data"
    shutil.copytree(concept_dataset, data, ignore=shutil.ignore_patterns(FOLDER))
    calls = []
    encode = text.encode_caption

    def counting(clip, caption):
        calls.append(caption)
        return encode(clip, caption)

    text.encode_caption = counting
    try:
        first, _ = _train(pack, loaded_checkpoint, data, tmp_path / "a", steps=1, latent_cache="disk")
        files = sorted((data / FOLDER / "text").glob("*.safetensors"))
        assert calls and len(files) == len(set(calls)), (len(files), calls)
        calls.clear()
        second, _ = _train(pack, loaded_checkpoint, data, tmp_path / "b", steps=1, latent_cache="disk")
        assert calls == []  # every caption's conditioning came from disk
        assert first.text.cache.keys() == second.text.cache.keys()
        for caption, ((cond, extras),) in first.text.cache.items():
            ((cached, cached_extras),) = second.text.cache[caption]
            assert torch.equal(cond, cached) and extras.keys() == cached_extras.keys()
            assert all(torch.equal(v, cached_extras[k]) if torch.is_tensor(v) else v == cached_extras[k]
                       for k, v in extras.items())

        files[0].write_bytes(b"not a safetensors file")
        with caplog.at_level(logging.WARNING, logger="lora_foundry"):
            _train(pack, loaded_checkpoint, data, tmp_path / "c", steps=1, latent_cache="disk")
        assert len(calls) == 1 and any("unreadable" in r.getMessage() for r in caplog.records)

        model, clip, vae = loaded_checkpoint
        patched_clip = clip.clone()
        key = next(k for k in patched_clip.patcher.model_state_dict() if k.endswith("q_proj.weight"))
        weight = patched_clip.patcher.model_state_dict()[key]
        patched_clip.patcher.add_patches({key: (torch.full_like(weight, 0.01),)}, 1.0)
        calls.clear()
        before = sorted((data / FOLDER / "text").glob("*.safetensors"))
        _train(pack, (model, patched_clip, vae), data, tmp_path / "d", steps=1, latent_cache="disk")
        assert calls and sorted((data / FOLDER / "text").glob("*.safetensors")) == before
        other_layer = clip.clone()
        other_layer.clip_layer(-2)  # CLIPSetLastLayer: other outputs, other files
        calls.clear()
        _train(pack, (model, other_layer, vae), data, tmp_path / "e", steps=1, latent_cache="disk")
        assert calls and len(list((data / FOLDER / "text").glob("*.safetensors"))) == len(before) + len(set(calls))
    finally:
        text.encode_caption = encode


def test_the_trigger_word_is_not_put_on_regularisation_captions(pack, loaded_checkpoint, concept_dataset, tmp_path):
    import shutil

    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    reg = tmp_path / "reg" / "1_circle"
    reg.mkdir(parents=True)
    for image in sorted((concept_dataset / "10_sks circle").glob("*.png"))[:3]:
        shutil.copy(image, reg / image.name)
        (reg / image.name).with_suffix(".txt").write_text("a circle")
    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(concept_dataset, resolution=64, min_side=32, max_side=128, bucket_step=32,
                           reg_folder=tmp_path / "reg")
    config = TrainConfig(steps=1, captions=CaptionOptions(trigger_word="sks"))
    with torch.inference_mode(False):
        trainer = Trainer(model, clip, vae, dataset, LoraNetwork.create(NetworkConfig(rank=2), model), config)
    regs = [i for i in dataset.items if i.is_reg]
    assert len(regs) == 3
    for item in dataset.items:
        caption = trainer.text.caption(item, config.captions, random.Random(0))
        assert caption.startswith("sks") != item.is_reg, (item.path, caption)
        assert trainer.text.fixed_caption(item) == caption


def test_flow_timestep_shifts_match_the_hosts_schedules(training):
    """fixed = SD3's schedule at that shift, resolution = Flux's at the mu kohya's flux_shift gives, none = identity;
    eps / v models keep their own schedule whatever is asked."""
    import comfy.model_sampling as ms

    objective, _ = training

    class Flux(ms.ModelSamplingFlux, ms.CONST):
        pass

    sd3, flux, eps = _sampling("flow"), Flux(), _sampling("eps")
    levels = [0.05, 0.3, 0.5, 0.8, 0.99]
    sd3.set_parameters(shift=3.0)
    torch.testing.assert_close(objective.sigmas_for(sd3, levels, "fixed", 3.0), objective.sigmas_for(sd3, levels))
    flux.set_parameters(shift=1.15)  # mu at 4096 image tokens (1024 px)
    torch.testing.assert_close(objective.sigmas_for(flux, levels, "resolution", tokens=4096),
                               objective.sigmas_for(flux, levels))
    flux.set_parameters(shift=0.5)  # mu at 256 tokens (256 px)
    torch.testing.assert_close(objective.sigmas_for(flux, levels, "resolution", tokens=256),
                               objective.sigmas_for(flux, levels))
    torch.testing.assert_close(objective.sigmas_for(sd3, levels, "none"), torch.tensor(levels))
    torch.testing.assert_close(objective.sigmas_for(eps, levels, "fixed", 3.0), objective.sigmas_for(eps, levels))
    with pytest.raises(ValueError, match="timestep_shift"):
        objective.sigmas_for(sd3, levels, "sideways")


def test_saved_files_carry_kohyas_training_metadata(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """The ss_* keys kohya's tools read, each from its declared setting, with the run's values."""
    from lora_foundry.training.data.captions import CaptionOptions

    captions = CaptionOptions(trigger_word="sks", shuffle_tags=True, keep_tokens=2, caption_dropout=0.1)
    trainer, result = _train(pack, loaded_checkpoint, concept_dataset, tmp_path, steps=2, learning_rate=3e-4,
                             optimizer="Lion", scheduler="cosine", warmup_steps=1, grad_accum=2, grad_clip=0.5,
                             noise_offset=0.05, gradient_checkpointing=True, seed=7, flip=True, captions=captions)
    meta = trainer.files.metadata(result.steps)
    want = {"ss_learning_rate": "0.0003", "ss_unet_lr": "0.0003", "ss_optimizer": "Lion", "ss_lr_scheduler": "cosine",
            "ss_lr_warmup_steps": "1", "ss_max_train_steps": "2", "ss_steps": "2", "ss_mixed_precision": "fp32",
            "ss_batch_size_per_device": "2", "ss_gradient_accumulation_steps": "2", "ss_max_grad_norm": "0.5",
            "ss_min_snr_gamma": "5.0", "ss_noise_offset": "0.05", "ss_gradient_checkpointing": "True",
            "ss_seed": "7", "ss_flip_aug": "True", "ss_shuffle_caption": "True", "ss_keep_tokens": "2",
            "ss_caption_dropout_rate": "0.1", "ss_network_dropout": "0.0", "ss_network_dim": "4",
            "ss_num_train_images": str(len(trainer.dataset.items))}
    assert {k: meta.get(k) for k in want} == want


def test_resume_with_other_settings_is_refused_naming_them(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """A state resumed with another rank, algorithm, optimizer or set of images is refused before anything loads,
    naming the setting; a learning rate or dropout may change."""
    import shutil

    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.config import TrainingError
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((concept_dataset / "10_sks circle").iterdir())[:16]:  # 8 images, 8 captions
        shutil.copy(path, images / path.name)

    def train(folder, resume=None, steps=1, **network):
        dataset = load_dataset(images, resolution=64, min_side=64, max_side=64)
        optimizer = network.pop("optimizer", "AdamW")
        lr = network.pop("learning_rate", 1e-3)
        settings = {"rank": 2, "alpha": 2.0, "preset": "attention", **network}
        with torch.inference_mode(False):
            trainer = Trainer(model, clip, vae, dataset, LoraNetwork.create(NetworkConfig(**settings), model),
                              TrainConfig(steps=steps, learning_rate=lr, optimizer=optimizer), output_dir=folder,
                              resume=resume)
            trainer.run()
        return trainer

    state = train(tmp_path / "first").files.state_path
    for changed, message in [({"rank": 4}, "rank: the run saved at"), ({"algorithm": "loha"}, "algorithm: "),
                             ({"optimizer": "Lion"}, "optimizer: the run saved at")]:
        with pytest.raises(TrainingError, match=message):
            train(tmp_path / "again", state, 2, **changed)
    assert train(tmp_path / "ok", state, 2, learning_rate=5e-4, module_dropout=0.1).files.state_path.is_file()
    next(images.glob("*.png")).unlink()
    with pytest.raises(TrainingError, match="dataset: the run saved at .* trained on 8 images .*, now 7"):
        train(tmp_path / "again", state, 2)
