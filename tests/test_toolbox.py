"""The LoRA toolbox against the real host: merge (exact, concat, into a model), extract, resize.

Each result is checked against the math it promises (sum of ratio * dW, the truncated SVD and
its reported loss, the randomized SVD's stated tolerance, the dynamic ranks' fractions) and
against what ComfyUI's own LoraLoader does with the file written.
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from conftest import comfy_weights
from harness import fixtures

NARROW_UNET = {
    **fixtures.SD15_TINY_UNET, "model_channels": 32, "context_dim": 64, "channel_mult": [1, 2],
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
}
LOADER_COMPLAINTS = ("lora key not loaded", "NOT LOADED", "ERROR", "SHAPE MISMATCH")


# --- helpers ---------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


def make_patcher(seed: int = 0):
    """A ComfyUI MODEL around the narrow SD1.5-layout UNet, built in-process."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(NARROW_UNET)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    fixtures.init_weights_(base.diffusion_model, seed)
    with torch.no_grad():
        for m in base.diffusion_model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.fill_(1.0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def narrow(comfy_root):
    return make_patcher()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    return x, torch.tensor([5.0, 0.5]), torch.randn(2, 7, NARROW_UNET["context_dim"], generator=gen)


def unet_output(patcher, inputs) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    x, sigma, context = inputs
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context)


