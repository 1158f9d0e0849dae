"""Fit and fly: bypass adapters equal weight patching, fp8 bases stay untouched, weights stream under a budget,
the memory plan matches what a step really allocates, and out-of-memory stops cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

LAYERS = {
    "linear": lambda ops: ops.Linear(24, 20),
    "conv3x3_stride2": lambda ops: ops.Conv2d(8, 12, 3, stride=2, padding=1),
    "conv1x1": lambda ops: ops.Conv2d(8, 12, 1),
}
INPUTS = {"linear": (3, 5, 24), "conv3x3_stride2": (2, 8, 9, 9), "conv1x1": (2, 8, 6, 6)}
ALGORITHMS = {  # name: (class name, create options)
    "lora": ("LoRA", {}),
    "locon_tucker": ("LoRA", {"use_tucker": True}),
    "loha": ("LoHa", {}),
    "loha_tucker": ("LoHa", {"use_tucker": True}),
    "lokr": ("LoKr", {"factor": 4}),
    "lokr_full": ("LoKr", {"factor": 4, "full_matrix": True}),
    "dylora": ("DyLoRA", {"unit": 2, "seed": 3}),
    "oft": ("OFT", {}),
    "boft": ("BOFT", {"rank": 10}),  # two butterfly stages on both layer widths (20 = 10 x 2, 12 = 6 x 2)
    "glora": ("GLoRA", {}),
}


def _adapter(core, algorithm, layer, dora):
    name, options = ALGORITHMS[algorithm]
    options = dict(options)
    torch.manual_seed(1)
    adapter = getattr(core.adapters, name).create(layer.weight.detach(), options.pop("rank", 4), 3.0, **options)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # every factor nonzero: dW != 0
    if dora and name in ("OFT", "BOFT", "GLoRA"):
        with pytest.raises(ValueError, match="^dora: "):
            adapter.enable_dora(layer.weight.detach())
        return None
    if dora:
        adapter.enable_dora(layer.weight.detach())
        with torch.no_grad():
            adapter.dora_scale.mul_(1.5)
    return adapter


def test_every_registered_adapter_class_is_in_the_bypass_tests(pack):
    """A new adapter class fails here until bypass-equals-weights takes it."""
    from lora_foundry.lora_core.adapters import ALGORITHMS as REGISTERED

    assert {cls.__name__ for cls in REGISTERED.values()} <= {name for name, _ in ALGORITHMS.values()}


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_bypass_equals_weight_patching(core, algorithm, kind, dora):
    """Output and adapter gradients of the bypass form equal those of the layer run with W + dW (fp32)."""
    import comfy.ops

    torch.manual_seed(0)
    layer = LAYERS[kind](comfy.ops.disable_weight_init)
    with torch.no_grad():
        layer.weight.normal_(0, 0.2)
        layer.bias.normal_(0, 0.2)
    layer.requires_grad_(False)
    adapter = _adapter(core, algorithm, layer, dora)
    if adapter is None:  # refused, as checked
        return
    adapter.train()
    adapter.new_step()  # DyLoRA draws its rank: both forms must use it
    adapter.multiplier = 0.7
    x = torch.randn(INPUTS[kind])

    def patched():
        weight = adapter(layer.weight)
        if kind == "linear":
            return torch.nn.functional.linear(x, weight, layer.bias)
        return layer._conv_forward(x, weight, layer.bias)

    def grads(output):
        adapter.zero_grad()
        (output * torch.linspace(-1, 1, output.numel()).reshape(output.shape)).sum().backward()
        return [p.grad.clone() for p in adapter.parameters()]

    assert not torch.allclose(patched(), layer(x))  # the adapter changes the output
    torch.testing.assert_close(adapter.bypass(layer, x, layer(x)), patched(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(adapter.bypass(layer, x, layer(x))), grads(patched()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_network_dropout_drops_adapter_activations_only_while_training(core):
    """kohya's network_dropout: the adapter's rank activations are dropped in training, never in eval."""
    import comfy.ops

    layer = comfy.ops.disable_weight_init.Linear(32, 32)
    with torch.no_grad():
        layer.weight.normal_(0, 0.2)
        layer.bias.zero_()
    adapter = core.adapters.LoRA.create(layer.weight, 8, 8.0, dropout=0.5)
    with torch.no_grad():
        adapter.lora_up.normal_()
    x = torch.randn(4, 32)
    base = layer(x)
    adapter.eval()
    full = adapter.bypass(layer, x, base) - base
    torch.testing.assert_close(full, torch.nn.functional.linear(x, adapter.delta()))
    adapter.train()
    torch.manual_seed(0)
    dropped = adapter.bypass(layer, x, base) - base
    assert not torch.allclose(dropped, full)
    # Exactly a dropout on the down projection's output (scaled by 1 / (1 - p)), as kohya's LoRAModule does.
    torch.manual_seed(0)
    hidden = torch.nn.functional.dropout(x @ adapter.lora_down.T, 0.5)
    torch.testing.assert_close(dropped, hidden @ adapter.lora_up.T * (adapter.alpha / adapter.rank))


def test_network_dropout_needs_bypass(pack, family_sd15, tmp_path):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    fam, dataset = family_sd15
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(rank=4, network_dropout=0.1), fam.model)
        with pytest.raises(ValueError, match="network_dropout.*bypass"):
            Trainer(fam.model, fam.clip, fam.vae, dataset, net, TrainConfig(steps=1, attach="weights"))


# --- whole models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_sd15(pack, tmp_path_factory):
    """The SD1.5-layout family model and a four-image 64 px dataset (one held out)."""
    from harness.families import build_family
    from lora_foundry.training.data.dataset import load_dataset
    from PIL import Image

    folder = tmp_path_factory.mktemp("memory") / "2_toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        smooth = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(smooth).resize((64, 64), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red circle", "a blue square", "a green circle", "a red square"][i])
    fam = build_family("sd15")
    dataset = load_dataset(folder.parent, resolution=64, min_side=64, max_side=64, bucket_step=64,
                           validation_split=0.25, seed=1)
    return fam, dataset


def _train(fam, dataset, model=None, network=None, on_step=None, **settings):
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model = model if model is not None else fam.model
    config = {"steps": 6, "batch_size": 2, "learning_rate": 5e-3, "seed": 0, **settings}
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(**{"rank": 4, "alpha": 4, "preset": "all", **(network or {})}), model)
        trainer = Trainer(model, fam.clip, fam.vae, dataset, net, TrainConfig(**config), on_step=on_step)
        return trainer, trainer.run()


def _attached_as(model) -> set[str]:
    """How adapters act on the loaded model's layers now: "bypass" (an object patch of the layer's forward) and / or
    "weights" (a weight wrapper the host calls when it casts the weight)."""
    modes = set()
    for module in model.model.diffusion_model.modules():
        if type(vars(module).get("forward")).__name__ == "BypassForward":
            modes.add("bypass")
        if getattr(module, "weight_function", None):
            modes.add("weights")
    return modes


def _adapter_tensors(result):
    return {k: v.clone() for k, v in result.network.state_dict_kohya().items()}


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "oft"])
def test_bypass_training_equals_weight_training(family_sd15, algorithm):
    """A run attached in bypass mode trains the same adapter as one attached as weight wrappers."""
    fam, dataset = family_sd15
    network = {"algorithm": algorithm, "dora": algorithm == "lora"}
    # SGD: Adam's normalised steps would turn float rounding in near-zero gradients into visible differences.
    settings = {"optimizer": "SGD", "learning_rate": 0.05}
    modes = {"bypass": [], "weights": []}  # how the adapters act at each step of each run
    _, bypass = _train(fam, dataset, network=network, attach="bypass",
                       on_step=lambda info: modes["bypass"].append(_attached_as(fam.model)), **settings)
    _, weights = _train(fam, dataset, network=network, attach="weights",
                        on_step=lambda info: modes["weights"].append(_attached_as(fam.model)), **settings)
    assert modes == {mode: [{mode}] * 6 for mode in modes}, modes  # each run trained attached as it was asked
    a, b = _adapter_tensors(bypass), _adapter_tensors(weights)
    assert a.keys() == b.keys()
    zero_at_start = [k for k in a if k.endswith(("lora_up.weight", "hada_w2_a", "lokr_w1", "oft_blocks"))]
    assert zero_at_start and all(a[k].abs().sum() > 0 for k in zero_at_start)  # both runs trained the adapter
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)
    assert bypass.losses[0] == pytest.approx(weights.losses[0], rel=1e-5)


def test_weight_wrappers_leave_the_shared_model_with_the_run(family_sd15):
    """After a weights-mode run no layer of the shared model still computes with the run's adapters (the host leaves
    a fully loaded clone's wrappers on its layers), so the next run's plan simulates its own adapters only."""
    fam, dataset = family_sd15
    _train(fam, dataset, steps=1, attach="weights")
    left = [name for name, m in fam.model.model.named_modules() if getattr(m, "weight_function", None)]
    assert not left, left[:5]


def test_bypass_patches_leave_with_the_clone(family_sd15):
    """After a bypass run the shared model computes exactly as before it: the clone's layer patches are undone."""
    import comfy.model_management as mm
    from lora_foundry.training.engine.conditioning import apply_model, image_geometry, model_inputs

    fam, dataset = family_sd15
    trainer, result = _train(fam, dataset, steps=2)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = model_inputs(fam.model.model, trainer.text.conditioning(["a red circle"], "cpu"), x,
                          [image_geometry(dataset.items[0])], None)

    def output():
        with torch.no_grad():
            mm.load_models_gpu([fam.model], force_full_load=True)
            return apply_model(fam.model.model, x, torch.tensor([3.0]), inputs)

    after = output()
    with torch.inference_mode(False):
        attached, _ = result.network.attach(fam.model, mode="bypass")
        mm.load_models_gpu([attached], force_full_load=True)
        with torch.no_grad():
            trained = apply_model(attached.model, x, torch.tensor([3.0]), inputs)
    assert not torch.allclose(trained, after)  # the bypass patches do act while their clone is loaded
    torch.testing.assert_close(output(), after)  # and leave when the shared model is loaded again
    # No training wrapper (checkpointing, bypass) stays on a shared module; the host's undo leaves the class's own
    # forward bound on the instance.
    leftovers = [name for name, m in fam.model.model.diffusion_model.named_modules() if "forward" in vars(m) and
                 getattr(vars(m)["forward"], "__func__", None) is not type(m).forward]
    assert not leftovers
    layer = fam.model.model.diffusion_model.input_blocks[1][1].proj_in
    assert type(vars(layer).get("forward")).__name__ != "BypassForward"


