"""Training features of issue 17: masked loss, EMA, best checkpoint and early stopping, per-block learning rates
and ranks, prior images with the empty prompt. Mechanisms are checked in-process; one run goes through the server."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from harness.workflow import default_inputs
from PIL import Image


def _masked_dataset(concept_dataset: Path, root: Path, count: int = 4) -> tuple[Path, Path]:
    """A copy of `count` concept images, and a mask folder beside it: the left half of each image black."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for path in sorted(concept_dataset.rglob("*.png"))[:count]:
        shutil.copy(path, images / path.name)
        if path.with_suffix(".txt").is_file():
            shutil.copy(path.with_suffix(".txt"), images / f"{path.stem}.txt")
        with Image.open(path) as img:
            w, h = img.size
        mask = np.full((h, w), 255, np.uint8)
        mask[:, : w // 2] = 0
        Image.fromarray(mask).save(masks / f"{path.stem}.png")
    return images, masks


def _trainer(pack, loaded_checkpoint, dataset, tmp_path, net: dict | None = None, **settings):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    config = TrainConfig(**{"steps": 1, "batch_size": 1, "learning_rate": 1e-3, "seed": 0, **settings})
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(**{"rank": 4, "alpha": 4, "preset": "attention", **(net or {})}),
                                     model)
        return Trainer(model, clip, vae, dataset, network, config, output_dir=tmp_path)


# --- masked loss ------------------------------------------------------------------------------------------------


