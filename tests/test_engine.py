"""The adapter engine against the real host.

What we train (weight wrappers on ComfyUI's ModelPatcher), what we apply (`apply_lora`) and what
ComfyUI's own LoraLoader applies from our saved file must be one and the same model. Also here:
kohya names (SD1.5, SDXL, two text encoders), adapter sizes, unreadable files, DyLoRA export,
exact strength-0 / unpatch / bake, stacking, PEFT and ComfyUI-trainer files, and the training
path (gradients, partial loading, adapters moving with the model).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from harness import fixtures

NARROW_UNET = {
    **fixtures.SD15_TINY_UNET, "model_channels": 32, "context_dim": 64, "channel_mult": [1, 2],
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
}
# comfy/model_detection.py: unet_config_from_diffusers_unet's SD15 and SDXL.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
ALGORITHMS = ["lora", "locon", "loha", "lokr", "dylora", "oft", "boft", "glora"]
NO_DORA = ("oft", "boft", "glora")  # refused by name
# Targets of the equivalence matrix on the narrow UNet: linear layers (plus the 1x1 proj_in), and
# the kxk convolutions of ResBlocks, Downsample (stride 2) and Upsample.
LAYER_SETS = {
    "linear": {"preset": "attention", "include": ["*.ff.net.*", "*.proj_in"]},
    "conv": {"preset": "locon", "exclude": ["*transformer_blocks*", "*.proj_in", "*.proj_out", "*.emb_layers.*"]},
}
LOADER_COMPLAINTS = ("lora key not loaded", "NOT LOADED", "ERROR", "SHAPE MISMATCH")


# --- helpers ---------------------------------------------------------------------------------

def init_weights(module: torch.nn.Module, seed: int) -> None:
    """The fixtures' init, with every norm scale at 1 (GroupNorm `out.0` / `in_layers.0` would stay 0)."""
    fixtures.init_weights_(module, seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)


