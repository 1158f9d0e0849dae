"""LyCORIS Tucker factors (LoCon `lora_mid`, LoHa `hada_t1/t2`, LoKr `lokr_t2`) against the real host.

Files are built here from a seed in LyCORIS' layout (independently of our `create`), for every
kxk convolution of a narrow SD1.5-layout UNet, the stride-2 Downsample included. What our
adapters compute from them must be what ComfyUI's LoraLoader patches in; they must write back the
same tensors; Merge / Resize must take them exactly; and `use_tucker` must train such factors.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import comfy_weights
from harness import fixtures

NARROW_UNET = {
    **fixtures.SD15_TINY_UNET, "model_channels": 32, "context_dim": 64, "channel_mult": [1, 2],
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
}
# ResBlock convs (3x3 and the 1x1 skips), the stride-2 Downsample and the Upsample conv.
CONV_LAYERS = {"preset": "locon", "exclude": ["*transformer_blocks*", "*.proj_in", "*.proj_out", "*.emb_layers.*"]}
KINDS = ["locon", "loha", "lokr"]
TUCKER_KEYS = {"locon": "lora_mid.weight", "loha": "hada_t1", "lokr": "lokr_t2"}
LOADER_COMPLAINTS = ("lora key not loaded", "NOT LOADED", "ERROR", "SHAPE MISMATCH")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def narrow(comfy_root):
    """A ComfyUI MODEL around the narrow UNet, built in-process with seeded weights."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(NARROW_UNET)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    fixtures.init_weights_(base.diffusion_model, 0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def convs(core, narrow) -> dict[str, tuple[str, torch.nn.Conv2d]]:
    """{kohya module name: (weight key, layer)} of the convolutions LoCon adapts."""
    names = core.Network.create(core.Config(rank=1, **CONV_LAYERS), narrow).weight_keys
    modules = dict(narrow.model.named_modules())
    found = {name: (key, modules[key[: -len(".weight")]]) for name, key in names.items()}
    assert any(m.stride == (2, 2) for _, m in found.values()), "the Downsample conv should be among them"
    assert any(m.kernel_size == (1, 1) for _, m in found.values()) and any(m.kernel_size == (3, 3) for _, m in found.values())
    return found


@pytest.fixture(scope="module")
def base(narrow, convs) -> dict[str, torch.Tensor]:
    """{kohya module name: W} unpatched, whatever patcher the host has loaded last."""
    weights = comfy_weights(narrow, [key for key, _ in convs.values()])
    return {name: weights[key] for name, (key, _) in convs.items()}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    return x, torch.tensor([5.0, 0.5]), torch.randn(2, 7, NARROW_UNET["context_dim"], generator=gen)


@pytest.fixture
def comfy_load(core, comfy_nodes, loras_dir, caplog):
    """Write tensors with our writer, load them with ComfyUI's LoraLoader, assert it complained about no key."""
    def load(model, tensors, name, metadata=None):
        path = core.files.write_safetensors(tensors, loras_dir / f"{name}.safetensors", metadata)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            new_model, _ = comfy_nodes.LoraLoader().load_lora(model, None, path.name, 1.0, 1.0)
        complaints = [r.getMessage() for r in caplog.records if any(c in r.getMessage() for c in LOADER_COMPLAINTS)]
        assert not complaints, "\n".join(complaints[:20])
        return new_model

    return load


def unet_output(patcher, inputs) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    x, sigma, context = inputs
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def split(dim: int) -> tuple[int, int]:
    """dim = m * n with m the largest divisor <= sqrt(dim) (LyCORIS' factorization with factor -1)."""
    m = max(i for i in range(1, int(dim**0.5) + 1) if dim % i == 0)
    return m, dim // m