def _state(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_training_on_an_fp8_base_leaves_it_bit_identical(family_sd15, dtype):
    """UNETLoader's fp8 weight dtypes: bypass training computes in fp32, learns, and never writes a base weight."""
    import comfy.sd

    fam, dataset = family_sd15
    fp8 = comfy.sd.load_diffusion_model_state_dict(_state(fam.model), model_options={"dtype": dtype})
    layer = fp8.model.diffusion_model.input_blocks[1][1].proj_in
    assert layer.weight.dtype == dtype and layer.comfy_cast_weights  # stored fp8, cast at each use by the host
    before = _state(fp8)
    trainer, result = _train(fam, dataset, model=fp8, steps=12, validation_every=12)
    after = _state(fp8)
    assert before.keys() == after.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8))
               if before[k].dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else torch.equal(after[k], before[k])
               for k in before)
    assert trainer.context.compute_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in result.network.parameters())
    from lora_foundry.training.engine.evaluation import held_out_loss

    with torch.inference_mode(False):
        base = held_out_loss(trainer.step, trainer.network, fp8, fp8.load_device)
    assert result.validation[-1][1] < 0.9 * base, (base, result.validation)


def test_training_on_a_4bit_base_computes_from_nf4_and_leaves_the_model_alone(family_sd15, monkeypatch):
    """base_quantization nf4: while the run trains, every Linear layer holds its weight as bitsandbytes' packed NF4
    (what the host moves to the device; the plan counts that size), its forward and DoRA's read of the weight
    dequantize it at each step, the adapter learns, and the model's own weights come back bit-identical."""
    import bitsandbytes.functional
    from lora_foundry.training.engine.evaluation import held_out_loss

    fam, dataset = family_sd15
    before = _state(fam.model)
    linears = [m for m in fam.model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    dequantize, dequantized, seen = bitsandbytes.functional.dequantize_4bit, [0], []

    def counted(*args, **kwargs):
        dequantized[0] += 1
        return dequantize(*args, **kwargs)

    monkeypatch.setattr(bitsandbytes.functional, "dequantize_4bit", counted)

    def on_step(info):
        seen.append(({m.weight.dtype for m in linears}, dequantized[0]))

    trainer, result = _train(fam, dataset, network={"dora": True}, steps=12, validation_every=12,
                             base_quantization="nf4", on_step=on_step)
    assert [dtypes for dtypes, _ in seen] == [{torch.uint8}] * 12  # every Linear packed in 4 bits at every step
    calls = [c for _, c in seen]
    per_step = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert min(per_step) >= 2 * len(linears), (len(linears), per_step)  # each Linear's forward, and DoRA's read
    plan, saved = trainer.context.plan, trainer.context.quantized
    assert 0.8 * linear_bytes < saved < 0.9 * linear_bytes  # fp32 -> 4 bits and a scale per 64 values
    assert plan.weights == fam.model.model_size() - saved
    after = _state(fam.model)
    assert before.keys() == after.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(type(vars(m).get("forward")).__name__ in ("NF4Forward", "BypassForward") for m in linears)
    with torch.inference_mode(False):
        base = held_out_loss(trainer.step, trainer.network, fam.model, fam.model.load_device)
    assert result.validation[-1][1] < 0.9 * base, (base, result.validation)


def test_a_4bit_base_is_refused_where_it_cannot_run(family_sd15, monkeypatch):
    """Weight-wrapper attaching cannot compute from 4-bit weights, and a device without bitsandbytes' 4-bit kernels
    is named before anything is quantized."""
    import bitsandbytes.functional
    from lora_foundry.training.engine.quantize import check_device

    fam, dataset = family_sd15
    with pytest.raises(ValueError, match="base_quantization nf4: .* set attach = bypass"):
        _train(fam, dataset, steps=1, attach="weights", base_quantization="nf4")
    check_device(torch.device("cpu"))

    def no_kernel(*args, **kwargs):  # what bitsandbytes raises on a backend it has no 4-bit kernel for
        raise NotImplementedError("quantize_4bit is not implemented for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    with pytest.raises(ValueError, match=r"base_quantization nf4: bitsandbytes has no 4-bit kernel for cpu"):
        _train(fam, dataset, steps=1, base_quantization="nf4")


def test_training_dora_on_a_scaled_fp8_base_leaves_it_bit_identical(family_sd15):
    """A scaled-fp8 diffusion model (fp8 weights, a scale per Linear, the `scaled_fp8` marker the host detects): DoRA
    in bypass mode reads each weight as the host computes with it (scale applied), learns, and writes no base weight."""
    import comfy.sd

    fam, dataset = family_sd15
    fp8 = torch.float8_e4m3fn
    state = {}
    for key, value in _state(fam.model).items():
        if key.endswith(".weight") and value.ndim == 2:  # Linear: stored as weight / scale, the scale beside it
            scale = value.abs().max().float() / torch.finfo(fp8).max
            state[key], state[key.removesuffix("weight") + "scale_weight"] = (value / scale).to(fp8), scale
        else:
            state[key] = value.to(fp8) if key.endswith(".weight") and value.ndim > 2 else value
    state["scaled_fp8"] = torch.empty(0, dtype=fp8)
    scaled = comfy.sd.load_diffusion_model_state_dict(state)
    layer = scaled.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    assert layer.weight.dtype == fp8 and float(layer.scale_weight) != 1.0  # the host reads our file as scaled fp8
    # A new DoRA adapter changes nothing: its magnitudes are the norms of the weights the host computes with.
    import comfy.model_management as mm
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.conditioning import apply_model, encode_caption, image_geometry, model_inputs

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = model_inputs(scaled.model, [encode_caption(fam.clip, "a red circle")], x,
                          [image_geometry(dataset.items[0])], None)
    with torch.inference_mode(False), torch.no_grad():
        mm.load_models_gpu([scaled], force_full_load=True)
        plain = apply_model(scaled.model, x, torch.tensor([3.0]), inputs)
        fresh, _ = LoraNetwork.create(NetworkConfig(dora=True), scaled).attach(scaled, mode="bypass")
        mm.load_models_gpu([fresh], force_full_load=True)
        torch.testing.assert_close(apply_model(fresh.model, x, torch.tensor([3.0]), inputs), plain)
    mm.unload_all_models()
    before = _state(scaled)
    trainer, result = _train(fam, dataset, model=scaled, network={"dora": True}, steps=12, validation_every=12)
    after = _state(scaled)
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) if before[k].dtype == fp8
               else torch.equal(after[k], before[k]) for k in before)
    assert any(a.dora_scale is not None for a in result.network.adapters.values())
    from lora_foundry.training.engine.evaluation import held_out_loss

    with torch.inference_mode(False):
        base = held_out_loss(trainer.step, trainer.network, scaled, scaled.load_device)
    assert result.validation[-1][1] < 0.9 * base, (base, result.validation)


