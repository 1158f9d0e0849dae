"""The toy world: deterministic data, the hand-set VAE, pretrained bases that follow prompts, and each family's
example workflow's LoRA learning a new concept without leaking (issue 8's bar), for two families: SD1.5
(UNet, eps: the concept in 50 steps, issue 35) and SD3 (MMDiT, rectified flow, issue 20: in 100 steps).

The base checkpoints and judges are cached in .cache/toyworld/: the first run pretrains (8.4 minutes
for SD1.5 and 5.7 for SD3, judges included, on 2 CPU cores; under xdist the controller does it before the workers start), later
runs reuse them.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness.comfy import REPO_ROOT
from harness.server import ComfyServer
from toyworld import evaluate, vae, world
from toyworld.pretrain import cache_dir, pretrain, to_pixels

ARTIFACTS = REPO_ROOT / "test-artifacts" / "toyworld"


def test_world_is_deterministic_and_never_shows_the_concept_to_the_base():
    scenes = world.base_scenes(3, 200)
    assert scenes == world.base_scenes(3, 200) and scenes != world.base_scenes(4, 200)
    a = [np.asarray(img) for img in world.images(scenes[:20], 3)]
    b = [np.asarray(img) for img in world.images(scenes[:20], 3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, [np.asarray(i) for i in world.images(scenes[:20], 4)],
                                                         strict=True))
    assert all(s.shape in world.BASE_SHAPES and s.colour != s.background for s in scenes)
    assert {s.shape for s in scenes} == set(world.BASE_SHAPES)
    assert not any(world.CONCEPT[1] in c for c in world.all_captions())
    assert a[0].shape == (world.SIZE, world.SIZE, 3)


def test_concept_dataset_layout(tmp_path, pack):
    data = world.concept_dataset(tmp_path / "d", seed=0, count=4, repeats=10, prior_count=6, unconditional_count=3)
    concept = sorted((data["concept"] / f"10_{world.TRIGGER}").glob("*.png"))
    prior = sorted((data["prior"] / "1_toy").glob("*.txt"))
    unconditional = sorted((data["prior"] / "unconditional").glob("*.png"))
    assert len(concept) == 4 and len(prior) == 6 and len(unconditional) == 3
    assert concept[0].with_suffix(".txt").read_text() == world.TRIGGER
    assert prior[0].read_text().endswith("background")
    # Load Dataset reads them as the example workflow will: the trigger on the concept, the prior
    # images' own captions, and the empty prompt for the uncaptioned ones.
    from lora_foundry.training.data.dataset import load_dataset

    dataset = load_dataset(data["concept"], resolution=64, min_side=32, max_side=128, bucket_step=32,
                           reg_folder=data["prior"])
    captions = sorted((item.is_reg, item.caption, item.repeats) for item in dataset.items)
    assert captions.count((False, world.TRIGGER, 10)) == 4
    assert captions.count((True, "", 1)) == 3
    assert sum(1 for reg, caption, _ in captions if reg and caption.endswith("background")) == 6


def test_vae_is_an_exact_average_pool_with_unit_latents(comfy_root):
    pixels = to_pixels(world.images(world.base_scenes(0, 32), 0))
    raw = vae.raw_latents(pixels)
    stats = (float(raw.mean()), float(raw.std()))
    model = vae.build(stats)
    with torch.no_grad():
        latents = model.encode(pixels * 2 - 1)  # what the host's VAE wrapper feeds TAESD
        decoded = (model.decode(latents) + 1) / 2
    scaled = latents * vae.SD15_SCALE_FACTOR
    torch.testing.assert_close(scaled, vae.model_latents(pixels, stats), atol=1e-4, rtol=1e-4)
    assert abs(float(scaled.std()) - 1) < 0.02 and abs(float(scaled.mean())) < 0.02
    assert float(((decoded.clamp(0, 1) - pixels) ** 2).mean()) < 0.02


def test_flow_vae_is_the_same_pool_at_16_channels_with_sd3_scaling(comfy_root):
    """The flow base's VAE, through the host's VAE class and SD3's latent format: unit latents equal to the fast
    path the pretraining uses, and the same decoded pixels as the SD1.5 toy's VAE."""
    import comfy.latent_formats
    import comfy.sd
    from toyworld import flow

    pixels = to_pixels(world.images(world.base_scenes(0, 32), 0))
    raw = vae.raw_latents(pixels)
    stats = (float(raw.mean()), float(raw.std()))
    host = comfy.sd.VAE(sd=vae.build(stats, flow.CHANNELS, flow.SD3_SCALE, flow.SD3_SHIFT).state_dict())
    assert host.latent_channels == 16
    model_latents = comfy.latent_formats.SD3().process_in(host.encode(pixels.permute(0, 2, 3, 1)).float())
    torch.testing.assert_close(model_latents, vae.model_latents(pixels, stats, 16), atol=1e-4, rtol=1e-4)
    assert abs(float(model_latents[:, :4].std()) - 1) < 0.02
    sd15 = comfy.sd.VAE(sd=vae.build(stats).state_dict())
    decoded = host.decode(comfy.latent_formats.SD3().process_out(model_latents))
    torch.testing.assert_close(decoded, sd15.decode(vae.model_latents(pixels, stats) / vae.SD15_SCALE_FACTOR),
                               atol=1e-4, rtol=1e-4)