def tucker_file(kind: str, convs, base, rank: int = 3, alpha: float = 2.0, seed: int = 0, scale: float = 0.3,
                dora: bool = False) -> dict[str, torch.Tensor]:
    """A LyCORIS file with Tucker factors on every kxk conv (plain factors on 1x1 ones), from a seed."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen) * scale

    out = {}
    for name, (_, layer) in convs.items():
        o, i, *k = layer.weight.shape
        tucker = any(s != 1 for s in k)
        ones = [1] * len(k)
        if kind == "locon":
            factors = {"lora_down.weight": rand(rank, i, *(ones if tucker else k)), "lora_up.weight": rand(o, rank, *ones)}
            if tucker:
                factors["lora_mid.weight"] = rand(rank, rank, *k)
        elif kind == "loha" and tucker:
            factors = {"hada_w1_a": rand(rank, o), "hada_w1_b": rand(rank, i), "hada_t1": rand(rank, rank, *k),
                       "hada_w2_a": rand(rank, o), "hada_w2_b": rand(rank, i), "hada_t2": rand(rank, rank, *k)}
        elif kind == "loha":
            factors = {"hada_w1_a": rand(o, rank), "hada_w1_b": rand(rank, i), "hada_w2_a": rand(o, rank),
                       "hada_w2_b": rand(rank, i)}
        else:
            (a, b), (c, d) = split(o), split(i)
            factors = {"lokr_w1": rand(a, c)}
            if tucker:
                factors.update(lokr_w2_a=rand(rank, b), lokr_w2_b=rand(rank, d), lokr_t2=rand(rank, rank, *k))
            else:
                factors.update(lokr_w2_a=rand(b, rank), lokr_w2_b=rand(rank, d))
        factors["alpha"] = torch.tensor(alpha)
        if dora:
            norms = base[name].transpose(0, 1).reshape(i, -1).norm(dim=1).reshape(1, i, *ones)
            factors["dora_scale"] = norms * (0.5 + torch.rand(norms.shape, generator=gen))
        out.update({f"{name}.{key}": value for key, value in factors.items()})
    return out


def comfy_ready(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file with each lokr_t2 contracted by ComfyUI's own einsum, made contiguous, and alpha / r put in lokr_w1.

    ComfyUI's loader means exactly this dW, but on the Tucker file torch.kron rejects its
    non-contiguous einsum result (see test_comfy_applies_lokr_tucker_as_we_do_or_fails_in_torch_kron).
    """
    out = dict(tensors)
    for module in [k[: -len("lokr_t2")] for k in tensors if k.endswith(".lokr_t2")]:
        t2, w2_a, w2_b, alpha = (out.pop(module + n) for n in ("lokr_t2", "lokr_w2_a", "lokr_w2_b", "alpha"))
        out[module + "lokr_w2"] = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a).contiguous()
        out[module + "lokr_w1"] = out[module + "lokr_w1"] * (alpha / w2_b.shape[0])
    return out


# --- reading: our adapters compute what ComfyUI's loader patches in ---------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("kind", KINDS)
def test_tucker_files_change_each_weight_exactly_as_comfys_loader_does(core, narrow, convs, base, comfy_load, kind,
                                                                        dora):
    tensors = tucker_file(kind, convs, base, seed=KINDS.index(kind), dora=dora)
    assert sum(k.endswith(TUCKER_KEYS[kind]) for k in tensors) == sum(m.kernel_size != (1, 1) for _, m in convs.values())
    loaded = comfy_load(narrow, comfy_ready(tensors), f"{kind}-tucker-{dora}")
    keys = [key for key, _ in convs.values()]
    assert set(loaded.patches) == set(keys)
    comfy = comfy_weights(loaded, keys)

    network = core.Network.from_state_dict(tensors, model=narrow)
    assert set(network.adapters) == set(convs)
    with torch.no_grad():
        for name, (key, _) in convs.items():
            weight = base[name]
            adapter = network.adapters[name]
            assert adapter.shape == tuple(weight.shape), name
            assert rel(adapter(weight) - weight, comfy[key] - weight) < 1e-6, name
            if not dora:
                assert rel(adapter.delta(), comfy[key] - weight) < 1e-6, name

    # Our own apply path takes the file whole: no module is reported as unreadable or mismatched.
    applied, _, report = core.apply.apply_lora(narrow, None, tensors)
    assert report.ok and sorted(report.applied) == sorted(convs), report.summary()
    # ... and changes every weight as ComfyUI's loader does (for LoKr-Tucker, as its loader would if its
    # kron did not fail: our path hands ComfyUI the same change without the Tucker core).
    ours = comfy_weights(applied, keys)
    for name, (key, _) in convs.items():
        assert rel(ours[key] - base[name], comfy[key] - base[name]) < 1e-6, name