def make_patcher(unet_config: dict, kind: str = "SD15", meta: bool = False, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) around a UNet built in-process; on the meta device it costs nothing."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, kind)(unet_config)
    model_config.set_inference_dtype(torch.float16 if meta else torch.float32, None)
    with torch.device("meta" if meta else "cpu"):
        base = model_config.get_model({})
    if not meta:
        init_weights(base.diffusion_model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def narrow(comfy_root):
    return make_patcher(NARROW_UNET)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    return x, torch.tensor([5.0, 0.5]), torch.randn(2, 7, NARROW_UNET["context_dim"], generator=gen)


def unet_output(patcher, inputs, grad: bool = False) -> torch.Tensor:
    """The UNet's prediction with `patcher` loaded the way ComfyUI loads a model for sampling."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    x, sigma, context = inputs
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        return patcher.model.apply_model(x, sigma, c_crossattn=context)


def randomise(network, seed: int = 1, scale: float = 0.2) -> None:
    """Random factors everywhere (dW != 0) and random DoRA magnitudes around the weight norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for name, p in adapter.named_parameters():
                if name == "dora_scale":
                    p.mul_(0.5 + torch.rand(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)


def config_or_refused(core, algorithm: str, dora: bool, **settings):
    """The network config, or None after checking that it is refused naming dora (OFT / BOFT / GLoRA: ComfyUI has no
    DoRA form of them that matches LyCORIS')."""
    if dora and algorithm in NO_DORA:
        with pytest.raises(ValueError, match="^dora: "):
            core.Config(algorithm=algorithm, dora=dora, **settings)
        return None
    return core.Config(algorithm=algorithm, dora=dora, **settings)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def comfy_weight(patcher, key: str) -> torch.Tensor:
    """The weight ComfyUI computes from `patcher`'s patches for `key` (what patch_model writes)."""
    import comfy.lora

    weight = patcher.model.state_dict()[key].detach().float().clone()
    return comfy.lora.calculate_weight(patcher.patches[key], weight, key)


@pytest.fixture
def comfy_load(comfy_nodes, loras_dir, caplog):
    """ComfyUI's LoraLoader on our file in the "loras" folder; asserts it logged no complaint about any key."""
    def load(model, clip, path, strength: float = 1.0):
        assert path.parent == loras_dir
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            new_model, new_clip = comfy_nodes.LoraLoader().load_lora(model, clip, path.name, strength, strength)
        complaints = [r.getMessage() for r in caplog.records if any(c in r.getMessage() for c in LOADER_COMPLAINTS)]
        assert not complaints, "\n".join(complaints[:20])
        return new_model, new_clip

    return load


# --- 1. training attach == apply_lora == ComfyUI's LoraLoader ---------------------------------

def test_every_algorithm_the_node_offers_is_in_these_tests(pack):
    """A new algorithm (ALGORITHMS in lora_core/adapters) fails here until the tests below take it."""
    from lora_foundry.lora_core.network import ALGORITHM_CHOICES

    assert sorted(ALGORITHM_CHOICES) == sorted(ALGORITHMS)


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("layers", list(LAYER_SETS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trained_applied_and_comfy_loaded_models_are_the_same(core, narrow, inputs, loras_dir, comfy_load,
                                                              algorithm, layers, dora):
    config = config_or_refused(core, algorithm, dora, rank=4, alpha=3.0, **LAYER_SETS[layers])
    if config is None:
        return
    network = core.Network.create(config, narrow)
    kinds = {core.targets.layer_kind(m) for _, m in _target_modules(narrow, network)}
    assert ("conv" in kinds) == (layers == "conv") and ("linear" in kinds) == (layers == "linear")
    randomise(network)
    network.eval()

    base = unet_output(narrow, inputs)
    trained, _ = network.attach(narrow, None)
    y_trained = unet_output(trained, inputs)
    assert rel(y_trained, base) > 1e-2, "the adapter should change the output"

    tensors = network.state_dict_kohya()
    applied, _, report = core.apply.apply_lora(narrow, None, tensors)
    assert report.ok and sorted(report.applied) == sorted(network.adapters), report.summary()
    path = core.files.write_safetensors(tensors, loras_dir / f"{algorithm}-{layers}-{dora}.safetensors")
    loaded, _ = comfy_load(narrow, None, path)
    assert set(loaded.patches) == set(network.weight_keys.values())

    assert rel(unet_output(applied, inputs), y_trained) < 1e-4
    assert rel(unet_output(loaded, inputs), y_trained) < 1e-4


def _target_modules(patcher, network):
    modules = dict(patcher.model.named_modules())
    return [(key, modules[key[: -len(".weight")]]) for key in network.weight_keys.values()]


@pytest.mark.parametrize("algorithm", ["lora", "loha", "oft", "boft", "glora"])
@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
def test_strength_means_the_same_in_training_apply_and_comfy(core, narrow, inputs, loras_dir, comfy_load, algorithm, dora):
    config = config_or_refused(core, algorithm, dora, rank=4, alpha=3.0, preset="attention")
    if config is None:
        return
    network = core.Network.create(config, narrow)
    randomise(network, seed=2)
    network.eval()
    for adapter in network.adapters.values():
        adapter.multiplier = 0.4
    trained, _ = network.attach(narrow, None)
    tensors = network.state_dict_kohya()
    applied, _, _ = core.apply.apply_lora(narrow, None, tensors, strength_model=0.4)
    path = core.files.write_safetensors(tensors, loras_dir / f"strength-{algorithm}-{dora}.safetensors")
    loaded, _ = comfy_load(narrow, None, path, strength=0.4)
    y = unet_output(trained, inputs)
    assert rel(unet_output(applied, inputs), y) < 1e-4
    assert rel(unet_output(loaded, inputs), y) < 1e-4


@pytest.mark.parametrize("preset", ["kohya", "all"])
def test_comfy_loader_takes_every_key_of_a_full_network_with_text_encoder(core, loaded_checkpoint, loras_dir, comfy_load,
                                                                          preset):
    model, clip, _ = loaded_checkpoint
    network = core.Network.create(core.Config(preset=preset, text_encoder=True, rank=4, alpha=3.0), model, clip)
    randomise(network, scale=0.05)
    network.eval()
    path = core.files.write_safetensors(network.state_dict_kohya(), loras_dir / f"full-{preset}.safetensors")
    new_model, new_clip = comfy_load(model, clip, path)

    te = {n for n in network.adapters if n.startswith("lora_te_")}
    assert len(te) == 72  # 12 CLIP-L layers x (q, k, v, out_proj, fc1, fc2), as kohya counts them
    assert set(new_clip.patcher.patches) == {network.weight_keys[n] for n in te}
    assert set(new_model.patches) == {network.weight_keys[n] for n in network.adapters if n not in te}
    with torch.no_grad():
        for name, adapter in network.adapters.items():
            patcher = new_clip.patcher if name in te else new_model
            key = network.weight_keys[name]
            weight = patcher.model.state_dict()[key].float()
            assert rel(comfy_weight(patcher, key), adapter(weight)) < 1e-4, name


# --- 2. kohya names ----------------------------------------------------------------------------

def test_sd15_names_are_kohya_names_and_comfy_maps_each_to_our_layer(core, loaded_checkpoint):
    import comfy.lora

    model, clip, _ = loaded_checkpoint
    network = core.Network.create(core.Config(preset="kohya", text_encoder=True, rank=1), model, clip)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in network.adapters
    assert "lora_unet_mid_block_attentions_0_proj_in" in network.adapters
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj" in network.adapters
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in network.adapters
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in network.adapters
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    assert {n: key_map.get(n) for n in network.adapters} == network.weight_keys


def test_sdxl_names_follow_the_ldm_layout_and_comfy_maps_each_to_our_layer(core, comfy_root):
    import comfy.lora

    sdxl = make_patcher(SDXL_UNET, kind="SDXL", meta=True)
    kohya = core.Network.create(core.Config(preset="kohya", rank=1), sdxl)
    assert len(kohya.adapters) == 722  # kohya: "create LoRA for U-Net: 722 modules"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in kohya.adapters
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in kohya.adapters
    assert not [n for n in kohya.adapters if "down_blocks" in n or "up_blocks" in n]
    everything = core.Network.create(core.Config(preset="all", rank=1), sdxl)
    key_map = comfy.lora.model_lora_keys_unet(sdxl.model, {})
    assert {n: key_map.get(n) for n in everything.adapters} == everything.weight_keys


def test_two_text_encoders_are_lora_te1_and_lora_te2(core, comfy_root):
    import comfy.lora
    import comfy.sdxl_clip

    prefixes = core.kohya_keys.text_encoder_prefixes
    assert prefixes(["clip_g", "clip_l"]) == {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}
    assert prefixes(["clip_l"]) == {"clip_l": "lora_te_"}
    encoders = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    network = core.Network.create(core.Config(text_encoder=True, rank=1), None, SimpleNamespace(cond_stage_model=encoders))
    names = list(network.adapters)
    assert sum(n.startswith("lora_te1_") for n in names) == 72 and sum(n.startswith("lora_te2_") for n in names) == 192
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in names
    key_map = comfy.lora.model_lora_keys_clip(encoders, {})
    assert {n: key_map.get(n) for n in names} == network.weight_keys


# --- 3. sizes -------------------------------------------------------------------------------------

def test_adapter_sizes_on_the_full_sd15_unet(core, comfy_root):
    from safetensors.torch import save

    sd15 = make_patcher(SD15_UNET, meta=True)
    counts = {}
    for preset in ("attention", "kohya", "locon", "all"):
        network = core.Network.create(core.Config(preset=preset, rank=4, alpha=4), sd15)
        counts[preset] = (len(network.adapters), network.num_params())
    # 16 transformer blocks: sum over blocks of 4 * (14 * width + 2 * 768) parameters at rank 4.
    assert counts["attention"] == (128, 797_184)
    assert counts["kohya"][0] == 192  # kohya: "create LoRA for U-Net: 192 modules"
    assert counts["attention"][1] < counts["kohya"][1] < counts["locon"][1] <= counts["all"][1]
    attention = core.Network.create(core.Config(preset="attention", rank=4, alpha=4), sd15)
    size = len(save(attention.state_dict_kohya(torch.float16)))
    assert 1.55e6 < size < 1.70e6  # ~1.6 MB in fp16


# --- 4. unreadable files ------------------------------------------------------------------------

def _attention_network(core, narrow, rank=2, algorithm="lora"):
    network = core.Network.create(core.Config(algorithm=algorithm, rank=rank, alpha=rank, preset="attention"), narrow)
    randomise(network)
    return network


def test_apply_reports_unknown_unmatched_and_mismatched_modules_by_name(core, narrow):
    network = _attention_network(core, narrow)
    tensors = network.state_dict_kohya()
    cross_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # [32, 64] in the narrow UNet
    widened = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # [32, 32]
    tensors[f"{cross_k}.lora_down.weight"] = torch.randn(2, 32)  # transposed: same size, other shape
    tensors[f"{cross_k}.lora_up.weight"] = torch.randn(64, 2)
    tensors[f"{widened}.lora_down.weight"] = torch.randn(2, 48)
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.randn(2, 32)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.randn(32, 2)
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w9"] = torch.randn(3)
    model, _, report = core.apply.apply_lora(narrow, None, tensors)
    assert report.unknown_keys == ["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w9"]
    assert report.unmatched == ["lora_unet_no_such_layer"]
    assert sorted(m.split(":")[0] for m in report.mismatched) == sorted([cross_k, widened])
    assert not report.ok and cross_k in report.summary()
    assert sorted(report.applied) == sorted(set(network.adapters) - {cross_k, widened})
    assert len(model.patches) == len(network.adapters) - 2


def test_reading_a_broken_file_raises_naming_every_problem(core, narrow):
    network = _attention_network(core, narrow)
    tensors = network.state_dict_kohya()
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    tensors[f"{q}.lora_up.weight"] = torch.randn(32, 3)  # rank 3 against a rank-2 down
    tensors["lora_unet_alpha_only.alpha"] = torch.tensor(1.0)
    tensors["lora_unet_odd.something"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        core.Network.from_state_dict(tensors)
    message = str(err.value)
    for name in (q, "lora_unet_alpha_only", "lora_unet_odd.something"):
        assert name in message
    assert k not in message

    bound = network.state_dict_kohya()
    bound[f"{k}.lora_down.weight"] = torch.randn(2, 64)  # fits itself, not the [32, 32] layer
    bound["lora_unet_no_such_layer.lora_down.weight"] = torch.randn(2, 8)
    bound["lora_unet_no_such_layer.lora_up.weight"] = torch.randn(8, 2)
    with pytest.raises(ValueError) as err:
        core.Network.from_state_dict(bound, model=narrow)
    assert k in str(err.value) and "lora_unet_no_such_layer" in str(err.value) and q not in str(err.value)


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_saved_files_read_back_to_the_same_adapters(core, narrow, algorithm, dora):
    config = config_or_refused(core, algorithm, dora, rank=4, alpha=3.0, preset="locon")
    if config is None:
        return
    network = core.Network.create(config, narrow)
    randomise(network)
    network.eval()
    read = core.Network.from_state_dict(network.state_dict_kohya(), model=narrow)
    assert read.weight_keys == network.weight_keys
    weights = narrow.model.state_dict()
    with torch.no_grad():
        for name, adapter in network.adapters.items():
            weight = weights[network.weight_keys[name]]
            assert rel(read.adapters[name](weight), adapter(weight)) < 1e-6, name


# --- 5. DyLoRA, exactness, stacking, other formats -----------------------------------------------

def test_dylora_export_is_the_leading_slice_and_comfy_applies_that_submodel(core, narrow, loras_dir, comfy_load):
    network = core.Network.create(core.Config(algorithm="dylora", rank=8, alpha=4.0, preset="attention",
                                              include=["*.in_layers.2"]), narrow)
    randomise(network)
    sub = network.at_rank(3)
    path = core.files.write_safetensors(sub.state_dict_kohya(), loras_dir / "dylora-r3.safetensors")
    loaded, _ = comfy_load(narrow, None, path)
    weights = narrow.model.state_dict()
    with torch.no_grad():
        for name, full in network.adapters.items():
            part = sub.adapters[name]
            assert part.rank == 3 and part.alpha == pytest.approx(4.0 * 3 / 8)
            assert torch.equal(part.lora_down, full.lora_down[:3]) and torch.equal(part.lora_up, full.lora_up[:, :3])
            expected = full.delta_at_rank(3, full.alpha / full.rank)  # the rank-3 submodel, scale alpha / rank_max
            assert rel(part.delta(), expected) < 1e-6
            key = network.weight_keys[name]
            assert rel(comfy_weight(loaded, key) - weights[key], expected) < 1e-4, name


def test_dylora_trains_nested_ranks(core, narrow):
    network = core.Network.create(core.Config(algorithm="dylora", rank=8, alpha=8, preset="attention",
                                              dylora_unit=2), narrow)
    adapter = next(iter(network.adapters.values()))
    adapter.train()
    ranks = set()
    for _ in range(200):
        adapter.new_step()
        rank = adapter.step_rank()
        assert adapter.step_rank() == rank  # drawn once per step: a recomputed forward sees the same rank
        ranks.add(rank)
    assert ranks == {2, 4, 6, 8}
    adapter.eval()
    assert adapter.step_rank() == 8


def _state(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def _bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_strength_zero_and_unpatching_leave_the_base_bit_identical(core, narrow, inputs):
    import comfy.model_management

    comfy.model_management.unload_all_models()
    base = _state(narrow)
    network = _attention_network(core, narrow, algorithm="loha")
    tensors = network.state_dict_kohya()
    zero, _, _ = core.apply.apply_lora(narrow, None, tensors, strength_model=0.0)
    zero.patch_model()
    assert _bit_identical(_state(zero), base)
    zero.unpatch_model()
    full, _, _ = core.apply.apply_lora(narrow, None, tensors)
    full.patch_model()
    assert not _bit_identical(_state(full), base)
    full.unpatch_model()
    assert _bit_identical(_state(narrow), base)

    # Training wrappers leave nothing behind once the plain model is loaded again.
    y_base = unet_output(narrow, inputs)
    trained, _ = network.attach(narrow, None)
    assert not torch.equal(unet_output(trained, inputs), y_base)
    assert torch.equal(unet_output(narrow, inputs), y_base)
    assert _bit_identical(_state(narrow), base)


def test_bake_then_unbake_restores_the_weights_bit_identically(core, narrow):
    import comfy.model_management

    comfy.model_management.unload_all_models()
    base = _state(narrow)
    network = _attention_network(core, narrow, algorithm="lokr")
    baked, report = core.apply.bake(narrow, network.state_dict_kohya())
    assert report.ok
    key = next(iter(network.weight_keys.values()))
    assert not torch.equal(baked.model.state_dict()[key], base[key])
    core.apply.unbake(baked)
    assert _bit_identical(_state(narrow), base)


def test_two_stacked_adapters_add_up(core, narrow, inputs, loras_dir, comfy_load):
    first = _attention_network(core, narrow, algorithm="lora")
    second = core.Network.create(core.Config(algorithm="loha", rank=2, alpha=2, preset="kohya"), narrow)
    randomise(second, seed=5)
    for n in (first, second):
        n.eval()
    trained, _ = first.attach(narrow, None)
    trained, _ = second.attach(trained, None)
    a, _, _ = core.apply.apply_lora(narrow, None, first.state_dict_kohya())
    ab, _, report = core.apply.apply_lora(a, None, second.state_dict_kohya())
    assert report.ok
    paths = [core.files.write_safetensors(n.state_dict_kohya(), loras_dir / f"stack-{i}.safetensors")
             for i, n in enumerate((first, second))]
    c, _ = comfy_load(narrow, None, paths[0])
    c, _ = comfy_load(c, None, paths[1])
    y = unet_output(trained, inputs)
    assert rel(unet_output(ab, inputs), y) < 1e-4
    assert rel(unet_output(c, inputs), y) < 1e-4
    single, _ = first.attach(narrow, None)
    assert rel(unet_output(single, inputs), y) > 1e-3


def test_apply_reads_peft_files_for_unet_and_text_encoder(core, loaded_checkpoint):
    import comfy.utils

    model, clip, _ = loaded_checkpoint
    network = core.Network.create(core.Config(preset="locon", text_encoder=True, rank=2, alpha=2), model, clip)
    randomise(network, scale=0.05)
    kohya = network.state_dict_kohya()
    to_diffusers = {f"diffusion_model.{ldm}": d for d, ldm in
                    comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
    peft = {}
    for name, key in network.weight_keys.items():
        if key.startswith("diffusion_model."):
            module = "unet." + to_diffusers[key][: -len(".weight")]
        else:
            module = "text_encoder." + key[len("clip_l.transformer."): -len(".weight")]
        peft[f"{module}.lora_A.weight"] = kohya[f"{name}.lora_down.weight"]
        peft[f"{module}.lora_B.weight"] = kohya[f"{name}.lora_up.weight"]
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in peft
    m_peft, c_peft, report = core.apply.apply_lora(model, clip, peft)
    assert report.ok and len(report.applied) == len(network.adapters), report.summary()
    m_kohya, c_kohya, _ = core.apply.apply_lora(model, clip, kohya)
    for name, key in network.weight_keys.items():
        pair = (c_peft.patcher, c_kohya.patcher) if name.startswith("lora_te") else (m_peft, m_kohya)
        assert rel(comfy_weight(pair[0], key), comfy_weight(pair[1], key)) < 1e-6, name
    read = core.Network.from_state_dict(peft, model=model, clip=clip)
    assert read.weight_keys == network.weight_keys  # renamed to our kohya names


NATIVE_KEYS = ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
               "diffusion_model.input_blocks.1.0.in_layers.2.weight", "diffusion_model.output_blocks.1.2.conv.weight"]


def native_trained(patcher, adapter_cls, rank: int, seed: int):
    """(a clone with ComfyUI's train adapters of `adapter_cls` on NATIVE_KEYS, each trainable factor random; the
    tensors ComfyUI's trainer saves for them), as comfy_extras/nodes_train.py builds and saves them."""
    weights = patcher.model.state_dict()
    native, tensors = patcher.clone(), {}
    gen = torch.Generator().manual_seed(seed)
    for key in NATIVE_KEYS:
        train = adapter_cls.create_train(weights[key], rank, 1.0)
        with torch.no_grad():
            for p in train.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        native.add_weight_wrapper(key, train)
        for name, p in train.named_parameters():
            tensors[f"{key[: -len('.weight')]}.{name}"] = p.detach().clone()
    return native, tensors


def test_apply_reads_comfy_native_trainer_files(core, narrow, inputs):
    from comfy.weight_adapter import LoRAAdapter

    native, tensors = native_trained(narrow, LoRAAdapter, 3, seed=3)
    applied, _, report = core.apply.apply_lora(narrow, None, tensors)
    assert report.ok and len(report.applied) == 3, report.summary()
    assert rel(unet_output(applied, inputs), unet_output(native, inputs)) < 1e-4
    read = core.Network.from_state_dict(tensors, model=narrow)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in read.adapters
    assert read.adapters["lora_unet_down_blocks_0_resnets_0_conv1"].lora_down.shape == (3, 32, 3, 3)


def test_apply_and_read_comfy_native_oft_files(core, narrow, inputs, tmp_path):
    """An OFT from ComfyUI's own trainer (oft_blocks and its alpha parameter per layer) applies as the native model
    computes and reads back into our OFT adapters, to continue training."""
    from comfy.weight_adapter import OFTAdapter

    native, tensors = native_trained(narrow, OFTAdapter, 4, seed=4)
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"oft_blocks", "alpha"}
    applied, _, report = core.apply.apply_lora(narrow, None, tensors)
    assert report.ok and len(report.applied) == 3, report.summary()
    y_native = unet_output(native, inputs)
    assert rel(y_native, unet_output(narrow, inputs)) > 1e-3  # the rotations change the output
    assert rel(unet_output(applied, inputs), y_native) < 1e-4
    from lora_foundry.lora_core.info import lora_info

    path = core.files.write_safetensors(tensors, tmp_path / "native-oft.safetensors")
    assert (lora_info(path)["algorithm"], lora_info(path)["rank"]) == ("oft", 4)  # rank: the block size
    read = core.Network.from_state_dict(tensors, model=narrow)
    conv = read.adapters["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert isinstance(conv, core.adapters.OFT) and conv.alpha == 1.0 and conv.rank == 4
    read.eval()
    resumed, _ = read.attach(narrow, None)
    assert rel(unet_output(resumed, inputs), y_native) < 1e-4


def test_lycoris_boft_files_with_rescale_apply_as_comfy_and_read_back(core, narrow, inputs, loras_dir, comfy_load):
    """A LyCORIS BOFT file (oft_blocks [stages, blocks, b, b], a constraint alpha and a per-row rescale) gives the
    same model through LoraLoader, Apply and our adapters attached (to continue training)."""
    network = core.Network.create(core.Config(algorithm="boft", rank=8, alpha=0.5, preset="attention"), narrow)
    randomise(network, seed=6, scale=0.2)
    tensors = network.state_dict_kohya()
    gen = torch.Generator().manual_seed(7)
    for name, adapter in network.adapters.items():  # LyCORIS' rescaled=True: one factor per output row
        rows = adapter.shape[0]
        tensors[f"{name}.rescale"] = 1 + 0.3 * torch.randn(rows, *[1] * (len(adapter.shape) - 1), generator=gen)
    stages = {tuple(t.shape[:2]) for k, t in tensors.items() if k.endswith(".oft_blocks")}
    assert all(m == n.bit_length() and m > 1 for m, n in stages), stages  # real butterflies, several stages
    path = core.files.write_safetensors(tensors, loras_dir / "lycoris-boft.safetensors")
    from lora_foundry.lora_core.info import lora_info

    assert (lora_info(path)["algorithm"], lora_info(path)["rank"]) == ("boft", 8)
    loaded, _ = comfy_load(narrow, None, path)
    applied, _, report = core.apply.apply_lora(narrow, None, tensors)
    assert report.ok, report.summary()
    read = core.Network.from_state_dict(tensors, model=narrow)
    read.eval()
    attached, _ = read.attach(narrow, None)
    y = unet_output(loaded, inputs)
    assert rel(y, unet_output(narrow, inputs)) > 1e-3
    assert rel(unet_output(applied, inputs), y) < 1e-4
    assert rel(unet_output(attached, inputs), y) < 1e-4


def test_lycoris_old_layout_glora_files_apply_and_read_as_comfy_reads_them(core, narrow, inputs, loras_dir,
                                                                              comfy_load):
    """LyCORIS' older GLoRA files hold a1 / a2 and b1 / b2 the other way round (W a2 a1 + b2 b1); ComfyUI tells the
    layouts apart by their shapes, and so do we: the same file gives one model in LoraLoader, Apply and attached."""
    network = core.Network.create(core.Config(algorithm="glora", rank=4, alpha=3.0, preset="attention"), narrow)
    randomise(network, seed=9)
    network.eval()
    new = network.state_dict_kohya()
    old = {}
    for key, value in new.items():
        module, _, part = key.partition(".")
        swapped = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight",
                   "b2.weight": "b1.weight"}.get(part, part)
        old[f"{module}.{swapped}"] = value
    shapes = {tuple(network.adapters[n].shape) for n in network.adapters}
    assert any(s[0] == s[1] for s in shapes) and any(s[0] != s[1] for s in shapes)  # square and not
    attached, _ = network.attach(narrow, None)
    y = unet_output(attached, inputs)
    assert rel(y, unet_output(narrow, inputs)) > 1e-3
    loaded, _ = comfy_load(narrow, None, core.files.write_safetensors(old, loras_dir / "glora-old.safetensors"))
    applied, _, report = core.apply.apply_lora(narrow, None, old)
    read = core.Network.from_state_dict(old, model=narrow)
    read.eval()
    resumed, _ = read.attach(narrow, None)
    assert report.ok, report.summary()
    for model in (loaded, applied, resumed):
        assert rel(unet_output(model, inputs), y) < 1e-4


# --- 6. training path -----------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fresh_adapters_start_at_zero_and_every_one_learns(core, narrow, inputs, algorithm):
    config = core.Config(algorithm=algorithm, rank=4, alpha=4, preset="locon")
    network = core.Network.create(config, narrow)
    base = unet_output(narrow, inputs)
    network.train()
    trained, _ = network.attach(narrow, None)
    out = unet_output(trained, inputs, grad=True)
    assert torch.equal(out, base)  # dW = 0 exactly at step 0
    out.pow(2).mean().backward()
    silent = [n for n, a in network.adapters.items() if not any(p.grad is not None and p.grad.abs().sum() > 0
                                                                   for p in a.parameters())]
    assert not silent


def test_only_adapters_train_and_every_factor_gets_a_gradient(core, narrow, inputs, loaded_checkpoint):
    _, clip, _ = loaded_checkpoint
    network = core.Network.create(core.Config(preset="locon", rank=4, alpha=4), narrow)
    te = core.Network.create(core.Config(preset="attention", text_encoder=True, rank=2, alpha=2), None, clip)
    for n in (network, te):
        randomise(n, scale=0.05)
        n.train()
    trained, _ = network.attach(narrow, None)
    _, trained_clip = te.attach(None, clip)
    assert not any(p.requires_grad for p in narrow.model.parameters())
    assert not any(p.requires_grad for p in clip.cond_stage_model.parameters())
    assert all(p.requires_grad for p in [*network.parameters(), *te.parameters()])

    unet_output(trained, inputs, grad=True).pow(2).mean().backward()
    # ComfyUI's CLIPLayer adds residuals in place (`x += ...`) over tensors autograd saved: training
    # the text encoder needs forward and backward under allow_mutation_on_saved_tensors.
    tokens = trained_clip.tokenize("a photo of a red circle")
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.allow_mutation_on_saved_tensors():
        trained_clip.encode_from_tokens(tokens).pow(2).mean().backward()
    for n in (network, te):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in n.parameters())
    assert all(p.grad is None for p in narrow.model.parameters())
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())


def test_adapters_work_and_move_under_partial_lowvram_loading(core, inputs):
    """ComfyUI's partial (lowvram) load: offloaded layers cast per call and still run our wrappers.

    On a CPU-only host the load device is the CPU, so a real device move is shown by loading onto
    the meta device: the ModelPatcher moves every weight wrapper with `move_to`.
    """
    import comfy.model_management

    comfy.model_management.unload_all_models()
    model = make_patcher(NARROW_UNET, seed=4)
    network = core.Network.create(core.Config(preset="locon", rank=4, alpha=4), model)
    randomise(network)
    network.eval()
    trained, _ = network.attach(model, None)
    y_full = unet_output(trained, inputs)
    comfy.model_management.unload_all_models()

    cpu = torch.device("cpu")
    trained.patch_model(device_to=cpu, lowvram_model_memory=200_000)
    assert trained.model.model_lowvram, "expected a partial load"
    offloaded = [m for m in trained.model.modules() if getattr(m, "comfy_cast_weights", False)]
    assert any(isinstance(f, core.adapters.Adapter) for m in offloaded for f in m.weight_function)
    x, sigma, context = inputs
    with torch.inference_mode(False), torch.enable_grad():
        y = trained.model.apply_model(x, sigma, c_crossattn=context)
        y.pow(2).mean().backward()
    assert rel(y, y_full) < 1e-5
    assert all(p.grad is not None for p in network.parameters())
    trained.unpatch_model(cpu)

    moved = trained.clone()
    moved.patch_model(device_to=torch.device("meta"), lowvram_model_memory=200_000)
    assert {p.device.type for p in network.parameters()} == {"meta"}