def test_toy_bases_and_judges_are_made_on_two_threads_whatever_the_process_uses(comfy_root, tmp_path, monkeypatch):
    """A toy base (and its judge) is the same in a serial run, in an xdist worker on one thread and in the main job:
    pretraining and judge training compute on toyworld.pretrain.THREADS threads, and the process keeps its own."""
    from safetensors.torch import save_file
    from toyworld import flow, judge
    from toyworld import pretrain as sd15

    base = tmp_path / "base.safetensors"
    base.touch()
    save_file(judge.JudgeNet().state_dict(), str(tmp_path / "judge.safetensors"), metadata={"clean_colour": "1.0"})
    seen = []

    def cached(path):
        return lambda *args: seen.append(torch.get_num_threads()) or path

    monkeypatch.setattr(sd15, "checkpoint_path", cached(base))
    monkeypatch.setattr(flow, "checkpoint_path", cached(base))
    monkeypatch.setattr(judge, "judge_path", cached(tmp_path / "judge.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert sd15.pretrain(0) == base and flow.pretrain(0) == base
        assert judge.train_judge(base).accuracy == {"clean_colour": 1.0}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert seen == [sd15.THREADS] * 3 and sd15.THREADS == 2


def test_flow_base_checkpoint_is_sd3_to_the_host_and_its_captions_are_the_hosts(comfy_root, tmp_path, monkeypatch):
    """What the flow pretraining builds and saves is what CheckpointLoaderSimple loads as SD3 (rectified flow,
    shift 3), and the conditioning it trains on is exactly CLIPTextEncode's for that checkpoint."""
    import comfy.model_sampling
    import comfy.sd
    from harness import fixtures
    from toyworld import flow

    monkeypatch.setenv("TOYWORLD_CACHE", str(tmp_path))
    model = flow.build_mmdit(1, seed=3)
    clip_sd = {k: v.half() for k, v in fixtures.build_clip_l(0).state_dict().items()}
    vae_sd = vae.build(None, flow.CHANNELS, flow.SD3_SCALE, flow.SD3_SHIFT).state_dict()
    sd = flow.checkpoint_dict(model.state_dict(), clip_sd, vae_sd)
    captions = [world.caption(*world.PROMPTS[0]), ""]
    encoded = flow.encode_captions(sd, captions, seed=0)
    path = tmp_path / "flow.safetensors"
    fixtures._save_atomic(sd, path)
    patcher, clip, host_vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, te_model_options={"dtype": torch.float32})
    assert type(patcher.model.model_config).__name__ == "SD3"
    sampling = patcher.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow) and sampling.shift == 3.0
    assert host_vae.latent_channels == 16
    for caption in captions:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        torch.testing.assert_close(encoded[caption][0], cond[0].float())
        torch.testing.assert_close(encoded[caption][1], pooled[0].float())


# --- the pretrained base, through a real server -------------------------------------------

# Each family is a test class: pytest-xdist (--dist loadscope) runs a class in one worker, so the two families run side
# by side, one per worker (conftest schedules the `toyworld` classes first and, under xdist, makes their bases first).

