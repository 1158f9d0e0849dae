"""A careless or hostile user of a shared server, walked from what the pack declares, so a new input or route is
covered the day it is added: every number input of every node past either end of its range and not finite, straight
to /prompt and into `execute`; every route the pack registers with hostile queries and bodies (never a 500); and the
other defects found that way (issue 29), one test each."""

from __future__ import annotations

import json
import math
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from harness.workflow import train_prompt

# Values past what a number input declares: (label, value for an input with these min / max).
HOSTILE_NUMBERS = {
    "max + 1": lambda i: i.max + 1,
    "min - 1": lambda i: i.min - 1,
    "NaN": lambda i: math.nan,
    "inf": lambda i: math.inf,
    "-inf": lambda i: -math.inf,
    "10^400": lambda i: 10**400,  # a JSON integer no float holds
}


@pytest.fixture(scope="module")
def our_nodes(pack) -> list:
    from lora_foundry.nodes import NODES

    return NODES


def number_inputs(node) -> list:
    from comfy_api.latest import io

    return [i for i in node.GET_SCHEMA().inputs if isinstance(i, (io.Int.Input, io.Float.Input))]


def refusal_names(message: str, i, value) -> bool:
    """Whether `message` names the input, its declared range and the value."""
    return f"{i.id}: {value}" in message and f"from {i.min} to {i.max}" in message