def test_weights_stream_under_a_budget_and_train_the_same_adapter(family_sd15, monkeypatch):
    """A budget below the model's size: the plan's share of the weights stays on the device, the host keeps the rest
    in RAM and casts it in at every use, in the forward pass and again in the backward pass (checkpointed blocks);
    the adapter equals in-memory training."""
    import comfy.model_management as mm
    import comfy.ops

    fam, dataset = family_sd15
    casts = []
    original = comfy.ops.cast_bias_weight
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", lambda *a, **k: casts.append(1) or original(*a, **k))
    per_step = []

    def on_step(info):
        streamed = sum(1 for m in fam.model.model.modules() if getattr(m, "comfy_cast_weights", False))
        loaded = [m.model.loaded_size() for m in mm.current_loaded_models if m.model.model is fam.model.model]
        per_step.append((len(casts), streamed, loaded))

    size = fam.model.model_size()
    settings = {"steps": 3, "optimizer": "SGD", "learning_rate": 0.05}
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(rank=4, alpha=4, preset="all"), fam.model)
        trainer = Trainer(fam.model, fam.clip, fam.vae, dataset, net,
                          TrainConfig(batch_size=2, seed=0, vram_budget_gb=0.5 * size / 1024**3, **settings),
                          on_step=on_step)
        streamed = trainer.run()
    resident = trainer.context.plan.resident_weights
    assert 0.1 * size < resident < size
    # The host loads whole layers, largest first, while they fit the plan's bytes (less one layer it keeps free to
    # stream the others through): what it reports loaded is the plan's share, within a layer.
    largest = max(sum(t.nbytes for t in m.parameters(recurse=False)) for m in fam.model.model.modules())
    assert all(len(loaded) == 1 and resident - largest <= loaded[0] <= resident for _, _, loaded in per_step), \
        (resident, largest, per_step)
    counts = [c for c, _, _ in per_step]
    layers = per_step[0][1]
    assert layers > 10
    for done, previous in zip(counts[1:], counts[:-1], strict=False):
        # Each streamed layer is cast in once in the forward pass, and again when its block is recomputed.
        assert layers < done - previous <= 2 * layers
    assert not any(getattr(m, "comfy_cast_weights", False) for m in fam.model.model.modules())  # undone after

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", original)
    _, in_memory = _train(fam, dataset, **settings)
    a, b = _adapter_tensors(streamed), _adapter_tensors(in_memory)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