def random_network(core, patcher, algorithm="lora", rank=4, alpha=3.0, preset="locon", seed=1, scale=0.2, **kw):
    network = core.Network.create(core.Config(algorithm=algorithm, rank=rank, alpha=alpha, preset=preset, **kw), patcher)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return network.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def true_energy(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """The Frobenius fraction an approximation keeps: 1 - ||exact - approx||^2 / ||exact||^2."""
    return 1 - rel(approx, exact) ** 2


def weighted_sum(networks, ratios) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for network, ratio in zip(networks, ratios, strict=True):
        for name, delta in network.deltas().items():
            flat = ratio * delta.double().reshape(delta.shape[0], -1)
            total[name] = total[name] + flat if name in total else flat
    return total


def flat_deltas(network) -> dict[str, torch.Tensor]:
    return {n: d.reshape(d.shape[0], -1) for n, d in network.deltas().items()}


@pytest.fixture
def comfy_load(core, comfy_nodes, loras_dir, caplog):
    """Write a network into the loras folder and load it with ComfyUI's LoraLoader, asserting no key complaint."""
    def load(model, clip, network, name, strength=1.0):
        path = core.files.write_safetensors(network.state_dict_kohya(), loras_dir / f"{name}.safetensors",
                                            getattr(network, "metadata", None))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            new_model, new_clip = comfy_nodes.LoraLoader().load_lora(model, clip, path.name, strength, strength)
        complaints = [r.getMessage() for r in caplog.records if any(c in r.getMessage() for c in LOADER_COMPLAINTS)]
        assert not complaints, "\n".join(complaints[:20])
        return new_model, new_clip

    return load


# --- merge into one LoRA ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_loras(core, narrow):
    """Different ranks, alphas and module sets: rank 4 on LoCon layers, rank 2 on attention only."""
    return (random_network(core, narrow, rank=4, alpha=3.0, preset="locon", seed=1),
            random_network(core, narrow, rank=2, alpha=1.0, preset="attention", seed=2))


def test_exact_merge_at_full_rank_is_the_weighted_sum(core, narrow, two_loras, comfy_load):
    ratios = (0.7, -0.4)
    merged, report = core.merge.merge_exact(list(zip(two_loras, ratios, strict=True)), core.ranks.RankRule(64))
    want = weighted_sum(two_loras, ratios)
    got = flat_deltas(merged)
    assert set(got) == set(want) == set(two_loras[0].adapters)
    for name in want:
        assert rel(got[name], want[name]) < 1e-5, name
        assert merged.adapters[name].rank <= 6 and merged.adapters[name].alpha == merged.adapters[name].rank
    assert abs(report.energy - 1) < 1e-6 and not report.skipped
    # A module only the first input has is that input's change times its ratio.
    only_first = next(n for n in want if n not in two_loras[1].adapters)
    assert rel(got[only_first], 0.7 * flat_deltas(two_loras[0])[only_first]) < 1e-5
    # ComfyUI applies the merged file as the two inputs at their ratios.
    model, _ = comfy_load(narrow, None, merged, "merged-full")
    base, patched = comfy_weights(narrow, merged.weight_keys.values()), comfy_weights(model, merged.weight_keys.values())
    for name, key in merged.weight_keys.items():
        assert rel(patched[key].reshape(want[name].shape), base[key].reshape(want[name].shape) + want[name]) < 1e-5


def test_exact_merge_at_lower_rank_reports_the_true_loss(core, narrow, two_loras):
    ratios = (1.0, 0.5)
    merged, report = core.merge.merge_exact(list(zip(two_loras, ratios, strict=True)), core.ranks.RankRule(3))
    want, got = weighted_sum(two_loras, ratios), flat_deltas(merged)
    lossy = 0
    for name in want:
        stat = report.layer(name)
        assert abs(stat.energy - true_energy(got[name], want[name])) < 1e-5, name
        assert merged.adapters[name].rank == 3
        lossy += stat.energy < 1 - 1e-4
    assert lossy > 0
    total = sum(float((w**2).sum()) for w in want.values())
    kept = sum(true_energy(got[n], w) * float((w**2).sum()) for n, w in want.items())
    assert report.energy < 1 and abs(report.energy - kept / total) < 1e-5
    assert "retained energy" in report.summary()


def test_exact_merge_takes_loha_lokr_and_lora_of_different_ranks(core, narrow, comfy_load):
    networks = (random_network(core, narrow, algorithm="lora", rank=3, alpha=1.5, seed=3),
                random_network(core, narrow, algorithm="loha", rank=2, alpha=2.0, seed=4, scale=0.3),
                random_network(core, narrow, algorithm="lokr", rank=2, alpha=1.0, preset="attention", seed=5))
    ratios = (0.5, 1.0, -0.8)
    merged, report = core.merge.merge_exact(list(zip(networks, ratios, strict=True)), core.ranks.RankRule(4096))
    want, got = weighted_sum(networks, ratios), flat_deltas(merged)
    for name in want:
        assert rel(got[name], want[name]) < 1e-5, name
    assert {layer.method for layer in report.layers} == {"full"}  # the dense sum of a LoHa is full rank
    comfy_load(narrow, None, merged, "merged-mixed")
    low, low_report = core.merge.merge_exact(list(zip(networks, ratios, strict=True)), core.ranks.RankRule(4))
    got = flat_deltas(low)
    for name in want:
        assert abs(low_report.layer(name).energy - true_energy(got[name], want[name])) < 1e-5, name
    assert low_report.energy < 1


def test_concat_merge_is_exact_at_the_sum_of_ranks(core, narrow, two_loras, comfy_load):
    dylora = random_network(core, narrow, algorithm="dylora", rank=3, alpha=2.0, preset="attention", seed=6)
    dylora.train()  # a training-mode DyLoRA samples ranks; merging must use all of them
    dylora.new_step()
    networks, ratios = (*two_loras, dylora), (0.6, -1.2, 0.9)
    merged, report = core.merge.merge_concat(list(zip(networks, ratios, strict=True)))
    dylora.eval()
    want, got = weighted_sum(networks, ratios), flat_deltas(merged)
    for name in want:
        assert rel(got[name], want[name]) < 1e-6, name
        expected_rank = sum(n.adapters[name].rank for n in networks if name in n.adapters)
        assert merged.adapters[name].rank == expected_rank == merged.adapters[name].alpha
    assert report.energy == 1
    comfy_load(narrow, None, merged, "merged-concat")
    loha = random_network(core, narrow, algorithm="loha", rank=2, preset="attention", seed=7)
    with pytest.raises(ValueError, match="concat merges LoRA / LoCon only.*loha"):
        core.merge.merge_concat([(two_loras[0], 1.0), (loha, 1.0)])


@pytest.mark.parametrize("kind", ["dora", "oft", "boft", "glora"])
def test_base_dependent_inputs_are_refused_naming_the_module(core, narrow, two_loras, kind):
    """DoRA, OFT, BOFT and GLoRA changes exist only with the base weight: merging into a LoRA and resizing refuse
    them."""
    if kind == "dora":
        dependent = random_network(core, narrow, rank=2, preset="attention", dora=True, seed=8)
    else:
        dependent = random_network(core, narrow, algorithm=kind, rank=4, preset="attention", seed=8)
    said = {"dora": "DoRA module", "oft": "OFT module", "boft": "BOFT module", "glora": "GLORA module"}[kind]
    for merge in (lambda: core.merge.merge_exact([(two_loras[0], 1.0), (dependent, 0.5)], core.ranks.RankRule(4)),
                  lambda: core.merge.merge_concat([(dependent, 0.5)]),
                  lambda: core.resize.resize_lora(dependent, core.ranks.RankRule(1))):
        with pytest.raises(ValueError, match=said) as error:
            merge()
        assert re.search(rf"(lora_unet_\w+): {said}", str(error.value)).group(1) in dependent.adapters
        assert "mode 'into model'" in str(error.value)


def test_a_diffusers_flux_lora_with_q_k_v_apart_reads_merges_and_resizes_to_what_apply_gives(core, comfy_load):
    """ai-toolkit / diffusers Flux LoRAs change q, k and v (and a single block's q and MLP rows) apart, where ComfyUI
    holds one fused weight: each fused weight becomes one LoRA (up block-diagonal, down stacked) whose change is what
    Apply (the host) gives, and merging and resizing it keep that change, in a file LoraLoader takes."""
    from harness.families import build_family

    model = build_family("flux").model
    hidden = 64
    gen = torch.Generator().manual_seed(21)
    tensors = {}
    parts = {**{f"transformer_blocks.0.attn.{p}": hidden for p in ("to_q", "to_k", "to_v", "add_q_proj",
                                                                     "add_v_proj", "to_out.0")},
             "single_transformer_blocks.0.attn.to_q": hidden, "single_transformer_blocks.0.proj_mlp": 4 * hidden}
    for rank, (part, rows) in enumerate(parts.items(), start=2):  # PEFT names, no alpha: scale 1
        tensors[f"transformer.{part}.lora_A.weight"] = torch.randn(rank % 3 + 1, hidden, generator=gen) * 0.2
        tensors[f"transformer.{part}.lora_B.weight"] = torch.randn(rows, rank % 3 + 1, generator=gen) * 0.2
    applied, _, report = core.apply.apply_lora(model, None, tensors)
    assert report.ok, report.summary()
    read = core.Network.from_state_dict(tensors, model=model)
    fused = {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
             "lora_unet_single_blocks_0_linear1"}
    assert fused < set(read.adapters) and len(read.adapters) == 4  # the out projection is a whole weight
    base = model.model.state_dict()
    keys = list(read.weight_keys.values())
    change = {k: w - base[k].float() for k, w in comfy_weights(applied, keys).items()}
    for name, key in read.weight_keys.items():
        assert rel(read.adapters[name].delta().reshape(change[key].shape), change[key]) < 1e-5, name
    resized, _ = core.resize.resize_lora(read, core.ranks.RankRule(16))
    merged, _ = core.merge.merge_exact([(read, 0.5)], core.ranks.RankRule(16))
    for network, ratio, name in ((resized, 1.0, "flux-resized"), (merged, 0.5, "flux-merged")):
        loaded, _ = comfy_load(model, None, network, name)
        for key, weight in comfy_weights(loaded, keys).items():
            assert rel(weight - base[key].float(), ratio * change[key]) < 1e-4, (name, key)


# --- merge into a model ----------------------------------------------------------------------

def test_merge_into_model_equals_chained_loaders_and_saves_that_checkpoint(core, comfy_load, inputs, tmp_path):
    from safetensors.torch import load_file

    model = make_patcher(seed=11)  # its own model: saving patches its weights in place
    networks = (random_network(core, model, rank=4, seed=12, scale=0.1),
                random_network(core, model, algorithm="loha", rank=2, preset="attention", seed=13, scale=0.2))
    ratios = (0.8, -0.5)
    loras = [(n.state_dict_kohya(), r, r) for n, r in zip(networks, ratios, strict=True)]
    merged, _, reports = core.merge.merge_into_model(model, None, loras)
    assert all(r.ok for r in reports)
    chained = model
    for i, (network, ratio) in enumerate(zip(networks, ratios, strict=True)):
        chained, _ = comfy_load(chained, None, network, f"into-{i}", strength=ratio)
    base = model.model.diffusion_model.state_dict()
    base = {k: v.clone() for k, v in base.items()}
    y_base = unet_output(model, inputs)
    y_merged = unet_output(merged, inputs)
    assert rel(y_merged, unet_output(chained, inputs)) < 1e-5
    assert rel(y_merged, y_base) > 1e-2

    path = core.merge.save_checkpoint(tmp_path / "merged.safetensors", merged, metadata={"note": "test"})
    saved = load_file(str(path))
    want = weighted_sum(networks, ratios)
    for name, key in networks[0].weight_keys.items():
        module_key = key[len("diffusion_model."):]
        expected = base[module_key].double().reshape(want[name].shape) + want[name]
        assert rel(saved[f"model.diffusion_model.{module_key}"].reshape(expected.shape), expected) < 1e-5, name
    untouched = "input_blocks.0.0.weight"  # conv_in: no LoRA targets it
    assert torch.equal(saved[f"model.diffusion_model.{untouched}"], base[untouched])


# --- extract ---------------------------------------------------------------------------------

def _planted(shape, rank, seed, size=0.05):
    gen = torch.Generator().manual_seed(seed)
    out_dim, flat_in = shape[0], math.prod(shape[1:])
    u, v = torch.randn(out_dim, rank, generator=gen), torch.randn(rank, flat_in, generator=gen)
    scales = torch.linspace(1.0, 0.3, rank)
    delta = (u * scales) @ v
    return (delta * size / delta.std()).reshape(shape)


def test_extraction_recovers_a_planted_change_and_skips_untouched_layers(core, narrow, comfy_load):
    tuned = make_patcher(seed=0)
    layers = core.Network.create(core.Config(preset="locon", rank=1), narrow).weight_keys
    picks = {}
    for pattern in ("attn1.to_q", "ff.net.2", "conv1"):
        name = next(n for n in sorted(layers) if n.endswith(pattern.replace(".", "_")))
        picks[name] = layers[name]
    weights = dict(tuned.model.named_parameters())
    planted = {}
    with torch.no_grad():
        for i, (name, key) in enumerate(picks.items()):
            planted[name] = _planted(weights[key].shape, 4, seed=20 + i)
            weights[key] += planted[name]
    network, report = core.extract.extract_lora(narrow, tuned, rule=core.ranks.RankRule(4),
                                                conv_rule=core.ranks.RankRule(4), preset="locon", clamp_quantile=1.0)
    assert set(network.adapters) == set(picks) and network.weight_keys == picks
    assert len(report.skipped) == len(layers) - len(picks)
    deltas = network.deltas()
    for name, delta in planted.items():
        assert deltas[name].shape == delta.shape
        assert rel(deltas[name], delta) < 1e-4, name
        assert report.layer(name).energy > 1 - 1e-6
    conv = next(n for n in picks if n.endswith("conv1"))
    assert network.adapters[conv].lora_up.shape[2:] == (1, 1) and network.adapters[conv].lora_down.shape[2:] == (3, 3)
    comfy_load(narrow, None, network, "extracted-narrow")
    # Clamping (kohya's default quantile) changes the factors; the report is the energy actually kept.
    clamped, clamped_report = core.extract.extract_lora(narrow, tuned, rule=core.ranks.RankRule(4),
                                                        conv_rule=core.ranks.RankRule(4), preset="locon")
    for name, delta in flat_deltas(clamped).items():
        want = planted[name].reshape(delta.shape)
        assert abs(clamped_report.layer(name).energy - true_energy(delta, want)) < 1e-5
    with pytest.raises(ValueError, match="do not differ"):
        core.extract.extract_lora(narrow, narrow.clone(), preset="locon")


def test_extraction_from_the_checkpoint_with_patches_uses_randomized_svd_and_loads_in_comfy(
        core, loaded_checkpoint, comfy_load):
    """Tuned = the fixture checkpoint with diff patches (as a LoRA loader leaves it), UNet and text encoder."""
    model, clip, _ = loaded_checkpoint
    layers = core.Network.create(core.Config(preset="kohya", rank=1, text_encoder=True), model, clip).weight_keys
    picks = [n for n in sorted(layers) if n.endswith(("attn1_to_q", "ff_net_2"))][:2]
    picks.append(next(n for n in sorted(layers) if n.startswith("lora_te_") and n.endswith("mlp_fc1")))
    tuned_model, tuned_clip = model.clone(), clip.clone()
    planted = {}
    for i, name in enumerate(picks):
        key = layers[name]
        patcher = tuned_clip.patcher if name.startswith("lora_te") else tuned_model
        shape = patcher.get_key_patches()[key][0][0].shape
        planted[name] = _planted(shape, 6, seed=30 + i, size=0.01)
        patcher.add_patches({key: ("diff", (planted[name],))})
    progress = []
    network, report = core.extract.extract_lora(model, tuned_model, clip, tuned_clip, rule=core.ranks.RankRule(8),
                                                clamp_quantile=1.0, progress=lambda d, t: progress.append((d, t)))
    assert progress[-1][0] == progress[-1][1] == len(layers)
    assert set(network.adapters) == set(picks) and not report.fell_back
    assert {report.layer(n).method for n in picks} == {"randomized"}
    deltas = network.deltas()
    for name in picks:
        assert rel(deltas[name], planted[name]) < 1e-4, name
    new_model, new_clip = comfy_load(model, clip, network, "extracted-checkpoint")
    for name in picks:
        key = layers[name]
        patcher, tuned = (new_clip.patcher, tuned_clip.patcher) if name.startswith("lora_te") else (new_model, tuned_model)
        assert rel(comfy_weights(patcher, [key])[key], comfy_weights(tuned, [key])[key]) < 1e-5, name


# --- randomized SVD and dynamic ranks --------------------------------------------------------

def _matrix(m, n, spectrum, seed):
    gen = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return (u * torch.tensor(spectrum)) @ v.T


SPECTRA = {
    "planted+noise": lambda n: [1 / (1 + 0.2 * i) for i in range(24)] + [1e-3] * (n - 24),
    "power-1": lambda n: [(1 + i) ** -1.0 for i in range(n)],
    "exponential": lambda n: [0.97**i for i in range(n)],
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("rank", [8, 32])
def test_randomized_svd_is_within_its_stated_tolerance_of_a_full_svd(core, spectrum, rank):
    tb = core.svd
    d = _matrix(400, 900, SPECTRA[spectrum](400), seed=rank)
    options = tb.SvdOptions()
    dec, kept, note = tb.decompose(d, core.ranks.RankRule(rank), options)
    full = tb.full_svd(d)
    assert dec.method == "randomized" and not note and kept == rank
    shortfall = full.energy(rank) - dec.energy(rank)
    assert shortfall <= dec.shortfall / dec.total + 1e-6  # the bound holds
    assert shortfall <= options.tol + 1e-6  # and so does the promise
    up, down = tb.lora_factors(dec, rank, tuple(d.shape))
    assert abs(true_energy(up @ down, d) - dec.energy(rank)) < 1e-5  # the energy reported is the real one


def test_randomized_svd_falls_back_to_full_when_its_check_fails(core):
    tb = core.svd
    d = _matrix(400, 900, [(1 + i) ** -0.3 for i in range(400)], seed=1)  # a flat spectrum: no gap to find
    options = tb.SvdOptions(power_iters=1, max_power_iters=1, tol=1e-5)
    dec, rank, note = tb.decompose(d, core.ranks.RankRule(16), options)
    assert dec.method == "full" and "used full SVD" in note
    assert abs(dec.energy(rank) - tb.full_svd(d).energy(16)) < 1e-6


@pytest.mark.parametrize("svd", ["full", "randomized", "factored"])
def test_dynamic_ranks_keep_the_promised_fraction_and_no_more_ranks_than_needed(core, svd):
    tb = core.svd
    spectrum = [0.9**i for i in range(60)] + [1e-4] * 240
    d = _matrix(300, 700, spectrum, seed=2).double()
    s_all = torch.linalg.svdvals(d)
    for method, param in (("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 20.0)):
        if svd == "randomized" and method == "sv_cumulative":
            continue  # needs every singular value: always a full SVD
        rule = core.ranks.RankRule(64, method, param)
        if svd == "factored":
            u, s, vh = torch.linalg.svd(d.float(), full_matrices=False)
            dec, note = tb.factored_svd(u[:, :80] * s[:80], vh[:80]), ""
            rank = rule.choose(dec.s, dec.total, dec.nuclear)
        else:
            dec, rank, note = tb.decompose(d.float(), rule, tb.SvdOptions(method=svd))
        assert dec.method == svd and not note
        kept = lambda r: s_all[:r]  # noqa: E731
        if method == "sv_fro":
            assert math.sqrt(dec.energy(rank)) >= param - 1e-6
            assert (kept(rank - 1) ** 2).sum().sqrt() / s_all.norm() < param
        elif method == "sv_cumulative":
            assert kept(rank).sum() / s_all.sum() >= param - 1e-6 > kept(rank - 1).sum() / s_all.sum()
        else:
            assert s_all[rank - 1] > s_all[0] / param >= s_all[rank]


def test_rank_rules_refuse_meaningless_parameters(core):
    for args in ((0,), (8, "sv_ratio", 0.5), (8, "sv_fro", 1.5), (8, "sv_median", 0.5)):
        with pytest.raises(ValueError):
            core.ranks.RankRule(*args)


# --- resize ----------------------------------------------------------------------------------

def test_resize_applies_within_the_reported_error(core, narrow, inputs, comfy_load):
    network = random_network(core, narrow, rank=8, alpha=4.0, preset="locon", seed=40, scale=0.15)
    resized, report = core.resize.resize_lora(network, core.ranks.RankRule(3))
    original = flat_deltas(network)
    for name, adapter in resized.adapters.items():
        assert adapter.rank == 3 and adapter.alpha == pytest.approx(4.0 / 8 * 3)  # the scale is kept
        assert rel(flat_deltas(resized)[name], original[name]) == pytest.approx(report.layer(name).error, abs=1e-5)
    assert 0 < report.energy < 1
    small, _ = comfy_load(narrow, None, resized, "resized")
    full, _, _ = core.apply.apply_lora(narrow, None, network.state_dict_kohya())
    keys = network.weight_keys.values()
    small_weights, full_weights = comfy_weights(small, keys), comfy_weights(full, keys)
    for name, key in network.weight_keys.items():
        err = (small_weights[key] - full_weights[key]).norm() / original[name].norm()
        assert float(err) == pytest.approx(report.layer(name).error, abs=1e-4), name
    y_base, y_full, y_small = unet_output(narrow, inputs), unet_output(full, inputs), unet_output(small, inputs)
    overall_error = math.sqrt(1 - report.energy)
    assert rel(y_small, y_full) <= 3 * overall_error * rel(y_full, y_base)

    same, same_report = core.resize.resize_lora(network, core.ranks.RankRule(64))
    for name, delta in flat_deltas(same).items():
        assert rel(delta, original[name]) < 1e-5
    assert abs(same_report.energy - 1) < 1e-6


def test_resize_turns_loha_into_a_dynamic_rank_lora(core, narrow, comfy_load):
    loha = random_network(core, narrow, algorithm="loha", rank=4, alpha=4.0, preset="attention", seed=41)
    resized, report = core.resize.resize_lora(loha, core.ranks.RankRule(32, "sv_fro", 0.95))
    original = flat_deltas(loha)
    for name, delta in flat_deltas(resized).items():
        assert math.sqrt(true_energy(delta, original[name])) >= 0.95 - 1e-6
    assert len({a.rank for a in resized.adapters.values()}) > 1
    assert resized.metadata["ss_network_dim"] == "Dynamic"
    comfy_load(narrow, None, resized, "resized-loha")


# --- through the server ----------------------------------------------------------------------

@pytest.mark.server
def test_resize_node_runs_through_the_server_and_save_lora_writes_the_result(core, server, loaded_checkpoint):
    model, clip, _ = loaded_checkpoint
    loras = server.base_dir / "models" / "loras"
    network = random_network(core, model, rank=8, alpha=8.0, preset="kohya", seed=50, scale=0.05)
    core.files.write_safetensors(network.state_dict_kohya(), loras / "toolbox-in.safetensors")
    prompt = {
        "1": {"class_type": "LoraFoundryResizeLoRA",
              "inputs": {"lora_name": "toolbox-in.safetensors", "rank": 4, "dynamic": "off", "dynamic_param": 0.9}},
        "2": {"class_type": "LoraFoundrySaveLoRA",
              "inputs": {"lora": ["1", 0], "filename_prefix": "toolbox/resized", "precision": "fp32",
                         "folder": "loras", "overwrite": True}},
    }
    server.run(prompt, timeout=300)
    path = loras / "toolbox" / "resized.safetensors"
    tensors, metadata = core.files.read_safetensors(path)
    served = core.Network.from_state_dict(tensors, metadata)
    local, _ = core.resize.resize_lora(network, core.ranks.RankRule(4))
    assert set(served.adapters) == set(local.adapters)
    served_deltas = flat_deltas(served)
    for name, delta in flat_deltas(local).items():
        assert served.adapters[name].rank == 4
        assert rel(served_deltas[name], delta) < 1e-5
    assert '"mode": "resize"' in metadata["lora_foundry_source"]


@pytest.mark.server
def test_extract_and_merge_nodes_recover_a_lora_applied_by_comfys_loader(core, server, tiny_checkpoint, loaded_checkpoint):
    """Extract (base vs base + LoraLoader at 0.8) then Merge with the file at 0.5: 1.3 x the LoRA; and the same
    LoRA merged into the checkpoint, saved by the into-model mode."""
    from safetensors.torch import load_file

    model, clip, _ = loaded_checkpoint
    loras = server.base_dir / "models" / "loras"
    network = random_network(core, model, rank=4, alpha=4.0, preset="kohya", text_encoder=True, seed=51, scale=0.05)
    core.files.write_safetensors(network.state_dict_kohya(), loras / "toolbox-a.safetensors")
    slots = {f"{kind}_{i}": value for i in range(1, 5) for kind, value in (("lora", "None"), ("ratio", 1.0))}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "toolbox-a.safetensors",
                                                     "strength_model": 0.8, "strength_clip": 0.8}},
        "3": {"class_type": "LoraFoundryExtractLoRA",
              "inputs": {"model_base": ["1", 0], "model_tuned": ["2", 0], "clip_base": ["1", 1], "clip_tuned": ["2", 1],
                         "preset": "kohya", "rank": 4, "dynamic": "off", "dynamic_param": 0.9, "conv_rank": 0,
                         "clamp_quantile": 1.0, "min_diff": 1e-6, "svd": "randomized"}},
        "4": {"class_type": "LoraFoundryMergeLoRA",
              "inputs": {"mode": "exact", "rank": 8, "dynamic": "off", "dynamic_param": 0.9,
                         **slots, "lora_1": "toolbox-a.safetensors", "ratio_1": 0.5, "lora_in_2": ["3", 0]}},
        "5": {"class_type": "LoraFoundrySaveLoRA",
              "inputs": {"lora": ["4", 0], "filename_prefix": "toolbox/merged", "precision": "fp32", "folder": "loras",
                         "overwrite": True}},
        "6": {"class_type": "LoraFoundryMergeLoRA",
              "inputs": {"mode": "into model", "rank": 8, "dynamic": "off", "dynamic_param": 0.9, **slots,
                         "lora_1": "toolbox-a.safetensors", "ratio_1": 0.5, "model": ["1", 0], "clip": ["1", 1],
                         "vae": ["1", 2], "checkpoint_prefix": "toolbox/merged"}},
    }
    server.run(prompt, timeout=300)
    tensors, _ = core.files.read_safetensors(loras / "toolbox" / "merged.safetensors")
    merged = flat_deltas(core.Network.from_state_dict(tensors))
    want = flat_deltas(network)
    assert set(merged) == set(want)
    for name, delta in want.items():
        assert rel(merged[name], 1.3 * delta) < 1e-4, name

    saved = load_file(str(server.base_dir / "models" / "checkpoints" / "toolbox" / "merged_00001.safetensors"))
    original = load_file(str(tiny_checkpoint))
    name = next(n for n in want if n.endswith("attn1_to_q") and n.startswith("lora_unet"))
    key = "model." + network.weight_keys[name]
    expected = original[key].double() + 0.5 * want[name].double().reshape(original[key].shape)
    assert rel(saved[key], expected) < 1e-3  # the checkpoint keeps the model's fp16