def test_comfy_applies_lokr_tucker_as_we_do_or_fails_in_torch_kron(core, narrow, convs, base, comfy_load, caplog):
    """ComfyUI 0.3.75 with torch 2.13 logs "ERROR lokr <key> view size is not compatible ..." for every
    kxk LoKr-Tucker layer and leaves it unchanged; `without_tucker` gives it a form it applies as we do."""
    tensors = tucker_file("lokr", convs, base, seed=30)
    network = core.Network.from_state_dict(tensors, model=narrow)
    keys = [key for key, _ in convs.values()]
    loaded = comfy_load(narrow, tensors, "lokr-tucker-raw")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        raw = comfy_weights(loaded, keys)
    failed = {r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("ERROR lokr")}
    assert all("view size is not compatible" in r.getMessage() for r in caplog.records), caplog.text
    parts, _ = core.files.split_modules(tensors)
    ready = {f"{n}.{k}": v for n, p in parts.items() for k, v in core.adapters.without_tucker(p).items()}
    assert not any(k.endswith(".lokr_t2") for k in ready)
    fixed = comfy_weights(comfy_load(narrow, ready, "lokr-tucker-ready"), keys)
    with torch.no_grad():
        for name, (key, layer) in convs.items():
            ours = network.adapters[name].delta()
            assert rel(fixed[key] - base[name], ours) < 1e-6, name
            if key in failed:
                assert layer.kernel_size != (1, 1) and torch.equal(raw[key], base[name]), name
            else:
                assert rel(raw[key] - base[name], ours) < 1e-6, name


def test_a_tucker_adapter_changes_the_model_output_as_comfy_does(core, narrow, convs, base, comfy_load, inputs):
    tensors = tucker_file("locon", convs, base, seed=7, scale=0.2)
    loaded = comfy_load(narrow, tensors, "locon-tucker-output")
    trained, _ = core.Network.from_state_dict(tensors, model=narrow).eval().attach(narrow, None)
    y_base, y_comfy, y_ours = unet_output(narrow, inputs), unet_output(loaded, inputs), unet_output(trained, inputs)
    assert rel(y_comfy, y_base) > 1e-2
    assert rel(y_ours, y_comfy) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_factors_write_back_the_file_tensors_under_the_same_keys(core, convs, base, kind):
    tensors = tucker_file(kind, convs, base, seed=10 + KINDS.index(kind), dora=True)
    again = core.Network.from_state_dict(tensors).state_dict_kohya()
    assert set(again) == set(tensors)
    for key, value in tensors.items():
        assert again[key].shape == value.shape and torch.equal(again[key], value), key


def test_tucker_factors_that_do_not_fit_are_reported_by_module(core, narrow, convs, base):
    tensors = tucker_file("locon", convs, base, seed=3)
    name = next(n for n, (_, m) in convs.items() if m.kernel_size == (3, 3))
    tensors[f"{name}.lora_mid.weight"] = torch.zeros(2, 3, 3, 3)  # rank 3 down, a rank-2 core
    loha = tucker_file("loha", convs, base, seed=4)
    other = next(n for n, (_, m) in convs.items() if m.kernel_size == (3, 3) and n != name)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(other + ".")}
    tensors.update({k: v for k, v in loha.items() if k.startswith(other + ".") and not k.endswith("hada_t2")})
    with pytest.raises(ValueError) as err:
        core.Network.from_state_dict(tensors, model=narrow)
    assert name in str(err.value) and "lora_mid" in str(err.value)
    assert other in str(err.value) and "hada_t2" in str(err.value)


# --- the toolbox takes Tucker files -----------------------------------------------------------