def test_previews_keep_the_planned_residency(family_sd15):
    """A preview samples through the host, which loads all of the model it finds room for, and the VAE: after it,
    the VAE leaves the device and the weights go back to the plan's residency (the same streamed layers each step)."""
    import comfy.model_management as mm

    fam, dataset = family_sd15
    seen = []

    def on_step(info):
        streamed = sum(1 for m in fam.model.model.modules() if getattr(m, "comfy_cast_weights", False))
        vae_loaded = any(m.model is fam.vae.patcher for m in mm.current_loaded_models)
        seen.append((streamed, vae_loaded, info["preview"] is not None))

    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    budget = 0.5 * fam.model.model_size() / 1024**3
    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(rank=4, preset="all"), fam.model)
        trainer = Trainer(fam.model, fam.clip, fam.vae, dataset, net,
                          TrainConfig(steps=3, seed=0, vram_budget_gb=budget, sample_every=1, sample_steps=2,
                                      sample_prompts=["a red circle"]), on_step=on_step)
        trainer.run()
    assert all(preview for _, _, preview in seen)  # every step sampled (the host loaded the model for it)
    assert len({streamed for streamed, _, _ in seen}) == 1 and seen[0][0] > 10, seen
    assert not any(vae for _, vae, _ in seen), seen