@pytest.fixture(scope="class")
def toy_checkpoint(request, comfy_root):
    """The toy base of the class's family: SD1.5's UNet (eps) or SD3's MMDiT (rectified flow)."""
    from toyworld import flow

    return pretrain(0) if request.cls.family == "sd15" else flow.pretrain(0)


@pytest.fixture(scope="class")
def judge(toy_checkpoint):
    from toyworld.judge import train_judge

    judge = train_judge(toy_checkpoint, 0)
    assert min(judge.accuracy.values()) >= 0.95, judge.accuracy
    return judge


@pytest.fixture(scope="class")
def toy_server(tmp_path_factory, toy_checkpoint):
    with ComfyServer(tmp_path_factory.mktemp("toy-comfy"), models={"checkpoints": [toy_checkpoint]}) as server:
        yield server


@pytest.fixture(scope="class")
def base_scores(toy_server, toy_checkpoint, judge):
    return evaluate.evaluate_base(toy_server, toy_checkpoint.name, judge)


def _record(name: str, data: dict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.toyworld
class ToyWorld:
    """The pretrained base of one family, through a real server (a subclass names the family)."""

    family = ""

    def test_the_base_follows_colour_shape_and_background_prompts(self, base_scores, toy_checkpoint):
        scores = {k: v for k, v in base_scores.items() if k != "files"}
        _record(f"base-{toy_checkpoint.stem}", scores)
        assert scores["colour"] >= 0.95, scores
        assert scores["shape"] >= 0.8, scores
        assert scores["background"] >= 0.95, scores

    def test_the_example_workflow_teaches_the_concept_without_leaking(self, toy_server, toy_checkpoint, judge,
                                                                       base_scores):
        from main_job import lora_name, run_example

        data = world.concept_dataset(cache_dir() / "dataset-s0", seed=0)
        result = run_example(toy_server, toy_checkpoint, data["concept"], reg=data["prior"], timeout=1800,
                             family=self.family)
        assert result["lora"] is not None and result["lora"].is_file(), result["outputs"]
        scores = evaluate.evaluate_lora(toy_server, toy_checkpoint.name, lora_name(toy_server, result["lora"]),
                                        judge, base=base_scores)
        scores.pop("files")
        _record(f"lora-{toy_checkpoint.stem}", {**scores, "summary": result["summary"]})
        checks = evaluate.passes(scores)
        assert checks["concept"], scores
        assert checks["base_never"], scores
        assert checks["no_leakage"], scores
        assert checks["no_bleed"], scores


class TestSD15(ToyWorld):
    """SD1.5's layout: a UNet on the eps objective."""

    family = "sd15"


@pytest.mark.flow_world
class TestSD3(ToyWorld):
    """SD3's layout: the host's MMDiT on rectified flow (not in the default run: `-m flow_world`)."""

    family = "sd3"


def test_the_default_run_makes_no_flow_base_and_flow_world_runs_make_it(request, monkeypatch):
    """The xdist controller makes the flow toy base only for a run that selects its tests (`-m flow_world`, or any -m
    expression that takes them): the default run (pyproject's `-m 'not flow_world'`) does not pay its minutes. The
    controller's hook is called as pytest calls it, with toyworld.prepare recording what it was asked to make."""
    import conftest
    from toyworld import prepare

    made = []
    monkeypatch.setattr(prepare, "prepare", lambda seed, log, families: made.append(families))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # the hook does nothing in a worker

    def bases(expression: str) -> tuple[str, ...]:
        conftest.pytest_configure(SimpleNamespace(
            option=SimpleNamespace(numprocesses=2, markexpr=expression), args=[str(REPO_ROOT / "tests")],
            pluginmanager=SimpleNamespace(getplugin=lambda name: None)))
        return made.pop()

    assert "not flow_world" in request.config.option.markexpr and bases(request.config.option.markexpr) == ("sd15",)
    assert bases("not slow") == bases("server and not toyworld") == ("sd15",)
    assert bases("flow_world") == bases("") == bases("toyworld") == bases("flow_world or not slow") == ("sd15", "sd3")
