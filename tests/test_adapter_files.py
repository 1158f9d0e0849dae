"""LoRA files from strangers: damaged and hostile safetensors, pickles under any name, NaN / non-float factors,
metadata that is not what it claims, LoRAs for another model, names that try to leave the loras folder, and
writes that hit a full disk. Every case ends in an error that names the file and says what to do, a report
that lists what was refused, or a note: never a crash, a 500, an unpickled payload or a silent no-op.
"""

from __future__ import annotations

import errno
import importlib
import json
import pickle
import re
import shutil
import struct
import urllib.error
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from harness.comfy import REPO_ROOT

SDXL_MODULE = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def lf(pack) -> SimpleNamespace:
    def load(name):
        return importlib.import_module(f"{pack.__name__}.{name}")

    network = load("lora_core.network")
    return SimpleNamespace(files=load("lora_core.files"), info=load("lora_core.info"), apply=load("lora_core.apply"),
                           merge=load("lora_core.merge"), network=network, Network=network.LoraNetwork,
                           Config=network.NetworkConfig, ApplyLoRA=load("nodes.apply").ApplyLoRA)


@pytest.fixture(scope="module")
def sd15_lora(lf, loaded_checkpoint) -> dict[str, torch.Tensor]:
    """A small LoRA (attention layers, UNet and CLIP) with random factors, in kohya names, for the fixture SD1.5."""
    model, clip, _ = loaded_checkpoint
    network = lf.Network.create(lf.Config(rank=2, alpha=2, preset="attention", text_encoder=True), model, clip)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return network.state_dict_kohya()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def tiny_lora(metadata: dict[str, str] | None = None) -> bytes:
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return safetensors_bytes({f"{module}.lora_down.weight": torch.ones(2, 4),
                              f"{module}.lora_up.weight": torch.ones(4, 2)}, metadata)