@pytest.mark.parametrize("checkpointing, preservation, slider, blank", [
    (False, "", False, 0.0), (True, "", False, 0.0), (False, "toy", False, 0.0), (False, "", True, 0.0),
    (False, "", False, 1.0)],
    ids=["plain", "checkpointed", "preservation", "slider", "blank"])
def test_memory_plan_matches_what_a_step_allocates(family_sd15, checkpointing, preservation, slider, blank):
    """The plan's simulated step against the CPU allocator's own record of a real run (torch.profiler); also with
    output preservation or blank prompt preservation, whose second graph lives until the backward pass, and a concept
    slider (two graphs: +1, -1)."""
    from lora_foundry.training.data.captions import SliderSides
    from torch.profiler import ProfilerActivity, profile

    fam, dataset = family_sd15
    trainer, _ = _train(fam, dataset, steps=1)  # latents and captions encoded, out of the measured run
    trainer.config.gradient_checkpointing = checkpointing
    trainer.config.preservation_class = preservation  # no trigger word: the class captions are the captions
    trainer.text.classes = (preservation,) if preservation else ()
    trainer.config.slider_positive, trainer.config.slider_negative = ("red", "blue") if slider else ("", "")
    trainer.text.slider = SliderSides("red", "blue") if slider else None
    trainer.config.blank_preservation_weight = trainer.text.blank = blank
    trainer.text.encode("")  # as a run with blank prompt preservation encodes it up front
    trainer.config.steps = 1
    trainer.network = trainer.step.network = type(trainer.network).create(trainer.network.config, fam.model)
    with torch.inference_mode(False), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    params = trainer.network.num_params() * 4
    planned = trainer.context.plan.activations + trainer.context.plan.adapter - params  # parameters exist before the run
    assert trainer.context.plan.checkpointing == checkpointing
    assert 0.75 * peak <= planned <= 1.25 * peak, (checkpointing, preservation, slider, blank, planned, peak,
                                                    trainer.context.plan)