def test_masks_are_found_reported_and_cut_as_their_images(pack, concept_dataset, tmp_path):
    from lora_foundry.training.data.dataset import load_dataset, load_item_image
    from lora_foundry.training.data.masks import ALPHA, load_mask

    images, masks = _masked_dataset(concept_dataset, tmp_path / "data")
    missing = sorted(masks.iterdir())[0]
    missing.unlink()
    dataset = load_dataset(images, resolution=64, min_side=32, max_side=128, bucket_step=32, mask_folder=masks)
    with_mask = [i for i in dataset.items if i.mask is not None]
    assert len(with_mask) == len(dataset.items) - 1
    assert dataset.report.masks_found == len(with_mask) and dataset.report.masks_missing == [images / f"{missing.stem}.png"]
    assert f"no mask: {images / missing.stem}.png" in dataset.report.summary()
    # A mask of another shape (made from the stored pixels of a rotated photo, say) is refused, naming both files.
    wrong = sorted(masks.iterdir())[0]
    with Image.open(wrong) as img:
        img.transpose(Image.Transpose.ROTATE_90).resize((img.width, img.height // 2)).save(wrong)
    from lora_foundry.training.data.dataset import DatasetError

    with pytest.raises(DatasetError, match=f"mask {wrong}.*its image"):
        load_dataset(images, resolution=64, min_side=32, max_side=128, bucket_step=32, mask_folder=masks)
    wrong.unlink()

    # A mask folder inside the dataset is not scanned as images; an RGBA image's alpha is its mask.
    inside = tmp_path / "inside"
    shutil.copytree(images, inside)
    shutil.copytree(masks, inside / "masks")
    rgba = Image.new("RGBA", (96, 64), (10, 200, 30, 255))
    rgba.paste((10, 200, 30, 0), (0, 0, 48, 64))  # left half transparent
    rgba.save(inside / "rgba.png")
    dataset = load_dataset(inside, resolution=64, min_side=32, max_side=128, bucket_step=32,
                           mask_folder=inside / "masks", alpha_mask=True)
    assert not [i for i in dataset.items if "masks" in i.path.parts]
    item = next(i for i in dataset.items if i.path.name == "rgba.png")
    assert item.mask == ALPHA
    # Cut exactly as the image: an image that is its own mask (white right half) gives the same pixels.
    picture = tmp_path / "picture.png"
    mask = np.zeros((80, 120), np.uint8)
    mask[:, 57:] = 255
    Image.fromarray(mask).convert("RGB").save(picture)
    item.path, item.size, item.bucket = picture, (120, 80), (64, 32)
    for flip in (False, True):
        cut = load_mask(picture, picture, item.bucket, flip)
        image = load_item_image(item, "center", flip)[0][..., 0]
        assert cut.shape == image.shape == (32, 64)
        torch.testing.assert_close(cut, image, atol=1 / 255, rtol=0)


def test_masked_loss_teaches_nothing_where_the_mask_is_black(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """The gradient reaching the model's output is exactly zero under the black half and not elsewhere; with a
    floor the black half teaches again, floor times as much."""
    from lora_foundry.training.data.dataset import load_dataset

    images, masks = _masked_dataset(concept_dataset, tmp_path / "data", count=1)
    dataset = load_dataset(images, resolution=64, min_side=64, max_side=64, bucket_step=64, mask_folder=masks)
    grads = {}
    for floor in (0.0, 0.25):
        trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path / f"f{floor}", mask_floor=floor)
        outputs = []

        def keep(module, args, output, outputs=outputs):
            if output.requires_grad and output.untyped_storage().nbytes():  # not the memory plan's storage-less run
                output.retain_grad()
                outputs.append(output)

        hook = trainer.model.model.diffusion_model.register_forward_hook(keep)
        try:
            trainer.run()
        finally:
            hook.remove()
        mask = trainer.data.masks.get(0)
        assert mask.shape[-2:] == outputs[-1].shape[-2:]
        grads[floor] = outputs[-1].grad[0].abs().sum(0)
        black, white = mask[0] == 0, mask[0] == 1
        assert black.any() and white.any()
        assert (grads[floor][white] > 0).all()
        if floor == 0:
            assert torch.equal(grads[floor][black], torch.zeros_like(grads[floor][black]))
        else:
            assert (grads[floor][black] > 0).all()
    # Same draws and the same (zero-adapter) output in both runs; weights are the mask lifted to the floor and
    # scaled to mean 1: white 1 / 0.5 = 2 without a floor, 1 / 0.625 = 1.6 with 0.25 (black 0.4).
    white = mask[0] == 1
    torch.testing.assert_close(grads[0.25][white], 0.8 * grads[0.0][white])


# --- EMA, best checkpoint, early stopping ---------------------------------------------------------------------------


def _concept(concept_dataset, validation_split: float = 0.0, count: int = 4):
    """`count` concept images at 64 px (few and small: these tests check mechanisms, not learning)."""
    from lora_foundry.training.data.dataset import load_dataset

    folder = concept_dataset.parent / f"{concept_dataset.name}-first{count}"
    if not folder.is_dir():
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for path in sorted(concept_dataset.rglob("*.png"))[:count]:
            for source in (path, path.with_suffix(".txt")):
                if source.is_file():
                    shutil.copy(source, staging / source.name)
        staging.rename(folder)
    return load_dataset(folder, resolution=64, min_side=64, max_side=64, bucket_step=64,
                        validation_split=validation_split, seed=0)


def _moving_average(seen: list[dict], decay: float, every: int, warmup: bool) -> dict:
    """The EMA of the adapters recorded after each step, by its formula: every `every` steps, the first update a
    copy, then decay min(decay, (1 + n) / (10 + n)) with warm-up (n updates so far), else decay."""
    expected, updates = None, 0
    for step, params in enumerate(seen, start=1):
        if step % every:
            continue
        d = 0.0 if updates == 0 else min(decay, (1 + updates) / (10 + updates)) if warmup else decay
        expected = params if expected is None else {k: d * expected[k] + (1 - d) * params[k] for k in params}
        updates += 1
    return expected


def test_the_moving_average_is_the_average_of_the_steps(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """The -ema file holds exactly decay-weighted step parameters (recorded at every step), with warm-up and
    without; another decay gives another average, its own; a run resumed in the middle gives the same average;
    `instead` makes it the run's adapter."""
    from safetensors.torch import load_file

    dataset = _concept(concept_dataset)
    steps, every = 10, 2
    # 5 updates: with warm-up the decays are 0, 0.18, 0.25 and then 0.3 (the setting, under 4/13 and 5/14).
    runs = {"warm": (0.3, True), "plain": (0.6, False)}
    saved = {}
    for name, (decay, warmup) in runs.items():
        trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path / name, steps=steps, ema_decay=decay,
                           ema_every=every, ema_warmup=warmup)
        seen = []
        trainer.on_step = lambda info, t=trainer, seen=seen: seen.append(
            {k: v.detach().clone() for k, v in t.network.state_dict_kohya().items()})
        result = trainer.run()
        saved[name] = load_file(str(tmp_path / name / "lora-ema.safetensors"))
        for key, value in _moving_average(seen, decay, every, warmup).items():
            if "alpha" not in key:
                torch.testing.assert_close(saved[name][key], value, rtol=1e-5, atol=1e-7)
        up = next(k for k in saved[name] if "lora_up" in k)
        assert not torch.equal(saved[name][up], result.network.state_dict_kohya()[up])
    up = next(k for k in saved["warm"] if "lora_up" in k)
    assert (saved["warm"][up] - saved["plain"][up]).abs().max() > 1e-3 * saved["warm"][up].abs().max()
    saved = saved["warm"]
    decay, warmup = runs["warm"]

    # Resumed at step 5 (state saved with the average), the run ends with the same average.
    first = _trainer(pack, loaded_checkpoint, dataset, tmp_path / "b", steps=5, ema_decay=decay, ema_every=every)
    first.run()
    again = _trainer(pack, loaded_checkpoint, dataset, tmp_path / "b", steps=steps, ema_decay=decay, ema_every=every)
    again.resume = first.files.state_path
    again.run()
    resumed = load_file(str(tmp_path / "b" / "lora-ema.safetensors"))
    for key in saved:
        torch.testing.assert_close(resumed[key], saved[key])

    instead = _trainer(pack, loaded_checkpoint, dataset, tmp_path / "c", steps=steps, ema_decay=decay,
                       ema_every=every, ema_output="instead")
    out = instead.run().network.state_dict_kohya()
    assert not (tmp_path / "c" / "lora-ema.safetensors").exists()
    for key in saved:
        torch.testing.assert_close(out[key], saved[key])


def test_post_hoc_ema_weights_and_average(pack, tmp_path):
    from lora_foundry.lora_core.ema import average_files, gamma_of, power_ema_weights, run_checkpoints
    from lora_foundry.lora_core.files import write_safetensors

    # A narrower average (smaller sigma_rel) is a higher power; gamma solves EDM2's equation for sigma_rel.
    assert gamma_of(0.2) < gamma_of(0.1) < gamma_of(0.05)
    g = gamma_of(0.1)
    assert abs(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 - 0.1) < 1e-9
    weights = power_ema_weights([10, 20, 30, 40], 0.1)
    expected = [(s / 40) ** (g + 1) - (p / 40) ** (g + 1) for p, s in zip([0, 10, 20, 30], [10, 20, 30, 40], strict=True)]
    assert weights == pytest.approx([e / sum(expected) for e in expected])
    assert weights[-1] > weights[-2] > weights[0] and sum(weights) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ascending"):
        power_ema_weights([20, 10], 0.1)

    run = tmp_path / "run"
    run.mkdir()
    tensors = {}
    for step in (10, 20, 30, 40):
        tensors[step] = {"m.lora_up.weight": torch.full((2, 2), float(step)), "m.alpha": torch.tensor(4.0)}
        write_safetensors(tensors[step], run / f"demo-step{step:06d}.safetensors",
                          {"ss_output_name": "demo", "ss_steps": str(step)})
    (run / "demo-step000050.safetensors").write_bytes((run / "demo-step000040.safetensors").read_bytes())
    found = run_checkpoints(run / "demo-step000040.safetensors")
    assert [s for s, _ in found] == [10, 20, 30, 40]  # later checkpoints of the run are left out
    averaged, _ = average_files([p for _, p in found], weights)
    assert averaged["m.lora_up.weight"][0, 0].item() == pytest.approx(sum(w * s for w, s in
                                                                        zip(weights, [10, 20, 30, 40], strict=True)))
    assert averaged["m.alpha"].item() == pytest.approx(4.0)
    # Only step checkpoints of that run: not another run's (a name that is a prefix, or glob characters), not -ema.
    for other in ("demo2-step000020", "dem-step000020", "demo-ema", "demo-step000020.tmp"):
        (run / f"{other}.safetensors").write_bytes((run / "demo-step000010.safetensors").read_bytes())
    assert [s for s, _ in run_checkpoints(run / "demo-step000030.safetensors")] == [10, 20, 30]
    odd = tmp_path / "odd"
    odd.mkdir()
    for step in (10, 20):
        write_safetensors(tensors[step], odd / f"st[y]le-step{step:06d}.safetensors")
    write_safetensors(tensors[10], odd / "sty-step000015.safetensors")
    assert [s for s, _ in run_checkpoints(odd / "st[y]le-step000020.safetensors")] == [10, 20]
    with pytest.raises(ValueError, match="step checkpoints"):
        run_checkpoints(run / "demo-ema.safetensors")
    with pytest.raises(ValueError, match="at least two"):
        run_checkpoints(run / "demo-step000010.safetensors")


def test_best_checkpoint_and_early_stopping(pack, loaded_checkpoint, concept_dataset, tmp_path, monkeypatch):
    """<name>-best holds the adapter of the lowest held-out loss; patience stops the run that many validations after
    it; both need held-out images and say so."""
    from lora_foundry.training.engine import loop
    from safetensors.torch import load_file

    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 1.0])  # best at the third validation (step 6)
    monkeypatch.setattr(loop, "held_out_loss", lambda *args: next(scripted))
    dataset = _concept(concept_dataset, validation_split=0.15)
    trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path / "a", steps=40, validation_every=2,
                       keep_best=True, patience=3)
    events, adapters = [], {}

    def on_step(info):
        events.append(info)
        adapters[info["step"]] = {k: v.clone() for k, v in trainer.network.state_dict_kohya().items()}

    trainer.on_step = on_step
    result = trainer.run()
    assert result.steps == 12 and [s for s, _ in result.validation] == [2, 4, 6, 8, 10, 12]
    assert events[-1]["stopped_early"] and events[-1]["best"] == [6, 3.0]
    assert not any(e["stopped_early"] for e in events[:-1])
    best = load_file(str(tmp_path / "a" / "lora-best.safetensors"))
    for key, value in adapters[6].items():
        torch.testing.assert_close(best[key], value)
    assert not torch.equal(best[next(k for k in best if "lora_up" in k)],
                           adapters[12][next(k for k in best if "lora_up" in k)])
    # Resumed with the same patience, the stopped run stays stopped: no step is trained.
    again = _trainer(pack, loaded_checkpoint, dataset, tmp_path / "a", steps=40, validation_every=2,
                     keep_best=True, patience=3)
    again.resume = trainer.files.state_path
    assert again.run().steps == 12

    with pytest.raises(ValueError, match="validation_split"):
        _trainer(pack, loaded_checkpoint, _concept(concept_dataset), tmp_path / "b", steps=2, validation_every=1,
                 keep_best=True)
    from lora_foundry.training.engine.trainer import TrainConfig

    with pytest.raises(ValueError, match="patience.*validation_every"):
        TrainConfig(patience=2)