def split_file(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def edited(**entry) -> bytes:
    """tiny_lora with its second tensor's header entry changed."""
    header, body = split_file(tiny_lora())
    key = sorted(k for k in header if k != "__metadata__")[1]
    header[key] = {**header[key], **entry}
    return with_header(header, body)


# --- 1. damaged and hostile safetensors files ---------------------------------------------------------

# name: (file bytes, what the message says)
HOSTILE = {
    "empty": (b"", "0 bytes, too short"),
    "four_bytes": (b"\x01\x02\x03\x04", "too short"),
    "header_longer_than_file": (struct.pack("<Q", 1_000_000) + b"{}", "claims 1,000,000 bytes, but the file has"),
    "header_over_the_limit": (struct.pack("<Q", 2**62) + b"{}", "more than the 100,000,000 safetensors allows"),
    "header_not_json": (struct.pack("<Q", 5) + b"hello", "invalid JSON"),
    "header_a_list": (struct.pack("<Q", 2) + b"[]", "not a readable safetensors file"),
    "offsets_past_the_end": (edited(data_offsets=[32, 4096]), "cut short"),
    "overlapping_offsets": (edited(data_offsets=[0, 32]), "not a readable safetensors file"),
    "shape_lies_about_size": (edited(shape=[40, 2]), "not a readable safetensors file"),
    "unknown_dtype": (edited(dtype="Q9"), "not a readable safetensors file"),
    "metadata_not_text": (with_header({**split_file(tiny_lora())[0], "__metadata__": {"x": 5}},
                                      split_file(tiny_lora())[1]), "not a readable safetensors file"),
    "truncated_data": (tiny_lora()[:-10], "cut short"),
}


def header_reader(lf, path):
    return lf.info.read_header(path)


def tensor_reader(lf, path):
    return lf.files.read_safetensors(path)


def network_reader(lf, path):
    return lf.network.read_network(path)


READERS = {"read_safetensors": tensor_reader, "read_header": header_reader, "read_network": network_reader}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_safetensors_raise_an_error_naming_the_file(lf, tmp_path, case, reader):
    data, says = HOSTILE[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(lf.files.AdapterFileError) as err:
        READERS[reader](lf, path)
    message = str(err.value)
    assert path.name in message and says in message, message
    assert "re-download" in message, "the message says what to do"


def test_apply_lora_node_refuses_a_hostile_file_naming_it(lf, loaded_checkpoint, loras_dir):
    model, clip, _ = loaded_checkpoint
    for case in ("empty", "header_not_json", "truncated_data"):
        (loras_dir / f"hostile_{case}.safetensors").write_bytes(HOSTILE[case][0])
        with pytest.raises(lf.files.AdapterFileError, match=f"hostile_{case}.safetensors: .*re-download"):
            lf.ApplyLoRA.execute(model, f"hostile_{case}.safetensors", 1.0, 1.0, clip=clip)


def test_a_50_mb_header_is_read_and_shown_cut_short(lf, tmp_path):
    """Headers up to safetensors' own 100 MB limit are read (larger ones are refused above); what lora_info hands
    the browser stays small however big the metadata is."""
    path = tmp_path / "huge_metadata.safetensors"
    many = {f"key_{i:05d}": "v" for i in range(2000)}
    path.write_bytes(tiny_lora({"ss_tag_frequency": "x" * (50 * 2**20), **many}))
    info = lf.info.lora_info(path)
    shown = json.dumps(info, allow_nan=False)
    assert len(shown) < 200_000, len(shown)
    assert info["metadata"]["ss_tag_frequency"].endswith("...")
    assert any("not valid JSON" in note for note in info["notes"])
    assert any("keys not shown" in note for note in info["notes"])


# --- 2. pickles are never unpickled ---------------------------------------------------------------------

class TouchOnLoad:
    """A pickle payload: unpickling it creates `marker` (as a malicious .ckpt could run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def pickle_payload(marker: Path, kind: str) -> bytes:
    if kind == "zip":  # torch.save's format since 1.6: a zip around the pickle
        import io

        buffer = io.BytesIO()
        torch.save({"lora_unet_x.lora_down.weight": TouchOnLoad(marker)}, buffer)
        return buffer.getvalue()
    return pickle.dumps({"lora_unet_x.lora_down.weight": TouchOnLoad(marker)})


@pytest.mark.parametrize("kind", ["pickle", "zip"])
def test_the_payload_is_live(tmp_path, kind):
    """The files below would run code if anything unpickled them."""
    marker = tmp_path / "proof"
    data = pickle_payload(marker, kind)
    if kind == "zip":
        import io

        torch.load(io.BytesIO(data), weights_only=False)
    else:
        pickle.loads(data)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "zip"])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".safetensors"])
def test_pickle_files_are_never_unpickled(lf, tmp_path, suffix, kind):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle_payload(marker, kind))
    for reader in READERS.values():
        with pytest.raises(lf.files.AdapterFileError) as err:
            reader(lf, path)
        assert path.name in str(err.value)
        assert ("only .safetensors files are read" if suffix != ".safetensors" else "pickle") in str(err.value)
    assert not marker.exists()


def test_apply_lora_node_never_unpickles(lf, loaded_checkpoint, loras_dir, tmp_path):
    model, clip, _ = loaded_checkpoint
    marker = tmp_path / "unpickled"
    for name in ("evil_node.ckpt", "evil_node.pt", "evil_node.safetensors"):
        (loras_dir / name).write_bytes(pickle_payload(marker, "pickle"))
        with pytest.raises(lf.files.AdapterFileError, match=re.escape(name)):
            lf.ApplyLoRA.execute(model, name, 1.0, 1.0, clip=clip)
    assert not marker.exists()


# --- 3. NaN / infinite / non-float factors -------------------------------------------------------------

BAD_VALUES = {
    "nan": (lambda t: t.clone().fill_(float("nan")), "has NaN values"),
    "inf": (lambda t: t.clone().fill_(float("-inf")), "has infinite values"),
    "int": (lambda t: t.to(torch.int32), "is int32, not a float"),
    "bool": (lambda t: t.to(torch.bool), "is bool, not a float"),
}


def spoiled(tensors: dict, kind: str, suffix: str = "lora_up.weight") -> tuple[dict, str]:
    """`tensors` with one module's `suffix` spoiled as BAD_VALUES[kind] says; (tensors, that module's name)."""
    key = sorted(k for k in tensors if k.startswith("lora_unet") and k.endswith(suffix))[0]
    return {**tensors, key: BAD_VALUES[kind][0](tensors[key])}, key.removesuffix("." + suffix)


@pytest.mark.parametrize("kind", BAD_VALUES)
def test_apply_refuses_and_lists_modules_with_bad_values(lf, loaded_checkpoint, sd15_lora, kind):
    model, clip, _ = loaded_checkpoint
    tensors, module = spoiled(sd15_lora, kind)
    _, _, report = lf.apply.apply_lora(model, clip, tensors)
    assert report.refused == [f"{module}: lora_up.weight {BAD_VALUES[kind][1]}"]
    assert module not in report.applied and len(report.applied) == len({k.rsplit(".", 2)[0] for k in tensors}) - 1
    assert not report.ok
    summary = report.summary()
    assert "1 refused, not applied" in summary and module in summary and "re-download" in summary, summary


@pytest.mark.parametrize("kind", BAD_VALUES)
def test_reading_a_lora_with_bad_values_names_the_key(lf, loaded_checkpoint, sd15_lora, kind):
    model, clip, _ = loaded_checkpoint
    tensors, module = spoiled(sd15_lora, kind)
    for bound in ({}, {"model": model, "clip": clip}):
        with pytest.raises(ValueError) as err:
            lf.Network.from_state_dict(tensors, **bound)
        assert f"{module}: lora_up.weight {BAD_VALUES[kind][1]}" in str(err.value)


def test_alpha_may_be_an_integer_but_not_nan(lf, loaded_checkpoint, sd15_lora):
    model, clip, _ = loaded_checkpoint
    alpha_key = sorted(k for k in sd15_lora if k.startswith("lora_unet") and k.endswith(".alpha"))[0]
    module = alpha_key.removesuffix(".alpha")
    integer = {**sd15_lora, alpha_key: torch.tensor(2, dtype=torch.int64)}
    _, _, report = lf.apply.apply_lora(model, clip, integer)
    assert report.ok and module in report.applied
    lf.Network.from_state_dict(integer, model=model, clip=clip)
    nan = {**sd15_lora, alpha_key: torch.tensor(float("nan"))}
    _, _, report = lf.apply.apply_lora(model, clip, nan)
    assert report.refused == [f"{module}: alpha has NaN values"]


def test_apply_lora_node_summary_names_the_refused_module(lf, loaded_checkpoint, sd15_lora, loras_dir):
    model, clip, _ = loaded_checkpoint
    tensors, module = spoiled(sd15_lora, "nan")
    lf.files.write_safetensors(tensors, loras_dir / "nan_values.safetensors")
    _, _, summary = lf.ApplyLoRA.execute(model, "nan_values.safetensors", 1.0, 1.0, clip=clip).args
    assert summary.startswith("nan_values.safetensors: ") and f"{module}: lora_up.weight has NaN values" in summary


# --- 4. metadata that is not what it should be -----------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
# name: (metadata, a word the note has)
BAD_METADATA = {
    "tags_not_json": ({"ss_tag_frequency": "{'img': {'cat': 3}}"}, "ss_tag_frequency: not valid JSON"),
    "tags_infinity": ({"ss_tag_frequency": '{"10_cat": {"cat": Infinity, "dog": 2}}'}, "not counts"),
    "tags_nan": ({"ss_tag_frequency": '{"img": {"cat": NaN, "dog": 2}}'}, "not counts"),
    "tags_overflowing_float": ({"ss_tag_frequency": '{"img": {"cat": 1e999, "dog": 2}}'}, "not counts"),
    "tags_huge_int": ({"ss_tag_frequency": '{"img": {"cat": ' + "9" * 30 + ', "dog": 2}}'}, "not counts"),
    "tags_too_many_digits": ({"ss_tag_frequency": '{"img": {"cat": ' + "9" * 5000 + "}}"}, "not valid JSON"),
    "tags_negative": ({"ss_tag_frequency": '{"img": {"cat": -4, "dog": 2}}'}, "not counts"),
    "tags_not_numbers": ({"ss_tag_frequency": '{"img": {"cat": "many", "bird": [1], "fish": true, "dog": 2}}'},
                         "3 entries that are not counts"),
    "tags_folder_not_object": ({"ss_tag_frequency": '{"img": [1, 2], "more": {"dog": 2}}'}, "not counts"),
    "tags_a_list": ({"ss_tag_frequency": "[1, 2, 3]"}, "not a {folder: {tag: count}} object"),
    "tags_nested_too_deep": ({"ss_tag_frequency": DEEP}, "ss_tag_frequency: not valid JSON"),
    "network_args_not_json": ({"ss_network_args": "{conv_dim: 4"}, "ss_network_args: not valid JSON"),
    "training_not_json": ({"lora_foundry_training": "{"}, "lora_foundry_training: not valid JSON"),
}


@pytest.mark.parametrize("case", BAD_METADATA)
def test_lora_info_shows_bad_metadata_as_text_with_a_note(lf, tmp_path, case):
    metadata, note = BAD_METADATA[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(tiny_lora({**metadata, "ss_network_dim": "²"}))
    info = lf.info.lora_info(path)
    json.dumps(info, allow_nan=False)  # what the route sends is strict JSON
    assert any(note in n for n in info["notes"]), info["notes"]
    key = next(iter(metadata))
    assert info["metadata"][key] == metadata[key][:lf.info.MAX_VALUE_CHARS] + (
        "..." if len(metadata[key]) > lf.info.MAX_VALUE_CHARS else ""), "the raw text is still shown"
    assert info["rank"] == 2, "an unreadable ss_network_dim falls back to the file's shapes"
    if "dog" in metadata[key] and case != "tags_not_json":
        assert ["dog", 2] in [list(t) for t in info["tag_frequency"]], "the good entries are kept"


# name: (lora_foundry_config text, what the message says)
BAD_CONFIGS = {
    "not_json": ("{rank: 4", "not valid JSON"),
    "a_list": ("[4]", "a JSON object of settings was expected, not a list"),
    "rank_as_text": ('{"rank": "8"}', "settings of the wrong type: rank='8'"),
    "alpha_nan": ('{"alpha": NaN}', "alpha=nan"),
    "rank_a_bool": ('{"rank": true}', "rank=True"),
    "include_not_strings": ('{"include": [1]}', "include=[1]"),
    "unknown_algorithm": ('{"algorithm": "magic"}', "'magic' is not one of"),
    "rank_zero": ('{"rank": 0}', "rank: must be at least 1"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_network_settings_name_the_metadata_key_and_the_file(lf, tmp_path, case):
    text, says = BAD_CONFIGS[case]
    with pytest.raises(ValueError) as err:
        lf.Config.from_json(text)
    assert str(err.value).startswith("lora_foundry_config metadata: ") and says in str(err.value), str(err.value)
    assert "re-save the LoRA" in str(err.value)
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(tiny_lora({"lora_foundry_config": text}))
    with pytest.raises(lf.files.AdapterFileError) as err:
        lf.network.read_network(path)
    assert str(err.value).startswith(f"{path}: ") and "lora_foundry_config metadata" in str(err.value)


def test_older_network_settings_still_read(lf):
    config = lf.Config.from_json('{"rank": 4, "alpha": 2, "conv_rank": null, "block_ranks": {}, "unknown_key": 1}')
    assert config.rank == 4 and config.alpha == 2.0 and config.block_ranks == ""


# --- 5. a LoRA for another model family ------------------------------------------------------------------

def sdxl_lora() -> dict[str, torch.Tensor]:
    return {f"{SDXL_MODULE}.lora_down.weight": torch.randn(4, 2048), f"{SDXL_MODULE}.lora_up.weight": torch.randn(640, 4),
            f"{SDXL_MODULE}.alpha": torch.tensor(4.0)}


def test_a_lora_for_another_model_says_so(lf, loaded_checkpoint, loras_dir):
    model, clip, _ = loaded_checkpoint
    _, _, report = lf.apply.apply_lora(model, clip, sdxl_lora(), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    summary = report.summary()
    assert not report.ok and report.unmatched == [SDXL_MODULE]
    assert "none of the file's 1 modules fits this model (SD15)" in summary, summary
    assert "another base model (its metadata says sdxl_base_v1-0)" in summary, summary

    lf.files.write_safetensors(sdxl_lora(), loras_dir / "sdxl_style.safetensors", {"ss_base_model_version": "sdxl"})
    _, _, summary = lf.ApplyLoRA.execute(model, "sdxl_style.safetensors", 1.0, 1.0, clip=clip).args
    assert "none of the file's 1 modules fits this model" in summary and "another base model" in summary, summary


def test_a_rank_above_the_layers_size_is_applied_and_reported(lf, loaded_checkpoint, sd15_lora):
    """A module of rank 400 on a 320-wide layer: the change is what it is (applied), but the report says the file
    is larger than any change of that layer needs."""
    model, clip, _ = loaded_checkpoint
    name = next(k[: -len(".lora_down.weight")] for k in sd15_lora if k.endswith("attn1_to_q.lora_down.weight"))
    down, up = sd15_lora[f"{name}.lora_down.weight"], sd15_lora[f"{name}.lora_up.weight"]
    big = {f"{name}.lora_down.weight": torch.randn(400, down.shape[1]) * 0.01,
           f"{name}.lora_up.weight": torch.randn(up.shape[0], 400) * 0.01, f"{name}.alpha": torch.tensor(400.0)}
    _, _, report = lf.apply.apply_lora(model, clip, big)
    assert report.applied == [name] and report.oversized == [f"{name}: rank 400 > {min(up.shape[0], down.shape[1])}"]
    assert "1 modules with a rank above what their layer can hold" in report.summary()
    _, _, report = lf.apply.apply_lora(model, clip, sd15_lora)
    assert report.oversized == []


def test_a_file_without_adapter_modules_is_no_silent_no_op(lf, loaded_checkpoint, sd15_lora):
    model, clip, _ = loaded_checkpoint
    _, _, report = lf.apply.apply_lora(model, clip, {"some_tensor": torch.zeros(2)})
    assert not report.ok and "holds no LoRA / LoHa / LoKr modules" in report.summary()
    text_encoder_only = {k: v for k, v in sd15_lora.items() if k.startswith("lora_te")}
    _, _, report = lf.apply.apply_lora(model, None, text_encoder_only)
    assert not report.ok and "connect a CLIP" in report.summary() and "another base model" not in report.summary()


# --- 4 and 6. the lora info route on a real server --------------------------------------------------------

def http_get(server, name: str) -> tuple[int, dict]:
    try:
        return 200, server.get("/lora_foundry/lora_info?name=" + urllib.parse.quote(name, safe=""))
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": body}


@pytest.fixture
def hostile_loras(server):
    """A folder of crafted files inside the server's models/loras, removed afterwards; and one outside it."""
    loras = server.base_dir / "models" / "loras"
    folder, outside = loras / "hostile", server.base_dir / "outside"
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(exist_ok=True)
    yield folder, outside
    shutil.rmtree(folder)
    shutil.rmtree(outside)


def test_lora_info_route_answers_with_notes_or_400_never_500(server, hostile_loras, tmp_path):
    folder, _ = hostile_loras
    (folder / "odd_tags.safetensors").write_bytes(
        tiny_lora({"ss_tag_frequency": '{"10_cat": {"cat": Infinity, "dog": 3}}', "ss_network_args": "{"}))
    (folder / "broken.safetensors").write_bytes(HOSTILE["header_not_json"][0])
    marker = tmp_path / "unpickled"
    (folder / "pickled.safetensors").write_bytes(pickle_payload(marker, "pickle"))

    status, info = http_get(server, "hostile/odd_tags.safetensors")
    assert status == 200, info
    assert info["tag_frequency"] == [["dog", 3]] and info["trigger_words"] == ["cat"]
    assert any("not counts" in n for n in info["notes"]) and any("ss_network_args" in n for n in info["notes"])
    for name, says in (("hostile/broken.safetensors", "re-download"), ("hostile/pickled.safetensors", "never read")):
        status, answer = http_get(server, name)
        assert status == 400 and answer["error"].startswith(name.split("/")[1]) and says in answer["error"], answer
    assert not marker.exists()


def test_lora_info_route_refuses_names_that_leave_the_loras_folder(server, hostile_loras):
    folder, outside = hostile_loras
    secret = outside / "secret.safetensors"
    secret.write_bytes(tiny_lora({"secret": "TOP-SECRET-VALUE"}))
    (folder / "link.safetensors").symlink_to(secret)
    (folder / "plain.safetensors").write_bytes(tiny_lora())
    assert http_get(server, "hostile/plain.safetensors")[0] == 200
    bad = {
        "hostile/plain\x00.safetensors": "NUL byte",
        "hostile/\x00plain.safetensors": "NUL byte",
        "../outside/secret.safetensors": "'..' are not allowed",
        "hostile/../../outside/secret.safetensors": "'..' are not allowed",
        str(secret): "absolute paths",
        "hostile\\plain.safetensors": "backslashes",
        "hostile/link.safetensors": "points outside",
        "hostile/plain.ckpt": "only .safetensors files",
    }
    for name, says in bad.items():
        status, answer = http_get(server, name)
        assert status == 400, (name, status, answer)
        assert says in answer["error"], (name, answer)
        assert "TOP-SECRET" not in json.dumps(answer)


# --- 7 and 8. writes: temporary names and a full disk ------------------------------------------------------

def test_a_checkpoint_is_written_under_a_tmp_name_comfy_never_lists(lf, tmp_path, monkeypatch):
    import comfy.sd
    import folder_paths

    written = []

    def save(path, *args, **kwargs):
        written.append(path)
        Path(path).write_bytes(b"new")

    monkeypatch.setattr(comfy.sd, "save_checkpoint", save)
    target = tmp_path / "merged.safetensors"
    lf.merge.save_checkpoint(target, model=None)
    assert written[0].endswith(".tmp") and Path(written[0]).parent == tmp_path
    assert not folder_paths.filter_files_extensions([Path(written[0]).name], folder_paths.supported_pt_extensions)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]

    def crash(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(comfy.sd, "save_checkpoint", crash)
    with pytest.raises(RuntimeError):
        lf.merge.save_checkpoint(target, model=None)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]


class FailingFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk(lf, monkeypatch, where: str) -> None:
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "fsync":
        monkeypatch.setattr(lf.files.os, "fsync", no_space)
    else:
        monkeypatch.setattr(lf.files, "open", FailingFile, raising=False)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(lf, tmp_path, monkeypatch, where):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"old")
    full_disk(lf, monkeypatch, where)
    with pytest.raises(OSError) as err:
        lf.files.write_bytes_atomic(b"new content", path)
    assert str(err.value) == (f"{path}: could not be written (No space left on device); the previous file is "
                              "unchanged; free some space and run again")
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]

    with pytest.raises(OSError, match="no file was written; free some space"):
        lf.files.write_safetensors({"x": torch.zeros(2)}, tmp_path / "new.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# --- 9. metadata is shown as text ---------------------------------------------------------------------------

def test_web_code_never_parses_strings_as_html():
    files = sorted((REPO_ROOT / "web" / "js").rglob("*.js"))
    assert files
    html = re.compile(r"\b(innerHTML|outerHTML|insertAdjacentHTML|document\.write(ln)?)\b")
    found = [f"{f.relative_to(REPO_ROOT)}:{n}: {line.strip()}" for f in files
             for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1) if html.search(line)]
    assert not found, "\n".join(found)