def test_vae_and_cached_text_encoder_leave_the_device_before_training(family_sd15):
    import comfy.model_management as mm

    fam, dataset = family_sd15
    loaded_during = []

    def on_step(info):
        loaded_during.append([m.model for m in mm.current_loaded_models])

    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    with torch.inference_mode(False):
        net = LoraNetwork.create(NetworkConfig(rank=4), fam.model)
        trainer = Trainer(fam.model, fam.clip, fam.vae, dataset, net, TrainConfig(steps=1, seed=0), on_step=on_step)
        trainer.data.encode_images(dataset.items)
        trainer.text.encode_fixed(dataset.items, dataset.validation)
        loaded = [m.model for m in mm.current_loaded_models]
        assert any(m is fam.vae.patcher for m in loaded) and any(m is fam.clip.patcher for m in loaded)
        trainer.run()
    assert not any(m is fam.vae.patcher or m is fam.clip.patcher for m in loaded_during[0])
    assert any(m.model is fam.model.model for m in loaded_during[0])  # the clone being trained is


def test_a_run_that_cannot_fit_stops_before_step_one_with_what_to_change(family_sd15):
    from lora_foundry.training.engine.trainer import TrainingError

    fam, dataset = family_sd15
    # The activations were simulated (not an unknown taken for 0).
    with pytest.raises(TrainingError, match=r"does not fit the device: estimated peak .*activations (?!0 GB)[\d.e-]+ GB"
                                            r".*To fit: .*batch_size"):
        _train(fam, dataset, vram_budget_gb=1e-4)