# --- per-block ranks and learning rates -----------------------------------------------------------------------------


def test_block_ranks_and_learning_rates(pack, loaded_checkpoint, concept_dataset, monkeypatch):
    """kohya's block_dims (every block) and block-weight vectors set each block's rank (0 = no adapter) and learning
    rate; the optimizer a run builds carries the rates."""
    from lora_foundry.lora_core.block_weights import SD1, block_of
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine import loop
    model, clip, vae = loaded_checkpoint
    with torch.inference_mode(False):
        plain = LoraNetwork.create(NetworkConfig(rank=4, preset="attention"), model)
    blocks = {name: block_of(name, SD1) for name in plain.adapters}
    assert "MID" in blocks.values()
    wider = sorted(set(blocks.values()) - {"MID"})[-1]
    dims = ["4"] * 25  # kohya's block_dims: every block, no BASE
    dims[SD1.all_ids.index("MID") - 1] = "0"
    dims[SD1.all_ids.index(wider) - 1] = "8"
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=4, preset="attention", block_ranks=",".join(dims)), model)
    assert {blocks[n] for n in network.adapters} == set(blocks.values()) - {"MID"}
    for name, adapter in network.adapters.items():
        assert adapter.rank == (8 if blocks[name] == wider else 4), name
    with pytest.raises(ValueError, match="block_ranks.*values"):
        with torch.inference_mode(False):
            LoraNetwork.create(NetworkConfig(rank=4, block_ranks="1,2,3"), model)

    lrs = {block: 1.0 for block in SD1.all_ids}  # the long vector: BASE and every block
    lrs.update({"MID": 2.0, wider: 0.5})
    trainer = _trainer(pack, loaded_checkpoint, _concept(concept_dataset), None, learning_rate=1e-3,
                       block_lrs=",".join(str(v) for v in lrs.values()))
    with pytest.raises(ValueError, match="block_lrs: 3 values"):  # refused before anything is encoded
        _trainer(pack, loaded_checkpoint, _concept(concept_dataset), None, block_lrs="1,2,3")
    built = []
    build = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda *args, **kwargs: built.append(build(*args, **kwargs)) or
                        built[-1])
    with torch.inference_mode(False):
        trainer.run()
    (optimizer,) = built
    group_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(group_of) == sum(1 for _ in trainer.network.parameters())
    for name, adapter in trainer.network.adapters.items():
        for p in adapter.parameters():
            assert group_of[id(p)] == pytest.approx(1e-3 * lrs[blocks[name]]), name


# --- prior images with the empty prompt ---------------------------------------------------------------------------


def test_prior_images_train_with_the_empty_prompt_when_asked(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """With reg_empty_prompt the regularisation batches get exactly the conditioning of the sampler's empty negative
    (CLIPTextEncode of ""), their own captions unused; the training images keep theirs."""
    import random

    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.conditioning import encode_caption

    reg = tmp_path / "reg"
    reg.mkdir()
    for image in sorted(concept_dataset.rglob("*.png"))[:2]:
        shutil.copy(image, reg / image.name)
        (reg / image.name).with_suffix(".txt").write_text("a circle")
    _, clip, _ = loaded_checkpoint
    for empty in (False, True):
        dataset = load_dataset(concept_dataset, resolution=64, min_side=32, max_side=128, bucket_step=32,
                               reg_folder=reg, reg_empty_prompt=empty)
        trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path / str(empty),
                           captions=CaptionOptions(trigger_word="sks", prefix="photo"))
        for item in dataset.items:
            caption = trainer.text.caption(item, trainer.config.captions, random.Random(0))
            if item.is_reg:
                assert (caption == "") == empty and (empty or "circle" in caption), caption
            else:
                assert caption.startswith("sks") or "sks" in caption
    negative = encode_caption(clip, "")
    reg_index = next(i for i, item in enumerate(dataset.items) if item.is_reg)
    conditioning = trainer.text.conditioning([trainer.text.caption(dataset.items[reg_index], trainer.config.captions,
                                                         random.Random(0))], "cpu")[0]
    torch.testing.assert_close(conditioning[0][0], negative[0][0])