def send(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | bytes]:
    """One raw request: (HTTP status, the JSON answer or the raw bytes)."""
    request = urllib.request.Request(server.url + path, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


# --- every number, at both ends and finite ------------------------------------------------------------------------


def test_every_number_input_declares_both_ends(our_nodes):
    """A number input without a min or a max could not be held to it: each one declares both."""
    found = [(node.GET_SCHEMA().node_id, i.id, i.min, i.max) for node in our_nodes for i in number_inputs(node)]
    assert len(found) > 40, found
    assert [f for f in found if f[2] is None or f[3] is None] == []


def test_every_number_past_its_range_or_not_finite_is_refused_before_the_node_runs(our_nodes):
    """Every node's every number input: max + 1, min - 1, NaN, inf and -inf are refused by the node's validation
    (what the host calls when a prompt arrives) and by its execute before it does anything (a value that came
    through a link), naming the input, its range and the value; the declared default passes."""
    checked = 0
    for node in our_nodes:
        for i in number_inputs(node):
            assert node.validate_inputs(**{i.id: i.default}) is True, (node, i.id)
            for label, pick in HOSTILE_NUMBERS.items():
                value = pick(i)
                message = node.validate_inputs(**{i.id: value})
                assert isinstance(message, str) and refusal_names(message, i, value), (node, i.id, label, message)
                with pytest.raises(ValueError) as refused:  # the other inputs are missing: nothing else could run
                    node.execute(**{i.id: value})
                assert refusal_names(str(refused.value), i, value), (node, i.id, label, refused.value)
                checked += 1
    assert checked > 200


@pytest.mark.server
def test_each_node_refuses_hostile_numbers_sent_to_prompt(server, our_nodes):
    """A real /prompt round trip per node class and hostile kind, every number input at once (NaN and Infinity as
    Python's json writes them, which the host's JSON reader takes): 400, and the node's errors name each input."""
    info = server.object_info()
    for node in our_nodes:
        node_id = node.GET_SCHEMA().node_id
        numbers = number_inputs(node)
        if not numbers:
            continue
        for label, pick in HOSTILE_NUMBERS.items():
            widgets = {i.id: i.default for i in node.GET_SCHEMA().inputs if getattr(i, "default", None) is not None}
            prompt = {"1": {"class_type": node_id, "inputs": {**widgets, **{i.id: pick(i) for i in numbers}}}}
            if not info[node_id]["output_node"]:
                prompt["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
            status, answer = send(server, "POST", "/prompt", json.dumps({"prompt": prompt}).encode())
            assert status == 400, (node_id, label, answer)
            details = "\n".join(e["details"] for e in answer["node_errors"]["1"]["errors"])
            missed = [i.id for i in numbers if not refusal_names(details, i, pick(i))]
            assert missed == [], (node_id, label, details)


def small_dataset(folder: Path, count: int = 2, caption: str | None = None) -> Path:
    """`count` 64 px images, captioned `caption` (one text to encode: CLIP-L takes seconds per caption on the CPU)
    or each its own."""
    from PIL import Image

    folder.mkdir(parents=True)
    for n in range(count):
        Image.new("RGB", (64, 64), (40 * n, 120, 200)).save(folder / f"img_{n}.png")
        (folder / f"img_{n}.txt").write_text(caption or f"sks circle, colour {n}")
    return folder


@pytest.mark.server
@pytest.mark.parametrize(("name", "value"), [("batch_size", 0), ("steps", 10**12), ("batch_size", 10**9),
                                             ("learning_rate", math.inf), ("learning_rate", math.nan),
                                             ("alpha", math.nan)])
def test_train_lora_refuses_the_numbers_that_broke_the_server(server, tiny_checkpoint, tmp_path, name, value):
    """The values found to train for 12 minutes, kill the server for memory, fail deep in torch or save NaN
    alphas: refused when the prompt arrives, in an otherwise valid graph, so nothing is queued or loaded."""
    info = server.object_info()
    images = small_dataset(tmp_path / "images", caption="sks")
    prompt = train_prompt(info, tiny_checkpoint.name, images, "refused", **{name: value})
    status, answer = send(server, "POST", "/prompt", json.dumps({"prompt": prompt}).encode())
    assert status == 400, answer
    assert list(answer["node_errors"]) == ["3"], answer
    details = "\n".join(e["details"] for e in answer["node_errors"]["3"]["errors"])
    assert f"{name}: {value}" in details and "give a value from" in details, details


def test_settings_from_a_config_are_held_to_the_same_ranges(pack):
    """Load Training Config's values replace the widgets' inside the node, and a headless run has no widgets: the
    settings themselves refuse a number past its declared range, or not finite."""
    from lora_foundry.training.run import settings

    for inputs, message in [({"steps": 10**12}, "steps: 1000000000000 is outside its range; give a value from 1 to "
                                                "1000000"),
                            ({"alpha": math.nan}, "alpha: nan is not a finite number"),
                            ({"learning_rate": math.inf}, "learning_rate: inf is not a finite number"),
                            ({"caption_dropout": 2.0}, "caption_dropout: 2.0 is outside its range")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            settings(inputs)
    network, train = settings({"steps": 7, "alpha": 2.0})
    assert (train.steps, network.alpha) == (7, 2.0)


def test_headless_config_error_is_one_line_saying_what_to_do(pack, tmp_path, capsys):
    """The headless command prints a config it cannot use as one line saying what to do (exit status 2), not a
    traceback: a value past its range, settings that need another, a config file that is not there."""
    from lora_foundry.training.headless import main

    def run(training: str) -> list[str]:
        config = tmp_path / "run.toml"
        config.write_text('[run]\noutput_name = "x"\n[model]\ncheckpoint = "none.safetensors"\n'
                          f'[dataset]\nfolder = "x"\n[training]\n{training}\n')
        assert main([str(config)]) == 2
        return capsys.readouterr().err.strip().splitlines()

    assert run("steps = 1000000000000") == [f"train_lora: {tmp_path / 'run.toml'}: [training] steps = 1000000000000 "
                                            "is outside 1 to 1e+06"]
    assert run("patience = 3") == ["train_lora: patience: early stopping watches the held-out loss; set "
                                   "validation_every too"]
    missing = tmp_path / "missing.toml"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "No such file" in err[0], err


# --- every route, any body ------------------------------------------------------------------------------------------


def pack_routes(pack) -> list[tuple[str, str]]:
    """(method, path) of every route the pack registers, read from its own registration."""
    from aiohttp import web
    from lora_foundry.nodes.routes import register

    table = web.RouteTableDef()
    register(table)
    return [(route.method, route.path) for route in table]


QUERY_KEYS = ("name", "node", "family", "token", "image", "caption", "path", "folder")
HOSTILE_QUERY_VALUES = ["", ".", "..", "../../etc/passwd", "/etc/passwd", "a%00b.safetensors", "%ED%A0%80",
                        "%ED%A0%80.safetensors", "a" * 300 + ".safetensors", ".hidden.safetensors", "x" * 500,
                        "%FF%FE", "[]", "{}", "NaN"]
HOSTILE_BODIES = [
    b"", b"null", b"NaN", b"1e999999", b"[]", b"\xff\xfe\x00garbage", b'"\\ud800"',
    b"[" * 100_000 + b"]" * 100_000,  # nested past Python's recursion limit
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"token": "\\ud800", "image": "\\udfff", "caption": "\\ud800"}',
    b'{"token": 1, "image": [], "caption": {}}',
    b'{"token": null, "image": null, "caption": null}',
    b'{"token": "' + b"t" * 1_000_000 + b'", "image": "a.png", "caption": "c"}',
]


@pytest.mark.server
def test_every_route_answers_hostile_queries_and_bodies_without_a_500(server, pack):
    routes = pack_routes(pack)
    assert len(routes) >= 5 and ("POST", "/lora_foundry/caption") in routes, routes
    answers = []
    for method, path in routes:
        for value in HOSTILE_QUERY_VALUES:
            query = "&".join(f"{key}={value}" for key in QUERY_KEYS)
            status, _ = send(server, method, f"{path}?{query}", b"{}" if method == "POST" else None)
            answers.append((method, path, value[:20], status))
        for body in HOSTILE_BODIES:
            status, _ = send(server, method, path, body)
            answers.append((method, path, body[:20], status))
    assert [a for a in answers if a[3] >= 500] == []
    assert server.object_info()  # still serving


@pytest.mark.server
def test_a_caption_with_a_lone_surrogate_is_refused_not_a_500(server, tmp_path):
    """JSON can carry half a UTF-16 pair ("\\ud800"), which no text file can hold: the caption route answers 400
    naming the caption, and the caption file is unchanged."""
    folder = small_dataset(tmp_path / "data", count=2)
    workflow = {"2": {"class_type": "LoraFoundryCaptionImages", "inputs": {
        "folder": str(folder), "model": "none", "mode": "keep existing", "write_files": "none",
        "general_threshold": 0.35, "character_threshold": 0.85, "trigger_word": "", "class_word": "", "prefix": "",
        "suffix": "", "find_replace": "", "blacklist": "", "deduplicate": True, "max_tags": 0,
        "caption_extension": ".txt", "preview_count": 2}}}
    rows = server.run(workflow, timeout=120)["2"]["captions"]
    before = (folder / "img_0.txt").read_bytes()
    body = json.dumps({"token": rows[0]["token"], "image": rows[0]["image"], "caption": "a \ud800 b"}).encode()
    status, answer = send(server, "POST", "/lora_foundry/caption", body)
    assert status == 400 and answer["field"] == "caption" and "UTF-16" in answer["error"], (status, answer)
    assert (folder / "img_0.txt").read_bytes() == before


# --- bounded work ---------------------------------------------------------------------------------------------------


def test_caption_files_too_large_too_long_or_folders_are_reported_by_name(pack, tmp_path):
    """A 10 MB caption file is not read, a 5,000-character caption is cut, a caption path that is a folder is
    listed: each named in the report, and the images still load."""
    from lora_foundry.training.data.captions import MAX_CAPTION_CHARS
    from lora_foundry.training.data.dataset import load_dataset

    folder = small_dataset(tmp_path / "data", count=4)
    (folder / "img_0.txt").write_bytes(b"tag, " * 2_000_000)  # 10 MB
    (folder / "img_1.txt").write_text("word " * 1000)
    (folder / "img_2.txt").unlink()
    (folder / "img_2.txt").mkdir()
    dataset = load_dataset(folder, resolution=64, min_side=64, max_side=64)
    captions = {item.path.name: item.caption for item in dataset.items}
    assert captions["img_0.png"] == "" and captions["img_2.png"] == "" and captions["img_3.png"] == "sks circle, colour 3"
    assert captions["img_1.png"] == ("word " * 1000)[:MAX_CAPTION_CHARS].strip()
    report = dataset.report.summary()
    assert f"{folder / 'img_0.txt'}: 10,000,000 bytes, over the 65,536 a caption file may hold" in report, report
    assert f"{folder / 'img_2.txt'}: a folder, not a caption file" in report, report
    assert f"Captions cut to their first {MAX_CAPTION_CHARS:,} characters" in report, report
    assert f"{folder / 'img_1.txt'}: 4,999 characters" in report, report


def test_cancel_while_captions_are_encoded_stops_at_the_next_caption(pack, loaded_checkpoint, tmp_path):
    """Cancel while Train LoRA encodes its captions up front: the run stops before the next caption, not after
    all of them (a dataset of long captions kept /interrupt waiting for minutes)."""
    import comfy.model_management as mm
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(small_dataset(tmp_path / "data", count=4), resolution=64, min_side=64, max_side=64)
    encoded = []

    class CancelAfterFirst:  # the text encoder, with the user pressing Cancel once its first caption is encoded
        text = ""

        def __getattr__(self, name):
            return getattr(clip, name)

        def tokenize(self, text, **kwargs):
            self.text = text
            return clip.tokenize(text, **kwargs)

        def encode_from_tokens_scheduled(self, tokens, **kwargs):
            out = clip.encode_from_tokens_scheduled(tokens, **kwargs)
            if self.text.startswith("sks circle"):  # a dataset's caption (the trainer encodes others to probe)
                encoded.append(self.text)
                mm.interrupt_current_processing(True)
            return out

    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=1, preset="attention"), model)
        trainer = Trainer(model, CancelAfterFirst(), vae, dataset, network, TrainConfig(steps=1))
        try:
            with pytest.raises(mm.InterruptProcessingException):
                trainer.run()
        finally:
            mm.interrupt_current_processing(False)
    assert encoded == ["sks circle, colour 0"]


