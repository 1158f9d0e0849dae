"""The LoRA stack against the real host: LoRA Stack / Apply LoRA Stack equal ComfyUI's LoraLoader chain,
block weights (presets, vectors, the key -> block map), row parsing and its errors, and the server route."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import comfy_weights

# Three fixture LoRAs on the tiny SD1.5 checkpoint (UNet + CLIP-L): (algorithm, rank, alpha, preset, seed).
FIXTURE_LORAS = {
    "stack/locon.safetensors": ("lora", 4, 2.0, "locon", 1),
    "stack/loha.safetensors": ("loha", 2, 2.0, "kohya", 2),
    "stack/lokr.safetensors": ("lokr", 2, 1.0, "attention", 3),
}
# (name, strength_model, strength_clip): negative and different strengths, default clip strength on the last.
ROWS = [("stack/locon.safetensors", 0.8, 0.6), ("stack/loha.safetensors", -0.7, 1.3), ("stack/lokr.safetensors", 1.2, 1.2)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lf(pack) -> SimpleNamespace:
    def load(name):
        return importlib.import_module(f"{pack.__name__}.{name}")

    network, stack = load("lora_core.network"), load("lora_core.stack")
    lora_file = load("nodes.loras").lora_file  # how the nodes find a row's file
    stack = SimpleNamespace(parse_rows=stack.parse_rows, StackError=stack.StackError,
                            apply_stack=functools.partial(stack.apply_stack, resolve=lora_file))
    return SimpleNamespace(stack=stack, bw=load("lora_core.block_weights"),
                           files=load("lora_core.files"), nodes=load("nodes.apply"),
                           Network=network.LoraNetwork, Config=network.NetworkConfig)


def random_network(lf, model, clip, algorithm, rank, alpha, preset, seed, scale=0.1):
    config = lf.Config(algorithm=algorithm, rank=rank, alpha=alpha, preset=preset, text_encoder=True)
    network = lf.Network.create(config, model, clip)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return network.eval()


def write_fixture_loras(lf, model, clip, folder) -> None:
    for name, (algorithm, rank, alpha, preset, seed) in FIXTURE_LORAS.items():
        network = random_network(lf, model, clip, algorithm, rank, alpha, preset, seed)
        lf.files.write_safetensors(network.state_dict_kohya(), folder / name)


@pytest.fixture(scope="module")
def loras(lf, loaded_checkpoint, tmp_path_factory):
    """The fixture LoRAs in a folder registered as a ComfyUI `loras` folder."""
    import folder_paths

    model, clip, _ = loaded_checkpoint
    folder = tmp_path_factory.mktemp("stack-loras")
    write_fixture_loras(lf, model, clip, folder)
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def rows_json(rows, **extra) -> str:
    return json.dumps([{"lora": n, "strength_model": sm, "strength_clip": sc, **extra} for n, sm, sc in rows])


def chain(comfy_nodes, model, clip, rows):
    """ComfyUI's own LoraLoader, one per row."""
    for name, strength_model, strength_clip in rows:
        model, clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, strength_model, strength_clip)
    return model, clip


def assert_same_weights(a, b, keys, tol=1e-5):
    wa, wb = comfy_weights(a, keys), comfy_weights(b, keys)
    for key in keys:
        err = ((wa[key].double() - wb[key].double()).norm() / wb[key].double().norm()).item()
        assert err <= tol, f"{key}: relative difference {err:.2e}"


def patched_keys(model, clip) -> tuple[set[str], set[str]]:
    return set(model.patches), set(clip.patcher.patches) if clip is not None else set()


# --- stack == LoraLoader chain -------------------------------------------------------------