# --- output preservation -------------------------------------------------------------------------------------------


def test_the_trigger_word_is_said_as_the_class_for_preservation(pack):
    from lora_foundry.training.data.captions import with_class
    from lora_foundry.training.engine.config import TrainConfig

    assert with_class("sks, sks circle, red Sks, skss, a_sks", "sks", "toy") == "toy, toy circle, red toy, skss, a_sks"
    assert with_class("ohwx man, smiling", "ohwx man", "man") == "man, smiling"
    assert with_class("a red circle", "", "toy") == "a red circle"
    with pytest.raises(ValueError, match="preservation_class: .* set trigger_word"):
        TrainConfig(preservation_class="person")


def _denoised(trainer, patched, caption: str) -> torch.Tensor:
    """What `patched` predicts for the first image noised half-way (fixed noise), conditioned on `caption`."""
    import comfy.model_management as mm
    from lora_foundry.training.engine.conditioning import apply_model, image_geometry

    mm.load_models_gpu([patched], force_full_load=True)
    x0 = trainer.data.latents.get(0, False)[None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    sigma = trainer.step.sigmas(patched, [0.5], x0)
    geometry = [image_geometry(trainer.dataset.items[0], False)]
    with torch.no_grad():
        x, inputs = trainer.step.model_call(patched, x0, noise, sigma, trainer.text.conditioning([caption], "cpu"),
                                            geometry)
        return apply_model(patched.model, x, sigma, inputs).float()


@pytest.mark.slow
def test_output_preservation_keeps_the_class_as_the_base_draws_it(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """Two runs from the same seed, one with preservation_class and blank prompt preservation: both learn the
    trigger, but only the run without them moves what the model predicts for the class (the captions with the trigger
    said as the class) and for the empty prompt away from the base model's prediction, judged against the base model
    itself (no adapter attached)."""
    from lora_foundry.training.data.captions import CaptionOptions

    model, _, _ = loaded_checkpoint
    dataset = _concept(concept_dataset)
    caption = dataset.items[0].caption
    drift = {}
    runs = {"plain": {}, "preserved": {"preservation_class": "toy", "blank_preservation_weight": 1.0}}
    for name, settings in runs.items():
        trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path / name, steps=20, batch_size=2,
                           learning_rate=3e-3, captions=CaptionOptions(trigger_word="sks"), **settings)
        with torch.inference_mode(False):
            network = trainer.run().network
        trigger = trainer.text.fixed_caption(dataset.items[0])
        with torch.inference_mode(False):
            patched, _ = network.attach(model, None, mode="bypass")
        patched.model.eval()
        drift[name] = {text: float((_denoised(trainer, patched, text) - _denoised(trainer, model, text)).norm())
                       for text in (trigger, trigger.replace("sks", "toy"), "")}
    plain, kept = drift["plain"], drift["preserved"]
    trigger, cls, blank = list(plain)
    assert "toy" in cls and "sks" not in cls and caption
    assert kept[cls] < 0.5 * plain[cls], drift  # the class stays as the base draws it
    assert kept[blank] < 0.5 * plain[blank], drift  # so does the empty prompt
    assert kept[trigger] > 0.5 * plain[trigger], drift  # the trigger still learns


def test_each_step_holds_the_class_and_the_empty_prompt_to_the_base_models_prediction(pack, loaded_checkpoint,
                                                                                      concept_dataset, tmp_path,
                                                                                      monkeypatch):
    """The mechanism under the test above, in two steps: every step adds a preservation loss for the batch said as the
    class and one for the empty prompt, each against the base model's own prediction. At step 1 the adapters are
    still zero, so adapted and base agree exactly (loss 0); at step 2 they have moved and the losses are not 0 (a
    target predicted with the adapters on would still give exactly 0)."""
    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.engine.step import TrainingStep
    from torch._subclasses.fake_tensor import FakeTensor

    asked = []
    preservation_loss = TrainingStep.preservation_loss

    def recorded(self, patched, x0, noise, sigma, captions, *args):
        loss = preservation_loss(self, patched, x0, noise, sigma, captions, *args)
        if not isinstance(loss, FakeTensor):  # the memory plan's simulated step
            asked.append((list(captions), loss.item()))
        return loss

    monkeypatch.setattr(TrainingStep, "preservation_loss", recorded)
    trainer = _trainer(pack, loaded_checkpoint, _concept(concept_dataset), tmp_path, steps=2, batch_size=2,
                       captions=CaptionOptions(trigger_word="sks"), preservation_class="toy",
                       blank_preservation_weight=1.0)
    with torch.inference_mode(False):
        trainer.run()
    assert [[c.split(",")[0] for c in captions] for captions, _ in asked] == [["toy", "toy"], ["", ""]] * 2, asked
    assert [loss for _, loss in asked[:2]] == [0.0, 0.0], asked
    assert all(loss > 0 for _, loss in asked[2:]), asked


def test_regularisation_images_can_be_trained_toward_the_base_models_own_prediction(pack, loaded_checkpoint,
                                                                                    concept_dataset, tmp_path,
                                                                                    monkeypatch):
    """prior_target = base: a regularisation image's target is the base model's own prediction for its noisy latent
    and caption (ai-toolkit's), where image (kohya's) trains toward the image. Per sample of one mixed batch: with the
    adapters still zero the regularisation images' loss is exactly 0 and the concept images' is the same as with
    image; with the adapters moved it is not 0 (so the target is the base's, not the adapted model's)."""
    import random

    import comfy.model_management as mm
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine import objective

    model, _, _ = loaded_checkpoint
    concept = _concept(concept_dataset, count=2).root
    reg = tmp_path / "reg"
    reg.mkdir()
    for i, path in enumerate(sorted(concept.glob("*.png"))):
        shutil.copy(path, reg / f"{i}.png")
        (reg / f"{i}.txt").write_text("a toy")
    dataset = load_dataset(concept, resolution=64, min_side=64, max_side=64, bucket_step=64, reg_folder=reg)
    batch = list(range(len(dataset.items)))
    is_reg = torch.tensor([item.is_reg for item in dataset.items])
    assert is_reg.sum() == 2 and (~is_reg).sum() == 2
    per_sample = []
    prediction_loss = objective.prediction_loss
    monkeypatch.setattr(objective, "prediction_loss",
                        lambda *a, **k: per_sample.append(prediction_loss(*a, **k).detach()) or per_sample[-1])

    def losses(target: str) -> list[torch.Tensor]:
        """Per sample, the adapters zero and then moved."""
        trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path / target, prior_target=target)
        trainer.data.encode_images(trainer.dataset.items)
        with torch.inference_mode(False), torch.no_grad():
            patched, _ = trainer.network.attach(model, None, mode="bypass")
            mm.load_models_gpu([patched], force_full_load=True)  # the bypass patches go in as the host loads it
            for moved in (False, True):
                if moved:
                    for p in trainer.network.trainable_parameters():
                        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
                trainer.step.batch_loss(patched, batch, random.Random(0), torch.Generator().manual_seed(0), "cpu",
                                        None)
        return per_sample[-2:]

    (image, _), (base, moved) = losses("image"), losses("base")
    assert (image[is_reg] > 0).all() and (base[is_reg] == 0).all(), (image, base)
    torch.testing.assert_close(base[~is_reg], image[~is_reg], rtol=0, atol=0)
    assert (moved[is_reg] > 0).all() and not torch.equal(moved[~is_reg], base[~is_reg]), moved