def test_a_non_finite_adapter_is_never_saved_as_last_good(pack, loaded_checkpoint, tmp_path):
    """An adapter whose alphas are NaN (set past the node's checks) stops at its first loss, and no
    <name>-last-good file is written: none of its adapters was finite, so none is kept, and the error says so."""
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.config import TrainingError
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(small_dataset(tmp_path / "data", caption="sks"), resolution=64, min_side=64, max_side=64)
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=1, alpha=math.nan, preset="attention"), model)
        trainer = Trainer(model, clip, vae, dataset, network, TrainConfig(steps=2), output_dir=tmp_path / "out",
                          name="nan_alpha")
        with pytest.raises(TrainingError, match="No adapter is kept: the one of step 0 has NaN or infinite values"):
            trainer.run()
    assert not list(tmp_path.rglob("*last-good*")), list(tmp_path.rglob("*"))


# --- names and paths ------------------------------------------------------------------------------------------------


def test_odd_output_names_are_refused_with_a_message(pack, tmp_path):
    from lora_foundry.training.run import run_folders

    loras, output = tmp_path / "loras", tmp_path / "output"
    for name, message in [(".", "must not be empty or start with '.'"), ("..", "'..' are not allowed"),
                          (".hidden", "start with '.'"), ("runs/.x", "start with '.'"), ("a//b", "must not be empty"),
                          ("a" * 300, "at most 200 characters, this has 300")]:
        with pytest.raises(ValueError, match=f"^output_name .*{message}"):
            run_folders(str(loras), str(output), name, False)
    assert run_folders(str(loras), str(output), "a" * 200, False).name == "a" * 200
    assert not any(tmp_path.rglob("*"))  # nothing created