@pytest.fixture(scope="module")
def exact_deltas(core, narrow, convs, base, comfy_nodes, loras_dir):
    """{kind: (tensors, {module: dW [out, in*k*k] as ComfyUI computes it})}, the reference for the toolbox."""
    out = {}
    for i, kind in enumerate(KINDS):
        tensors = tucker_file(kind, convs, base, seed=20 + i)
        path = core.files.write_safetensors(comfy_ready(tensors), loras_dir / f"exact-{kind}.safetensors")
        loaded, _ = comfy_nodes.LoraLoader().load_lora(narrow, None, path.name, 1.0, 1.0)
        patched = comfy_weights(loaded, [k for k, _ in convs.values()])
        out[kind] = (tensors, {name: (patched[key] - base[name]).reshape(base[name].shape[0], -1)
                               for name, (key, _) in convs.items()})
    return out


def test_exact_merge_of_tucker_files_is_the_weighted_sum_of_their_changes(core, narrow, exact_deltas, comfy_load):
    ratios = {"locon": 0.8, "loha": -0.5, "lokr": 1.3}
    inputs = [(core.Network.from_state_dict(exact_deltas[k][0], model=narrow), r) for k, r in ratios.items()]
    merged, report = core.merge.merge_exact(inputs, core.ranks.RankRule(4096))
    assert sorted(merged.adapters) == sorted(exact_deltas["locon"][1])
    for name, adapter in merged.adapters.items():
        want = sum(r * exact_deltas[k][1][name].double() for k, r in ratios.items())
        assert rel(adapter.delta().reshape(want.shape), want) < 1e-5, name
    assert abs(report.energy - 1) < 1e-6
    comfy_load(narrow, merged.state_dict_kohya(), "merged-tucker")

    # LoCon-Tucker inputs alone take the factored path, and concat keeps them exact at the sum of ranks.
    locon = inputs[0][0]
    for merge in (lambda x: core.merge.merge_exact(x, core.ranks.RankRule(4096)), core.merge.merge_concat):
        result, _ = merge([(locon, 0.8), (locon, 0.7)])
        for name, adapter in result.adapters.items():
            want = 1.5 * exact_deltas["locon"][1][name].double()
            assert rel(adapter.delta().reshape(want.shape), want) < 1e-5, name


@pytest.mark.parametrize("kind", KINDS)
def test_resize_of_a_tucker_file_is_the_truncated_svd_of_its_exact_change(core, narrow, exact_deltas, comfy_load, kind):
    tensors, deltas = exact_deltas[kind]
    network = core.Network.from_state_dict(tensors, model=narrow)
    same, same_report = core.resize.resize_lora(network, core.ranks.RankRule(4096))
    for name, adapter in same.adapters.items():
        assert rel(adapter.delta().reshape(deltas[name].shape), deltas[name]) < 1e-5, name
    assert abs(same_report.energy - 1) < 1e-6

    small, report = core.resize.resize_lora(network, core.ranks.RankRule(2))
    for name, adapter in small.adapters.items():
        want = deltas[name].double()
        s = torch.linalg.svdvals(want)
        best = float((s[2:] ** 2).sum().sqrt() / s.norm())  # Eckart-Young: the least error at rank 2
        got = rel(adapter.delta().reshape(want.shape), want)
        assert adapter.rank <= 2 and got == pytest.approx(best, abs=1e-5), name
        assert got == pytest.approx(report.layer(name).error, abs=1e-5), name
    if kind == "locon":  # a LoRA keeps its scale alpha / rank
        assert all(a.alpha == pytest.approx(2.0 / 3 * a.rank) for a in small.adapters.values())
    comfy_load(narrow, small.state_dict_kohya(), f"resized-{kind}-tucker")