@pytest.mark.parametrize("where", ["forward", "update"])
def test_out_of_memory_stops_cleanly_with_the_last_adapter_kept(family_sd15, tmp_path, where):
    """A device OOM in step 3 (raised where CUDA raises it: the model's forward, or inside the optimizer's update):
    a clear error, and the adapter of step 2 kept (an update cut short is undone)."""
    from lora_foundry.lora_core.files import read_safetensors
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer, TrainingError

    fam, dataset = family_sd15
    calls = []
    adapters = []

    def fail_third_step(*args):
        from torch._subclasses.fake_tensor import is_fake

        if where == "forward" and is_fake(args[1][0]):  # the planner's simulated step
            return
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "forward":
        handle = fam.model.model.diffusion_model.register_forward_pre_hook(fail_third_step)
    else:  # after the update changed the adapter: as if it ran out of memory half-way
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(fail_third_step)
    try:
        with torch.inference_mode(False):
            net = LoraNetwork.create(NetworkConfig(rank=4), fam.model)
            trainer = Trainer(fam.model, fam.clip, fam.vae, dataset, net, TrainConfig(steps=5, seed=0),
                              output_dir=tmp_path, name="oom",
                              on_step=lambda info: adapters.append({k: v.clone() for k, v in
                                                                    net.state_dict_kohya().items()}))
            with pytest.raises(TrainingError, match="out of device memory at step 3.*kept at.*To fit: turn gradient"):
                trainer.run()
    finally:
        handle.remove()
    tensors, meta = read_safetensors(tmp_path / "oom-last-good.safetensors")
    assert len(adapters) == 2 and meta["ss_steps"] == "2"
    up = next(k for k in adapters[0] if k.endswith("lora_up.weight"))
    assert not torch.equal(adapters[0][up], adapters[1][up])  # step 2 changed the adapter: the two are told apart
    for key, value in adapters[-1].items():
        torch.testing.assert_close(tensors[key], value)


def test_offloaded_activations_go_through_ram_and_train_the_same_adapter(family_sd15, monkeypatch):
    """offload_activations: what autograd keeps for the backward pass is packed to the CPU (counted), same adapter."""
    fam, dataset = family_sd15
    packed = []
    original = torch.autograd.graph.save_on_cpu

    def counting(*args, **kwargs):
        hooks = original(*args, **kwargs)
        pack = hooks.pack_hook

        def pack_counted(tensor):
            packed.append(tensor.numel())
            return pack(tensor)

        hooks.pack_hook = pack_counted
        return hooks

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    settings = {"steps": 3, "optimizer": "SGD", "learning_rate": 0.05, "gradient_checkpointing": True}
    _, offloaded = _train(fam, dataset, offload_activations=True, **settings)
    assert len(packed) > 10  # the checkpointed blocks' inputs (and the layers outside blocks) went through it
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", original)
    _, kept = _train(fam, dataset, **settings)
    a, b = _adapter_tensors(offloaded), _adapter_tensors(kept)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8, msg=key)


def test_compiled_blocks_train_the_same_adapter(family_sd15, monkeypatch):
    """compile_blocks: the blocks run as torch.compile graphs (counted) and train the eager run's adapter.
    aot_eager traces and compiles as inductor does, without generating kernels (quick on a CPU)."""
    import torch._dynamo
    from lora_foundry.training.engine import blocks
    fam, dataset = family_sd15
    monkeypatch.setattr(blocks, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    settings = {"steps": 2, "optimizer": "SGD", "learning_rate": 0.05}
    _, compiled = _train(fam, dataset, compile_blocks=True, **settings)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    _, eager = _train(fam, dataset, **settings)
    a, b = _adapter_tensors(compiled), _adapter_tensors(eager)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    torch._dynamo.reset()