def test_a_symlink_inside_input_is_held_to_the_allowed_roots(pack, tmp_path, monkeypatch):
    """input/link_out -> a folder outside every root is refused like the folder itself would be; a link to a folder
    inside a root still works."""
    import folder_paths
    from lora_foundry.training.run import ALLOWED_ROOTS, resolve_input_folder

    inputs, outside = tmp_path / "input", tmp_path / "elsewhere"
    (inputs / "real").mkdir(parents=True)
    outside.mkdir()
    (inputs / "link_out").symlink_to(outside, target_is_directory=True)
    (inputs / "link_in").symlink_to(inputs / "real", target_is_directory=True)
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inputs))
    monkeypatch.setenv(ALLOWED_ROOTS, "")
    with pytest.raises(ValueError, match=f"folder: {inputs / 'link_out'} \\(a link to {outside}\\) is outside "
                                         f".*{ALLOWED_ROOTS}={outside}"):
        resolve_input_folder("link_out")
    with pytest.raises(ValueError, match="is outside"):
        resolve_input_folder(str(inputs / "link_out" / "sub"))
    assert resolve_input_folder("link_in") == inputs / "link_in"
    monkeypatch.setenv(ALLOWED_ROOTS, str(outside))
    assert resolve_input_folder("link_out") == inputs / "link_out"