def test_stack_of_lora_loha_lokr_equals_comfys_loader_chain(lf, loaded_checkpoint, loras, comfy_nodes):
    model, clip, _ = loaded_checkpoint
    rows = lf.stack.parse_rows(rows_json(ROWS))
    got_model, got_clip, report = lf.stack.apply_stack(model, clip, rows)
    want_model, want_clip = chain(comfy_nodes, model, clip, ROWS)
    unet_keys, te_keys = patched_keys(got_model, got_clip)
    assert (unet_keys, te_keys) == patched_keys(want_model, want_clip)
    assert any(".0.in_layers." in k for k in unet_keys) and te_keys  # LoCon convs and the text encoder
    assert_same_weights(got_model, want_model, sorted(unet_keys))
    assert_same_weights(got_clip.patcher, want_clip.patcher, sorted(te_keys))
    assert report.ok and [len(r.applied) for _, _, r, _ in report.entries] == [
        len(lf.files.split_modules(lf.files.read_safetensors(loras / n)[0])[0]) for n, _, _ in ROWS]
    # Different strengths really differ: the loader chain at other strengths does not match.
    other_model, _ = chain(comfy_nodes, model, clip, [(n, 1.0, 1.0) for n, _, _ in ROWS])
    with pytest.raises(AssertionError):
        assert_same_weights(got_model, other_model, sorted(unet_keys))


def test_rows_that_are_off_or_at_zero_strength_are_skipped(lf, loaded_checkpoint, loras, comfy_nodes):
    model, clip, _ = loaded_checkpoint
    rows = json.loads(rows_json(ROWS))
    rows[1]["on"] = False
    rows.append({"lora": "stack/loha.safetensors", "strength_model": 0, "strength_clip": 0})
    got_model, got_clip, report = lf.stack.apply_stack(model, clip, lf.stack.parse_rows(json.dumps(rows)))
    want_model, want_clip = chain(comfy_nodes, model, clip, [ROWS[0], ROWS[2]])
    unet_keys, te_keys = patched_keys(got_model, got_clip)
    assert (unet_keys, te_keys) == patched_keys(want_model, want_clip)
    assert_same_weights(got_model, want_model, sorted(unet_keys))
    assert_same_weights(got_clip.patcher, want_clip.patcher, sorted(te_keys))
    summary = report.summary()
    assert "2. stack/loha.safetensors" in summary and ": off" in summary and "strengths 0, skipped" in summary


def test_chained_stack_nodes_equal_one_apply_node_with_all_rows(lf, loaded_checkpoint, loras):
    model, clip, _ = loaded_checkpoint
    nodes = lf.nodes
    (first,) = nodes.LoraStack.execute(rows_json(ROWS[:1])).args
    (second,) = nodes.LoraStack.execute(rows_json(ROWS[1:2], block_weights="OUTS"), lora_stack=first).args
    chained = nodes.ApplyLoraStack.execute(model, rows_json(ROWS[2:]), clip=clip, lora_stack=second).args
    all_rows = json.loads(rows_json(ROWS))
    all_rows[1]["block_weights"] = "OUTS"
    single = nodes.ApplyLoraStack.execute(model, json.dumps(all_rows), clip=clip).args
    every_row = [{"on": True, "block_weights": "", **r} for r in all_rows]
    assert chained[2] == single[2] == every_row  # the LORA_STACK output
    unet_keys, te_keys = patched_keys(chained[0], chained[1])
    assert (unet_keys, te_keys) == patched_keys(single[0], single[1])
    assert_same_weights(chained[0], single[0], sorted(unet_keys), tol=0)
    assert_same_weights(chained[1].patcher, single[1].patcher, sorted(te_keys), tol=0)
    assert chained[3] == single[3] and "1. stack/locon.safetensors (model 0.8, clip 0.6)" in chained[3]


def test_unmatched_and_mismatched_keys_are_reported_by_name(lf, loaded_checkpoint, loras):
    model, clip, _ = loaded_checkpoint
    tensors, _ = lf.files.read_safetensors(loras / "stack/locon.safetensors")
    name = next(k[: -len(".lora_down.weight")] for k in sorted(tensors) if k.startswith("lora_unet") and k.endswith("attn1_to_q.lora_down.weight"))
    tensors["lora_unet_no_such_block_proj.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_block_proj.lora_up.weight"] = torch.zeros(8, 4)
    tensors[f"{name}.lora_down.weight"] = torch.zeros(4, 7)  # the layer takes 320 inputs
    tensors["stray_tensor"] = torch.zeros(1)
    lf.files.write_safetensors(tensors, loras / "stack/broken.safetensors")
    _, _, _, report = lf.nodes.ApplyLoraStack.execute(model, '[{"lora": "stack/broken.safetensors"}]', clip=clip).args
    assert "lora_unet_no_such_block_proj" in report and f"{name}:" in report and "stray_tensor" in report
    assert "no matching layer" in report and "shape mismatch" in report