def test_output_preservation_says_each_sample_as_one_of_its_classes(pack):
    """preservation_class takes one class per line: every line's caption is encoded up front, and each sample of a
    batch is said as one of them, drawn from the step's generator."""
    import random

    from lora_foundry.training.data.captions import CaptionOptions
    from lora_foundry.training.engine.config import TrainConfig
    from lora_foundry.training.engine.text import TextConditioning

    config = TrainConfig(preservation_class=" woman \n\n man ", captions=CaptionOptions(trigger_word="sks"))
    assert config.preservation_classes == ["woman", "man"] and config.preservation_class == "woman\nman"
    text = TextConditioning(None, config.captions, classes=config.preservation_classes)
    assert text.asked_besides("sks, red hair") == ["woman, red hair", "man, red hair"]
    rng = random.Random(0)
    assert {text.as_class("sks, red hair", rng) for _ in range(20)} == {"woman, red hair", "man, red hair"}
    assert TextConditioning(None, config.captions, classes=["woman"]).as_class("SKS", rng) == "woman"


def test_a_slider_says_each_caption_with_its_two_sides(pack):
    from lora_foundry.training.data.captions import SliderSides
    from lora_foundry.training.engine.config import TrainConfig

    assert SliderSides("old person", "young person", "person").of("a Person outdoors, persons") == \
        ("a old person outdoors, persons", "a young person outdoors, persons")
    assert SliderSides("red", "blue", "purple").of("a cat") == ("a cat, red", "a cat, blue")  # not said: added
    assert SliderSides("smiling", "frowning").of("") == ("smiling", "frowning")
    with pytest.raises(ValueError, match="slider_positive / slider_negative: .* set both"):
        TrainConfig(slider_positive="old")
    with pytest.raises(ValueError, match="slider_anchor: .* set slider_positive"):
        TrainConfig(slider_anchor="a cat")
    assert TrainConfig(slider_positive=" old ", slider_negative="young").slider_positive == "old"


@pytest.mark.parametrize("algorithm", ["oft", "boft"])
def test_a_slider_is_refused_for_orthogonal_adapters(pack, loaded_checkpoint, concept_dataset, tmp_path, algorithm):
    """ComfyUI applies OFT / BOFT at -1 as no reverse of +1, so a slider of them could not slide both ways."""
    dataset = _concept(concept_dataset)
    with pytest.raises(ValueError, match=f"slider_positive / slider_negative: .*{algorithm.upper()} at a negative"):
        _trainer(pack, loaded_checkpoint, dataset, tmp_path, net={"algorithm": algorithm, "rank": 16},
                 slider_positive="red", slider_negative="blue")


def _slider(pack, loaded_checkpoint, dataset, tmp_path, **settings):
    """A trained concept slider (red / blue said in place of each caption's "sks") and its trainer."""
    trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path, **{
        "steps": 15, "batch_size": 2, "learning_rate": 3e-3, "slider_positive": "red", "slider_negative": "blue",
        "slider_target": "sks", **settings})
    with torch.inference_mode(False):
        return trainer, trainer.run().network