@pytest.mark.server
def test_resize_and_merge_nodes_take_tucker_files_through_the_server(core, server, convs, exact_deltas):
    """The nodes read files unbound (no model), so the narrow UNet's small layers do (cheap SVDs)."""
    loras = server.base_dir / "models" / "loras"
    for kind, (tensors, _) in exact_deltas.items():
        core.files.write_safetensors(tensors, loras / f"tucker-{kind}.safetensors")
    slots = {f"{kind}_{i}": value for i in range(1, 5) for kind, value in (("lora", "None"), ("ratio", 1.0))}
    save = {"filename_prefix": "", "precision": "fp32", "folder": "loras", "overwrite": True}
    prompt = {
        "1": {"class_type": "LoraFoundryResizeLoRA",
              "inputs": {"lora_name": "tucker-locon.safetensors", "rank": 2, "dynamic": "off", "dynamic_param": 0.9}},
        "2": {"class_type": "LoraFoundrySaveLoRA", "inputs": {"lora": ["1", 0], **save, "filename_prefix": "tucker/resized"}},
        "3": {"class_type": "LoraFoundryMergeLoRA",
              "inputs": {"mode": "exact", "rank": 4096, "dynamic": "off", "dynamic_param": 0.9, **slots,
                         "lora_1": "tucker-locon.safetensors", "ratio_1": 0.5,
                         "lora_2": "tucker-loha.safetensors", "ratio_2": -1.0,
                         "lora_3": "tucker-lokr.safetensors", "ratio_3": 0.7}},
        "4": {"class_type": "LoraFoundrySaveLoRA", "inputs": {"lora": ["3", 0], **save, "filename_prefix": "tucker/merged"}},
    }
    server.run(prompt, timeout=300)
    deltas = {kind: {n: d.double() for n, d in exact.items()} for kind, (_, exact) in exact_deltas.items()}
    resized = core.Network.from_state_dict(core.files.read_safetensors(loras / "tucker" / "resized.safetensors")[0])
    for name, adapter in resized.adapters.items():
        want = deltas["locon"][name]
        s = torch.linalg.svdvals(want)
        got = rel(adapter.delta().reshape(want.shape), want)
        assert adapter.rank == 2 and got == pytest.approx(float((s[2:] ** 2).sum().sqrt() / s.norm()), abs=1e-5), name
    merged = core.Network.from_state_dict(core.files.read_safetensors(loras / "tucker" / "merged.safetensors")[0])
    assert set(merged.adapters) == set(convs)
    for name, adapter in merged.adapters.items():
        want = 0.5 * deltas["locon"][name] - deltas["loha"][name] + 0.7 * deltas["lokr"][name]
        assert rel(adapter.delta().reshape(want.shape), want) < 1e-5, name


# --- training with use_tucker -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_use_tucker_trains_from_zero_and_comfy_loads_the_result(core, narrow, convs, inputs, comfy_load, kind):
    config = core.Config(algorithm=kind, rank=4, alpha=2.0, use_tucker=True, seed=5, **CONV_LAYERS)
    network = core.Network.create(config, narrow)
    for name, (_, layer) in convs.items():
        factors = network.adapters[name].factors()
        assert (TUCKER_KEYS[kind] in factors) == (layer.kernel_size != (1, 1)), name

    base = unet_output(narrow, inputs)
    network.train()
    trained, _ = network.attach(narrow, None)
    import comfy.model_management

    comfy.model_management.load_models_gpu([trained])
    x, sigma, context = inputs
    optimizer = torch.optim.Adam(network.trainable_parameters(), lr=1e-2)
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(False):
        for step in range(3):
            out = trained.model.apply_model(x, sigma, c_crossattn=context)
            if step == 0:
                assert torch.equal(out, base)  # dW = 0 exactly at step 0
            optimizer.zero_grad()
            (out - target).pow(2).mean().backward()
            if step == 0:
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.trainable_parameters())
            optimizer.step()
    network.eval()
    y_trained = unet_output(trained, inputs)
    assert rel(y_trained, base) > 1e-4, "three steps should change the output"

    metadata = core.metadata.kohya_metadata(config, narrow.model.model_config, title=f"tucker-{kind}")
    assert '"use_tucker": "True"' in metadata["ss_network_args"]
    loaded = comfy_load(narrow, network.state_dict_kohya(), f"trained-{kind}-tucker", metadata)
    assert set(loaded.patches) == set(network.weight_keys.values())
    assert rel(unet_output(loaded, inputs), y_trained) < 1e-5
    assert core.Config.from_json(metadata["lora_foundry_config"]).use_tucker


@pytest.mark.parametrize("kind", ["dylora", "lokr"])
def test_use_tucker_is_refused_where_no_host_could_apply_it(core, kind):
    with pytest.raises(ValueError, match="use_tucker"):
        core.Config(algorithm=kind, use_tucker=True)