# --- block weights -----------------------------------------------------------------------------

def test_block_weights_of_all_ones_equal_plain_apply_and_all_zeros_leave_the_base(lf, loaded_checkpoint, loras):
    model, clip, _ = loaded_checkpoint
    plain = lf.stack.apply_stack(model, clip, lf.stack.parse_rows(rows_json(ROWS)))
    base_keys = patched_keys(model, clip)
    for ones in ("ALL", ",".join(["1"] * 17), ",".join(["1"] * 26)):
        got = lf.stack.apply_stack(model, clip, lf.stack.parse_rows(rows_json(ROWS, block_weights=ones)))
        unet_keys, te_keys = patched_keys(got[0], got[1])
        assert (unet_keys, te_keys) == patched_keys(plain[0], plain[1])
        assert_same_weights(got[0], plain[0], sorted(unet_keys), tol=0)
        assert_same_weights(got[1].patcher, plain[1].patcher, sorted(te_keys), tol=0)
    for zeros in ("NONE", ",".join(["0"] * 17)):
        got = lf.stack.apply_stack(model, clip, lf.stack.parse_rows(rows_json(ROWS, block_weights=zeros)))
        assert patched_keys(got[0], got[1]) == base_keys  # nothing patched: the base model and text encoder
        assert all(r.zeroed for _, _, r, _ in got[2].entries) and "block weight of 0" in got[2].summary()


def test_a_preset_without_out_blocks_leaves_them_unpatched(lf, loaded_checkpoint, loras, comfy_nodes):
    model, clip, _ = loaded_checkpoint
    got_model, got_clip, _ = lf.stack.apply_stack(model, clip, lf.stack.parse_rows(rows_json(ROWS, block_weights="INALL")))
    plain_model, plain_clip, _ = lf.stack.apply_stack(model, clip, lf.stack.parse_rows(rows_json(ROWS)))
    unet_keys, te_keys = patched_keys(got_model, got_clip)
    assert unet_keys and all(k.startswith("diffusion_model.input_blocks.") for k in unet_keys)
    assert any(k.startswith("diffusion_model.output_blocks.") for k in plain_model.patches)
    assert unet_keys == {k for k in plain_model.patches if k.startswith("diffusion_model.input_blocks.")}
    assert_same_weights(got_model, plain_model, sorted(unet_keys), tol=0)
    assert_same_weights(got_clip.patcher, plain_clip.patcher, sorted(te_keys), tol=0)  # BASE kept


def test_a_block_vector_scales_each_block_like_a_loader_at_that_strength(lf, loaded_checkpoint, loras, comfy_nodes):
    """Tiny SD1.5 UNet: input_blocks.1 (IN01), middle_block (MID), output_blocks.0/.1 (no attention in SD1.5's
    OUT00/OUT01: they follow OUT03)."""
    model, clip, _ = loaded_checkpoint
    layout = lf.bw.SD1
    vector = dict.fromkeys(layout.short_ids, 5.0)
    vector.update(BASE=0.5, IN01=2.0, MID=0.0, OUT03=-1.0)
    name, strength_model, strength_clip = ROWS[0]
    row = {"lora": name, "strength_model": strength_model, "strength_clip": strength_clip,
           "block_weights": ",".join(f"{v:g}" for v in vector.values())}
    got_model, got_clip, _ = lf.stack.apply_stack(model, clip, lf.stack.parse_rows([row]))
    keys = set(got_model.patches)
    assert not any(k.startswith("diffusion_model.middle_block.") for k in keys)
    for prefix, weight in (("diffusion_model.input_blocks.", 2.0), ("diffusion_model.output_blocks.", -1.0)):
        want, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, strength_model * weight, 0.0)
        part = sorted(k for k in keys if k.startswith(prefix))
        assert part and part == sorted(k for k in want.patches if k.startswith(prefix))
        assert_same_weights(got_model, want, part)
    _, want_clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, 0.0, strength_clip * 0.5)
    assert_same_weights(got_clip.patcher, want_clip.patcher, sorted(got_clip.patcher.patches))