@pytest.mark.slow
def test_a_slider_moves_the_prediction_toward_each_side_by_its_strength(pack, loaded_checkpoint, concept_dataset,
                                                                       tmp_path):
    """At +1 the slider moves what the model predicts for a caption along the base model's own (positive - negative)
    difference for it, at -1 the other way, each about as far; the anchor prompt stays the base's."""
    model, _, _ = loaded_checkpoint
    dataset = _concept(concept_dataset)
    anchor = "green square, purple background"
    trainer, network = _slider(pack, loaded_checkpoint, dataset, tmp_path / "slider", slider_anchor=anchor)
    caption = dataset.items[0].caption
    positive, negative = trainer.text.slider.of(caption)
    assert positive == caption.replace("sks", "red") and negative == caption.replace("sks", "blue"), caption
    difference = _denoised(trainer, model, positive) - _denoised(trainer, model, negative)
    base = _denoised(trainer, model, caption)
    moved, anchor_moved = {}, {}
    with torch.inference_mode(False):
        patched, _ = network.attach(model, None, mode="bypass")
    patched.model.eval()
    for strength in (1.0, -1.0):
        with network.at_strength(strength):
            moved[strength] = _denoised(trainer, patched, caption) - base
            anchor_moved[strength] = _denoised(trainer, patched, anchor) - _denoised(trainer, model, anchor)

    def along(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    report = {s: (along(m, s * difference), float(m.norm() / difference.norm())) for s, m in moved.items()}
    assert all(cosine > 0.5 and 0.3 < size < 3 for cosine, size in report.values()), report
    assert all(a.norm() < 0.5 * moved[s].norm() for s, a in anchor_moved.items()), (report, anchor_moved)


def test_a_slider_step_moves_its_targets_by_the_strength_and_holds_the_anchor(pack, loaded_checkpoint,
                                                                               concept_dataset, tmp_path, monkeypatch):
    """The mechanism under the test above, in one step: at +1 and -1 the caption's target is the base model's
    prediction for it moved by + and - slider_guidance x (its prediction for the positive side - for the negative
    side), and the anchor's target is the base model's prediction for the anchor at both."""
    from lora_foundry.training.engine.step import TrainingStep
    from torch._subclasses.fake_tensor import FakeTensor

    base, targets = [], []
    base_prediction, prediction_loss = TrainingStep.base_prediction, TrainingStep.prediction_loss

    def recorded_base(self, *args):
        prediction, conditioning = base_prediction(self, *args)
        if not isinstance(prediction, FakeTensor):  # the memory plan's simulated step
            base.append(prediction.clone())
        return prediction, conditioning

    def recorded_target(self, patched, x, target, *args):
        if not isinstance(target, FakeTensor):
            strengths = {adapter.multiplier for adapter in self.network.adapters.values()}
            targets.append((strengths, target.detach().clone()))
        return prediction_loss(self, patched, x, target, *args)

    monkeypatch.setattr(TrainingStep, "base_prediction", recorded_base)
    monkeypatch.setattr(TrainingStep, "prediction_loss", recorded_target)
    trainer, _ = _slider(pack, loaded_checkpoint, _concept(concept_dataset), tmp_path, steps=1,
                         slider_anchor="green square")
    assert [strengths for strengths, _ in targets] == [{1.0}, {1.0}, {-1.0}, {-1.0}], targets
    caption, positive, negative, anchor = base  # slider_loss asks the base model in this order
    direction = trainer.config.slider_guidance * (positive - negative)
    assert float(direction.norm()) > 0.01 * float(caption.norm()), "the two sides predict alike"
    (_, up), (_, anchor_up), (_, down), (_, anchor_down) = targets
    torch.testing.assert_close(up, caption + direction)
    torch.testing.assert_close(down, caption - direction)
    assert torch.equal(anchor_up, anchor) and torch.equal(anchor_down, anchor)


def test_a_slider_step_checkpointed_gives_the_same_gradients(pack, loaded_checkpoint, concept_dataset, tmp_path,
                                                             checkpoint_calls):
    """A checkpointed block is recomputed in the backward pass at the strength its forward ran at: the -1 pass is
    recomputed at -1, so the slider's gradients are those of the step without checkpointing."""
    dataset = _concept(concept_dataset)
    trained = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        _, network = _slider(pack, loaded_checkpoint, dataset, tmp_path / name, steps=2,
                             gradient_checkpointing=checkpointing)
        trained.append(network.state_dict())
    assert checkpoint_calls
    for key in trained[0]:
        torch.testing.assert_close(trained[0][key], trained[1][key], rtol=1e-4, atol=1e-6)


def _training_prompt(info: dict, checkpoint: str, dataset: dict, train: dict, prefix: str) -> dict:
    """Checkpoint -> Load Dataset (its report previewed) -> Train LoRA -> Save LoRA (fp32, `prefix`), each node's
    defaults under the given inputs."""
    train = {**default_inputs(info["LoraFoundryTrainLoRA"]), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
             "dataset": ["2", 0], "rank": 4, "alpha": 4.0, "targets": "attention", "learning_rate": 1e-3, **train}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoraFoundryLoadDataset",
              "inputs": {**default_inputs(info["LoraFoundryLoadDataset"]), "resolution": 64, **dataset}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "4": {"class_type": "LoraFoundryTrainLoRA", "inputs": train},
        "5": {"class_type": "LoraFoundrySaveLoRA", "inputs": {
            "lora": ["4", 0], "filename_prefix": prefix, "precision": "fp32", "folder": "loras", "overwrite": False}},
    }


# --- debiased estimation -------------------------------------------------------------------------------------------


def test_debiased_estimation_weights_each_sample_by_its_noise_level(pack, loaded_checkpoint, concept_dataset, tmp_path):
    """debiased_estimation multiplies each sample's loss by 1 / sqrt(SNR) of its timestep (kohya's
    debiased_estimation_loss), SNR = a / (1 - a) from SD1.5's published noise schedule; kohya configs and metadata carry
    it under kohya's names."""
    from lora_foundry.lora_core.settings import ss_metadata
    from lora_foundry.training.configs.reading import import_kohya
    from lora_foundry.training.engine.conditioning import image_geometry

    model, _, _ = loaded_checkpoint
    dataset = _concept(concept_dataset, count=1)
    losses = {}
    for debiased in (False, True):
        trainer = _trainer(pack, loaded_checkpoint, dataset, tmp_path / str(debiased), debiased_estimation=debiased)
        step = trainer.step
        with torch.inference_mode(False):
            trainer.data.encode_images(trainer.dataset.items)
            x0 = trainer.data.latents.get(0, False)[None]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
            sigmas = [step.sigmas(model, [level], x0) for level in (0.05, 0.3, 0.7, 0.98)]
            conditioning = trainer.text.conditioning(["sks"], "cpu")
            losses[debiased] = []
            for sigma in sigmas:
                with torch.no_grad():
                    x, inputs = step.model_call(model, x0, noise, sigma, conditioning,
                                                [image_geometry(dataset.items[0], False)])
                    losses[debiased].append(float(step.prediction_loss(model, x, x0, sigma, inputs, None, None)))
        if debiased:
            assert ss_metadata(trainer.config)["ss_debiased_estimation"] == "True"
    model_sampling = model.get_model_object("model_sampling")
    # SD1.5's schedule as published (scaled linear betas 0.00085 to 0.012), not the host's sigmas
    cumprod = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    for i, sigma in enumerate(sigmas):
        t = float(model_sampling.timestep(sigma))  # between two timesteps; the host keeps its schedule in float32 (0.1 %)
        a = cumprod[[math.floor(t), math.ceil(t)]]
        low, high = sorted(float(w) for w in ((1 - a) / a).sqrt())
        assert low * (1 - 3e-3) <= losses[True][i] / losses[False][i] <= high * (1 + 3e-3), (i, t, losses)
    assert losses[True][3] > 10 * losses[False][3]  # the noisiest sample counts most
    from lora_foundry.training.engine.objective import debiased_weight

    v_sigma = torch.tensor([0.1, 1.0, 10.0])  # v-prediction: 1 / (SNR + 1) = sigma^2 / (sigma^2 + sigma_data^2)
    torch.testing.assert_close(debiased_weight("v", v_sigma, 0.5), v_sigma ** 2 / (v_sigma ** 2 + 0.25))
    config = import_kohya({"debiased_estimation_loss": True, "min_snr_gamma": 5}, "kohya.toml")
    assert config.values["training"]["debiased_estimation"] is True