def test_a_vector_alpha_is_refused_naming_the_file_and_module(pack, loaded_checkpoint, tmp_path):
    from lora_foundry.lora_core.apply import apply_lora
    from lora_foundry.lora_core.files import AdapterFileError, write_safetensors
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig, read_network

    model, clip, _ = loaded_checkpoint
    with torch.inference_mode(False):
        tensors = LoraNetwork.create(NetworkConfig(rank=2, preset="attention"), model).state_dict_kohya()
    alpha_key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    module = alpha_key.removesuffix(".alpha")
    tensors[alpha_key] = torch.full((4,), 2.0)
    _, _, report = apply_lora(model, clip, tensors)
    assert report.refused == [f"{module}: alpha has 4 values (shape [4]), not one number"], report.refused
    path = tmp_path / "vector_alpha.safetensors"
    write_safetensors(tensors, path)
    with pytest.raises(AdapterFileError, match=f"{path}: .*{module}: alpha has 4 values"):
        read_network(path, model)


# --- what the README says Train LoRA writes -------------------------------------------------------------------------


@pytest.mark.server
def test_train_lora_by_itself_writes_only_its_run_state_as_the_readme_says(server, tiny_checkpoint, tmp_path):
    info = server.object_info()
    folders = [server.base_dir / "output", server.base_dir / "models" / "loras"]

    def files() -> set[Path]:
        return {p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()}

    before = files()
    images = small_dataset(tmp_path / "images", caption="sks")
    server.run(train_prompt(info, tiny_checkpoint.name, images, "readme_check"), timeout=300)
    state = server.base_dir / "output" / "lora_foundry_runs" / "readme_check" / "readme_check-state.safetensors"
    assert files() - before == {state}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert ("Train LoRA by itself writes only its resume state, "
            "`output/lora_foundry_runs/<output_name>/<output_name>-state.safetensors`") in " ".join(readme.split())
    shutil.rmtree(state.parent)


def test_stack_row_strengths_are_held_to_apply_loras_range(pack):
    """A LoRA Stack row carries its strengths inside the node's JSON text: the same range as Apply LoRA's inputs."""
    from lora_foundry.lora_core.stack import StackError, parse_rows

    for value in (1e9, -101, math.nan, math.inf):
        with pytest.raises(StackError, match="row 1, field 'strength_model': "):
            parse_rows(json.dumps([{"lora": "a.safetensors", "strength_model": value}]))
    assert parse_rows([{"lora": "a.safetensors", "strength_model": -100}])[0].strength_model == -100.0