def test_every_kohya_diffusers_name_maps_to_the_block_of_its_ldm_key(lf, comfy_root):
    import comfy.supported_models
    import comfy.utils

    sd15 = {"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1}
    sdxl = {"num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}
    for layout, config in ((lf.bw.SD1, sd15), (lf.bw.SDXL, sdxl)):
        mapping = comfy.utils.unet_to_diffusers(config)
        blocks = set()
        for diffusers, ldm in mapping.items():
            if ldm.startswith(f"input_blocks.{layout.inputs}.") or ldm.startswith(f"output_blocks.{layout.inputs - 1}.2."):
                continue  # comfy's map also names a last-level down- / upsampler that the UNet does not have
            kohya = "lora_unet_" + diffusers.rsplit(".", 1)[0].replace(".", "_")
            want = lf.bw.block_of("diffusion_model." + ldm, layout)
            assert want is not None and lf.bw.block_of(kohya, layout) == want, (kohya, ldm)
            assert lf.bw.block_of("unet." + diffusers, layout) == want
            blocks.add(want)
        # Blocks with attention in the real layout are exactly the short vector's UNet blocks.
        attention = {lf.bw.block_of("diffusion_model." + ldm, layout) for ldm in mapping.values() if ".1.transformer_blocks." in ldm}
        assert attention == set(layout.short_ids) - {"BASE"}
        assert blocks <= set(layout.all_ids)
    for key in ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_3_self_attn_q_proj",
                "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"):
        assert lf.bw.block_of(key) == "BASE"
    assert lf.bw.block_of("diffusion_model.time_embed.0.weight") == "IN00"
    assert lf.bw.block_of("diffusion_model.out.2.weight", lf.bw.SDXL) == "OUT08"


def test_short_vectors_fill_blocks_without_attention_from_their_nearest_listed_block(lf):
    bw = lf.bw
    for layout, fills in ((bw.SD1, {"IN00": "IN01", "IN03": "IN02", "IN06": "IN05", "IN09": "IN08", "IN11": "IN08",
                                    "OUT00": "OUT03", "OUT02": "OUT03"}),
                          (bw.SDXL, {"IN00": "IN04", "IN03": "IN04", "IN06": "IN05", "OUT06": "OUT05", "OUT08": "OUT05"})):
        short = layout.short_ids
        weights = bw.parse_block_weights(",".join(str(i / 10) for i in range(len(short))), layout).weights
        assert set(weights) == set(layout.all_ids)
        for i, block in enumerate(short):
            assert weights[block] == i / 10
        for block, source in fills.items():
            assert weights[block] == weights[source], block
        full = bw.parse_block_weights([i for i in range(len(layout.all_ids))], layout).weights
        assert list(full.values()) == list(range(len(layout.all_ids))) and list(full) == layout.all_ids


def test_presets_follow_the_block_groups(lf):
    bw = lf.bw
    for layout in (bw.SD1, bw.SDXL):
        table = bw.presets(layout)
        assert {"NONE", "ALL", "ALL0.5", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL"} <= set(table)
        for name, vector in table.items():
            assert len(vector.split(",")) == len(layout.short_ids), name
            parsed = bw.parse_block_weights(name.lower(), layout).weights
            assert parsed == bw.parse_block_weights(vector, layout).weights
        outd = bw.parse_block_weights("OUTD", layout).weights
        assert outd["BASE"] == 1 and outd["MID"] == 0 and all(outd[f"IN{i:02d}"] == 0 for i in range(layout.inputs))
        assert [outd[f"OUT{i:02d}"] for i in layout.deep_out] == [1.0] * len(layout.deep_out)
        assert outd[f"OUT{layout.attention_out[-1]:02d}"] == 0
        ins, ind = bw.parse_block_weights("INS", layout).weights, bw.parse_block_weights("IND", layout).weights
        assert all(ins[b] + ind[b] == 1 for b in layout.all_ids if b.startswith("IN"))


def test_block_weight_errors_name_the_expected_blocks(lf, loaded_checkpoint, loras):
    model, clip, _ = loaded_checkpoint
    bw = lf.bw
    with pytest.raises(ValueError, match=r"12 values; an SD1.x/2.x UNet takes 17 values \(BASE, IN01, IN02, IN04.*OUT11\) or 26"):
        bw.parse_block_weights(",".join(["1"] * 12), bw.SD1)
    with pytest.raises(ValueError, match=r"17 values; an SDXL UNet takes 12 values \(BASE, IN04, IN05, IN07, IN08, MID, OUT00"):
        bw.parse_block_weights(",".join(["1"] * 17), bw.SDXL)
    with pytest.raises(ValueError, match="neither a preset"):
        bw.parse_block_weights("OUTX", bw.SD1)
    with pytest.raises(ValueError, match=r"value 3 \('x'\) is not a number"):
        bw.parse_block_weights(["1", "1", "x"], bw.SD1)
    rows = lf.stack.parse_rows('[{"lora": "stack/lokr.safetensors"}, {"lora": "stack/loha.safetensors", "block_weights": "1,0,1"}]')
    with pytest.raises(ValueError, match=r"stack row 2, field 'block_weights': 3 values; an SD1.x/2.x UNet takes 17"):
        lf.stack.apply_stack(model, clip, rows)


# --- rows ---------------------------------------------------------------------------------------

def test_rows_take_defaults_and_ignore_unknown_fields(lf):
    parse = lf.stack.parse_rows
    assert parse("") == parse("[]") == parse("  ") == []
    (row,) = parse('[{"lora": "a.safetensors", "strength_model": -0.5, "colour": "red"}]')
    assert row.to_dict() == {"lora": "a.safetensors", "on": True, "strength_model": -0.5, "strength_clip": -0.5,
                             "block_weights": ""}
    (row,) = parse([["b.safetensors", 0.3, 0.2]])  # other packs' LORA_STACK rows
    assert (row.lora, row.strength_model, row.strength_clip) == ("b.safetensors", 0.3, 0.2)
    (row,) = parse([{"lora": "c.safetensors", "block_weights": [1, 0, 1], "on": False}])
    assert row.block_weights == "1,0,1" and not row.on


@pytest.mark.parametrize("text, message", [
    ('[{"lora": "a.safetensors"},', r"loras: not valid JSON .* line 1 column"),
    ('{"lora": "a.safetensors"}', "expected a JSON list of rows, got dict"),
    ('[{"lora": "a.safetensors"}, "b.safetensors"]', "row 2, field 'lora': a row is an object"),
    ('[{"lora": "a.safetensors"}, {"strength_model": 1}]', "row 2, field 'lora': expected a file name"),
    ('[{"lora": "a.safetensors", "on": "yes"}]', "row 1, field 'on': expected true or false, got 'yes'"),
    ('[{"lora": "a.safetensors"}, {"lora": "b", "strength_model": "strong"}]',
     "row 2, field 'strength_model': expected a finite number, got 'strong'"),
    ('[{"lora": "a", "strength_clip": null}]', "row 1, field 'strength_clip'"),
    ('[{"lora": "a", "block_weights": 3}]', "row 1, field 'block_weights'"),
])
def test_bad_rows_name_the_row_and_the_field(lf, text, message):
    with pytest.raises(ValueError, match=message):
        lf.stack.parse_rows(text)


def test_a_missing_file_names_its_row(lf, loaded_checkpoint, loras):
    model, clip, _ = loaded_checkpoint
    with pytest.raises(ValueError, match=r"stack row 2, field 'lora': 'nope.safetensors' is not in the loras folders"):
        lf.nodes.ApplyLoraStack.execute(model, '[{"lora": "stack/lokr.safetensors"}, {"lora": "nope.safetensors"}]',
                                        clip=clip)
    # An upstream row with a bad field is named as such.
    with pytest.raises(ValueError, match=r"lora_stack row 1, field 'on'"):
        lf.nodes.LoraStack.execute("[]", lora_stack=[{"lora": "x", "on": 1}])


# --- through the server -------------------------------------------------------------------

def _ui_workflow(checkpoint: str, stack_rows: str, apply_rows: str) -> dict:
    """A UI-format workflow (what the frontend saves): checkpoint -> LoRA Stack -> Apply LoRA Stack -> sample,
    plus the report into PreviewAny."""
    nodes = [
        (1, "CheckpointLoaderSimple", [checkpoint], []),
        (2, "LoraFoundryLoraStack", [stack_rows], []),
        (3, "LoraFoundryApplyLoraStack", [apply_rows], [("model", 1, 0), ("clip", 1, 1), ("lora_stack", 2, 0)]),
        (4, "CLIPTextEncode", ["a red circle"], [("clip", 3, 1)]),
        (5, "EmptyLatentImage", [64, 64, 1], []),
        (6, "KSampler", [7, "fixed", 2, 1.0, "euler", "normal", 1.0],
         [("model", 3, 0), ("positive", 4, 0), ("negative", 4, 0), ("latent_image", 5, 0)]),
        (7, "VAEDecode", [], [("samples", 6, 0), ("vae", 1, 2)]),
        (8, "SaveImage", ["stack/ui"], [("images", 7, 0)]),
        (9, "PreviewAny", [], [("source", 3, 3)]),
    ]
    links, out = [], []
    for node_id, kind, widgets, inputs in nodes:
        slots = []
        for name, origin, slot in inputs:
            links.append([len(links) + 1, origin, slot, node_id, len(slots), "*"])
            slots.append({"name": name, "type": "*", "link": len(links)})
        out.append({"id": node_id, "type": kind, "mode": 0, "inputs": slots, "outputs": [], "widgets_values": widgets})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": out, "links": links, "version": 0.4}


def _chain_prompt(checkpoint: str, rows) -> dict:
    """The same sampling after ComfyUI's LoraLoader chain (API format)."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    model, clip = ["1", 0], ["1", 1]
    for i, (name, strength_model, strength_clip) in enumerate(rows):
        node = str(10 + i)
        prompt[node] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": name,
                                                               "strength_model": strength_model,
                                                               "strength_clip": strength_clip}}
        model, clip = [node, 0], [node, 1]
    prompt.update({
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": model,
                                                   "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "stack/chain", "images": ["7", 0]}},
    })
    return prompt


@pytest.mark.server
def test_ui_workflow_with_the_stack_nodes_samples_like_the_loader_chain(lf, server, tiny_checkpoint, loaded_checkpoint):
    import numpy as np
    from PIL import Image

    model, clip, _ = loaded_checkpoint
    write_fixture_loras(lf, model, clip, server.base_dir / "models" / "loras")
    info = server.object_info()
    assert info["LoraFoundryApplyLoraStack"]["output"] == ["MODEL", "CLIP", "LORA_STACK", "STRING"]
    assert info["LoraFoundryLoraStack"]["display_name"] == "LoRA Stack"
    presets = server.get("/lora_foundry/block_presets")
    assert presets["ALL"] == ",".join(["1"] * 17) and len(server.get("/lora_foundry/block_presets?family=sdxl")["ALL"].split(",")) == 12

    outputs = server.run(_ui_workflow(tiny_checkpoint.name, rows_json(ROWS[:2]), rows_json(ROWS[2:])), timeout=300)
    report = "".join(outputs["9"]["text"])
    assert "1. stack/locon.safetensors (model 0.8, clip 0.6)" in report and "3. stack/lokr.safetensors" in report
    assert "no matching layer" not in report
    chained = server.run(_chain_prompt(tiny_checkpoint.name, ROWS), timeout=300)
    base = server.run(_chain_prompt(tiny_checkpoint.name, []), timeout=300)
    (ours,) = server.output_files({"8": outputs["8"]})
    (theirs,) = server.output_files(chained)
    (plain,) = server.output_files(base)
    ours, theirs, plain = (np.asarray(Image.open(p), dtype=np.int16) for p in (ours, theirs, plain))
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - plain).max() > 8  # the LoRAs change the image