# --- multi-resolution ----------------------------------------------------------------------------------------------


def _sizes(concept_dataset, resolutions: str):
    from lora_foundry.training.data.dataset_options import DatasetOptions

    options = DatasetOptions(folder=str(concept_dataset), resolution=64, min_side=32, max_side=256, bucket_step=32,
                             resolutions=resolutions)
    return options.load(lambda name, setting: Path(name))


def test_multi_resolution_buckets_every_image_at_every_size(pack, concept_dataset):
    """resolutions = "64, 128": each image once in its 64-px bucket (about 64^2 pixels) and once in its 128-px one
    (about 128^2), in one epoch, each batch one size; a bad list is refused naming the setting."""
    one, both = _sizes(concept_dataset, ""), _sizes(concept_dataset, "64, 128")
    assert len(both.items) == 2 * len(one.items) and both.report.train_count == len(one.items)
    by_path: dict = {}
    for item in both.items:
        by_path.setdefault(item.path, []).append(item.bucket[0] * item.bucket[1])
    for areas in by_path.values():
        small, large = sorted(areas)
        assert abs(small / 64**2 - 1) < 0.3 and abs(large / 128**2 - 1) < 0.3, areas
    batches = both.epoch_order(0, 0, 4)
    assert sorted(i for b in batches for i in b) == sorted(i for i, it in enumerate(both.items) for _ in range(it.repeats))
    assert all(len({both.items[i].bucket for i in batch}) == 1 for batch in batches)
    assert "Resolutions: 64, 128 (each image bucketed at each" in both.report.summary()
    from lora_foundry.training.data.dataset_options import DatasetOptions

    with pytest.raises(ValueError, match="resolutions: 'big' is not a resolution"):
        DatasetOptions(resolutions="512, big")


@pytest.mark.server
def test_multi_resolution_trains_through_the_server(pack, server, tiny_checkpoint, concept_dataset, tmp_path):
    """Load Dataset with resolutions trains at both sizes: the cached latents of one image come at both sizes, the
    report and the LoRA's metadata say so."""
    from lora_foundry.lora_core.files import read_safetensors

    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(concept_dataset.rglob("*.png"))[:4]:
        shutil.copy(path, folder / path.name)
        shutil.copy(path.with_suffix(".txt"), folder / f"{path.stem}.txt")
    prompt = _training_prompt(server.object_info(), tiny_checkpoint.name,
                              {"folder": str(folder), "min_side": 32, "max_side": 256, "bucket_step": 32,
                               "resolutions": "64, 128"},
                              {"output_name": "multires", "steps": 2, "batch_size": 2, "cache_latents": "disk"},
                              "multires")
    outputs = server.run(prompt, timeout=600)
    assert "Resolutions: 64, 128" in outputs["3"]["text"][0]
    _, meta = read_safetensors(outputs["5"]["text"][0])
    assert json.loads(meta["lora_foundry_dataset_options"])["resolutions"] == "64, 128"
    from safetensors import safe_open

    image = sorted(folder.glob("*.png"))[0]
    cached = []
    for path in (image.parent / ".lora_foundry_cache").glob(f"{image.stem}-*.safetensors"):
        with safe_open(str(path), "pt") as f:
            cached.append(tuple(f.get_tensor(next(iter(f.keys()))).shape[-2:]))
    areas = sorted(h * w * 64 for h, w in cached)
    assert len(areas) >= 2 and abs(areas[0] / 64**2 - 1) < 0.3 and abs(areas[-1] / 128**2 - 1) < 0.3, cached


# --- through the server ---------------------------------------------------------------------------------------------


@pytest.mark.server
def test_features_through_the_server(pack, server, tiny_checkpoint, concept_dataset, tmp_path):
    """Load Dataset with masks and an empty-prompt prior, Train LoRA with per-block ranks / learning rates, EMA, output
    preservation, a 4-bit base and the best checkpoint; then Merge LoRA's post-hoc EMA over the run's checkpoints, all
    by HTTP."""
    from lora_foundry.lora_core.ema import gamma_of
    from lora_foundry.lora_core.files import read_safetensors

    images, masks = _masked_dataset(concept_dataset, tmp_path / "data", count=6)
    reg = tmp_path / "reg"
    reg.mkdir()
    for image in sorted(images.glob("*.png"))[:2]:
        shutil.copy(image, reg / image.name)
    info = server.object_info()
    from lora_foundry.lora_core.block_weights import SD1, block_of

    rates = ["1"] * 26  # BASE and every block; the middle block's adapters do not learn
    rates[SD1.all_ids.index("MID")] = "0"
    lrs = ",".join(rates)
    prompt = _training_prompt(
        info, tiny_checkpoint.name,
        {"folder": str(images), "min_side": 64, "max_side": 64, "bucket_step": 64, "validation_split": 0.2,
         "mask_folder": str(masks), "reg_folder": str(reg), "reg_empty_prompt": True},
        {"output_name": "features", "steps": 6, "save_every": 2, "validation_every": 2, "keep_best": True,
         "ema_decay": 0.5, "mask_floor": 0.1, "block_lrs": lrs, "trigger_word": "sks", "preservation_class": "toy",
         "preservation_weight": 0.5, "base_quantization": "nf4"},
        "features_final")
    outputs = server.run(prompt, timeout=600)
    final, _ = read_safetensors(outputs["5"]["text"][0])
    learnt = {block_of(k.split(".")[0], SD1) == "MID": [] for k in final}
    for key, value in final.items():
        if key.endswith("lora_up.weight"):
            learnt[block_of(key.split(".")[0], SD1) == "MID"].append(bool(value.abs().sum() > 0))
    assert learnt[True] and not any(learnt[True]) and all(learnt[False]), learnt  # MID at rate 0, the rest at 1
    report = outputs["3"]["text"][0]
    assert "Masks (" in report and "6 image(s) masked, 0 without" in report, report  # prior images have none
    run = server.base_dir / "models" / "loras" / "features"
    names = sorted(p.name for p in run.glob("*.safetensors"))
    assert {"features-step000002.safetensors", "features-step000004.safetensors", "features-best.safetensors",
            "features-ema.safetensors"} <= set(names), names
    _, meta = read_safetensors(run / "features-ema.safetensors")
    training = json.loads(meta["lora_foundry_training"])
    assert meta["ss_masked_loss"] == "True" and training["ema_decay"] == 0.5 and training["block_lrs"] == lrs
    assert training["keep_best"] and training["mask_floor"] == 0.1
    assert training["preservation_class"] == "toy" and training["preservation_weight"] == 0.5
    assert training["base_quantization"] == "nf4"
    assert json.loads(meta["lora_foundry_dataset"]) == {"masks": str(masks), "masked_images": 6,
                                                        "reg_empty_prompt": True}

    merge = {**default_inputs(info["LoraFoundryMergeLoRA"]), "mode": "post-hoc ema",
             "lora_1": "features/features-step000004.safetensors", "ema_sigma_rel": 0.2}
    prompt = {"1": {"class_type": "LoraFoundryMergeLoRA", "inputs": merge},
              "2": {"class_type": "LoraFoundrySaveLoRA", "inputs": {
                  "lora": ["1", 0], "filename_prefix": "features_ema", "precision": "fp32", "folder": "loras",
                  "overwrite": False}}}
    outputs = server.run(prompt, timeout=300)
    assert "post-hoc EMA (sigma_rel 0.2) of 2 checkpoints: step 2" in outputs["1"]["text"][0]
    tensors, meta = read_safetensors(outputs["2"]["text"][0])
    steps = [read_safetensors(run / f"features-step00000{s}.safetensors")[0] for s in (2, 4)]
    # EDM2's power EMA, independent of the file's own record: checkpoint i stands for the steps since the one before,
    # weighted by the integral of t^gamma over them (gamma from sigma_rel, checked in the test above).
    power = gamma_of(0.2) + 1
    raw = [(2 / 4) ** power, 1 - (2 / 4) ** power]
    weights = [w / sum(raw) for w in raw]
    recorded = list(json.loads(meta["lora_foundry_post_hoc_ema"])["checkpoints"].values())
    assert recorded == pytest.approx(weights)
    key = next(k for k in tensors if "lora_up" in k and block_of(k.split(".")[0], SD1) != "MID")
    assert not torch.equal(steps[0][key], steps[1][key])
    torch.testing.assert_close(tensors[key], weights[0] * steps[0][key] + weights[1] * steps[1][key], rtol=1e-4,
                               atol=1e-6)


def test_a_slider_trains_through_the_server_and_slides_both_ways_in_loraloader(pack, server, tiny_checkpoint,
                                                                               concept_dataset, caplog):
    """Train LoRA with slider_positive / slider_negative by HTTP; the file keeps its settings, ComfyUI's LoraLoader
    patches every key, and the same seed samples differently at -2, 0 and +2 (the stack's strength range)."""
    import logging

    import comfy.sd
    import comfy.utils
    from lora_foundry.lora_core.files import read_safetensors
    from safetensors.torch import load_file

    info = server.object_info()
    prompt = _training_prompt(
        info, tiny_checkpoint.name, {"folder": str(concept_dataset), "min_side": 64, "max_side": 64,
                                     "bucket_step": 64},
        {"output_name": "slider", "steps": 4, "batch_size": 2, "slider_positive": "red", "slider_negative": "blue",
         "slider_target": "sks", "slider_anchor": "a green square", "slider_guidance": 2.0}, "slider_final")
    outputs = server.run(prompt, timeout=600)
    assert "a concept slider: +1 toward 'red', -1 toward 'blue'" in outputs["4"]["text"][0]
    path = Path(outputs["5"]["text"][0])
    _, meta = read_safetensors(path)
    training = json.loads(meta["lora_foundry_training"])
    assert (training["slider_positive"], training["slider_negative"], training["slider_target"],
            training["slider_anchor"], training["slider_guidance"]) == ("red", "blue", "sks", "a green square", 2.0)

    lora = path.relative_to(server.base_dir / "models" / "loras").as_posix()
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
             "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    for i, strength in enumerate((-2.0, 0.0, 2.0)):
        graph.update({
            f"lora{i}": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                                 "lora_name": lora, "strength_model": strength,
                                                                 "strength_clip": strength}},
            f"text{i}": {"class_type": "CLIPTextEncode", "inputs": {"clip": [f"lora{i}", 1], "text": "sks circle"}},
            f"sample{i}": {"class_type": "KSampler", "inputs": {
                "model": [f"lora{i}", 0], "positive": [f"text{i}", 0], "negative": [f"text{i}", 0],
                "latent_image": ["latent", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                "scheduler": "normal", "denoise": 1.0}},
            f"save{i}": {"class_type": "SaveLatent", "inputs": {"samples": [f"sample{i}", 0],
                                                                "filename_prefix": f"slider_latent_{i}"}}})
    outputs = server.run(graph, timeout=300)
    latents = [load_file(server.output_files({"s": outputs[f"save{i}"]})[0])["latent_tensor"]
               for i in range(3)]
    assert not torch.equal(latents[0], latents[1]) and not torch.equal(latents[1], latents[2])
    assert not torch.equal(latents[0], latents[2])

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    caplog.set_level(logging.WARNING)
    comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(path)), -2.0, -2.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]


def test_block_ranks_of_a_dit_follow_its_block_lists(pack):
    """An SD3-layout model (two joint blocks): the short vector gives the block list its rank, the long one each
    block; 0 drops a block."""
    from harness.families import build_family
    from lora_foundry.lora_core.block_weights import block_of, layout_of
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig

    fam = build_family("sd3")
    layout = layout_of(fam.model)
    assert layout.short_ids == ["BASE", "J"] and layout.all_ids == ["BASE", "J00", "J01"]
    with torch.inference_mode(False):
        short = LoraNetwork.create(NetworkConfig(rank=4, preset="all", block_ranks="1,2"), fam.model)
        long = LoraNetwork.create(NetworkConfig(rank=4, preset="all", block_ranks="1,0,8"), fam.model)
    blocks = {name: block_of(name, layout) for name in short.adapters}
    assert {"J00", "J01", None} <= set(blocks.values())
    for name, adapter in short.adapters.items():
        assert adapter.rank == (2 if blocks[name] else 4), name  # outside every block: the rank
    kept = {block_of(name, layout): a.rank for name, a in long.adapters.items()}
    assert "J00" not in kept and kept["J01"] == 8
    with pytest.raises(ValueError, match="whole numbers"):
        with torch.inference_mode(False):
            LoraNetwork.create(NetworkConfig(rank=4, preset="all", block_ranks="1,2.5"), fam.model)
