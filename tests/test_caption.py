"""Caption Images: a tiny random WD14 tagger (ONNX) and a tiny random BLIP captioner, built here from a seed,
run through the node in a real ComfyUI server on copies of the fixture dataset."""

from __future__ import annotations

import csv
import json
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from harness.comfy import REPO_ROOT
from harness.server import WorkflowError

RATINGS = ["general", "sensitive", "questionable", "explicit"]
CHARACTERS = ["alice_(wonderland)", "bob"]
GENERALS = ["red_circle", "blue_background", "long_hair", "^_^", "solo", "simple background", "outdoors", "sky"]
CHANNEL_TAGS = [("blue_channel", 0), ("green_channel", 0), ("red_channel", 0)]
BLIP_WORDS = ["a", "red", "blue", "green", "circle", "on", "background", "photo", "of", "the", "shape", "with"]


# --- models built at test time -------------------------------------------------------------------

def build_tagger(folder: Path, tags: list[tuple[str, int]], weight: np.ndarray, bias: np.ndarray, size: int = 32,
                 channels_first: bool = False, sigmoid: bool = True) -> Path:
    """A WD14-shaped ONNX tagger: scores = sigmoid(mean(BGR pixels / 255) @ weight + bias), and its tags CSV."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = ["batch", 3, size, size] if channels_first else ["batch", size, size, 3]
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[2, 3] if channels_first else [1, 2], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["features"]),
        helper.make_node("MatMul", ["features", "weight"], ["logits"]),
        helper.make_node("Add", ["logits", "bias"], ["z"]),
        helper.make_node("Sigmoid" if sigmoid else "Identity", ["z"], ["predictions_sigmoid"]),
    ]
    initializers = [numpy_helper.from_array(np.array([1 / 255], np.float32), "scale"),
                    numpy_helper.from_array(weight.astype(np.float32), "weight"),
                    numpy_helper.from_array(bias.astype(np.float32), "bias")]
    graph = helper.make_graph(
        nodes, "tiny_tagger", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(tags)])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, category, 100] for i, (name, category) in enumerate(tags))
    return folder


def random_tagger(folder: Path, seed: int = 0) -> Path:
    tags = [(t, 9) for t in RATINGS] + [(t, 4) for t in CHARACTERS] + [(t, 0) for t in GENERALS]
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 4, (3, len(tags)))
    bias = rng.normal(0, 1, len(tags)) - weight.sum(0) / 2
    bias[: len(RATINGS)] += 5  # rating tags score high: they must still never appear
    return build_tagger(folder, tags, weight, bias)


def channel_tagger(folder: Path, channels_first: bool = False) -> Path:
    """Scores are the mean of input channels 0, 1, 2 over 255: shows the layout, channel order and padding."""
    return build_tagger(folder, CHANNEL_TAGS, np.eye(3), np.zeros(3), channels_first=channels_first, sigmoid=False)


def tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A BLIP caption model with random weights, a tiny config and a word-level tokenizer, via save_pretrained."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {word: i for i, word in enumerate(specials + BLIP_WORDS)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")  # one token a line, in id order
    tokenizer = BertTokenizer(vocab_file=str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": vocab["[DEC]"],
                     "pad_token_id": 0, "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # words only, so a random model still says something
        model.text_decoder.cls.predictions.bias[: len(specials)] = -1e4
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioners(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("captioners")
    broken = random_tagger(base / "broken-wd")
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    return {"tiny-wd": random_tagger(base / "tiny-wd"), "tiny-blip": tiny_blip(base / "tiny-blip"),
            "broken-wd": broken}


@pytest.fixture(scope="module")
def caption_server(server, captioners):
    """The session's server with the test captioners in its models/captioners folder."""
    folder = server.base_dir / "models" / "captioners"
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in captioners.items():
        link = folder / name
        if not link.exists():
            link.symlink_to(path, target_is_directory=True)
    return server


def copy_dataset(concept_dataset: Path, target: Path, count: int = 6) -> Path:
    """The first `count` images of the fixture dataset (with their captions) in a writable folder."""
    source = next(concept_dataset.iterdir())
    sub = target / source.name
    sub.mkdir(parents=True)
    for image in sorted(source.glob("*.png"))[:count]:
        shutil.copy(image, sub)
        shutil.copy(image.with_suffix(".txt"), sub)
    return sub


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- engine ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(pack):
    from lora_foundry.training.captioning import autocaption, captioner, tagger
    from lora_foundry.training.captioning import edit as caption_edit
    return autocaption, caption_edit, captioner, tagger


def test_edit_options(engine):
    _, edit, _, _ = engine
    E = edit.EditOptions
    assert edit.edit_caption("red circle, sks, Red_Circle,  blue  bg", E(trigger_word="sks")) == "sks, red circle, blue bg"
    assert edit.edit_caption("a, b, a", E(deduplicate=False)) == "a, b, a"
    assert edit.edit_caption("a photo of a Dog on grass", E(trigger_word="sks dog", class_word="dog")) == \
        "a photo of a sks dog on grass"
    assert edit.edit_caption("a cat", E(trigger_word="sks dog", class_word="dog")) == "sks dog, a cat"
    options = E(trigger_word="sks", prefix="masterpiece,", suffix=" ,best", blacklist=edit.parse_tag_list("solo\n*_background"),
                replacements=edit.parse_replacements("circle => ring\n\nsky =>"), max_tags=2)
    assert edit.edit_caption("red circle, solo, blue background, sky, tree, grass", options) == \
        "masterpiece, sks, red ring, tree, best"
    assert edit.parse_replacements("a=>b\n x => y ") == (("a", "b"), ("x", "y"))
    with pytest.raises(ValueError, match="line 2"):
        edit.parse_replacements("a => b\nno arrow here")
    with pytest.raises(ValueError, match="max_tags"):
        E(max_tags=-1)


def test_text_writes_are_atomic_and_never_clobber_unless_asked(pack, tmp_path):
    from lora_foundry.lora_core.files import write_text_atomic

    path = tmp_path / "img.txt"
    write_text_atomic("first", path, overwrite=False)
    with pytest.raises(FileExistsError):
        write_text_atomic("second", path, overwrite=False)
    assert path.read_text() == "first" and (path.stat().st_mode & 0o777) == 0o644
    write_text_atomic("third", path)
    assert path.read_text() == "third" and [p.name for p in tmp_path.iterdir()] == ["img.txt"]


@pytest.mark.parametrize("channels_first", [False, True])
def test_tagger_input_is_wd14(engine, tmp_path, channels_first):
    """A blue 32x64 image padded to a white square, BGR, 0-255, in the model's own layout."""
    from PIL import Image

    _, _, _, tagger = engine
    model = tagger.OnnxTagger(channel_tagger(tmp_path / "channels", channels_first), general_threshold=0.75)
    assert model.size == 32 and model.channels_first == channels_first
    scores = model.scores(Image.new("RGB", (32, 64), (0, 0, 255)))
    assert scores["blue channel"] == pytest.approx(1.0, abs=1e-3)
    assert scores["green channel"] == pytest.approx(0.5, abs=0.02) and scores["red channel"] == pytest.approx(0.5, abs=0.02)
    assert model.caption(Image.new("RGB", (64, 32), (0, 0, 255))) == "blue channel"


def test_tagger_thresholds_categories_and_names(engine, tmp_path, concept_dataset):
    from PIL import Image

    _, _, _, tagger = engine
    images = [Image.open(p).convert("RGB") for p in sorted(next(concept_dataset.iterdir()).glob("*.png"))[:8]]
    seen = set()
    for general, character in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0)):
        model = tagger.OnnxTagger(random_tagger(tmp_path / "wd"), general, character)
        for image in images:
            scores = model.scores(image)
            chars = sorted((t for t in ("alice (wonderland)", "bob") if scores[t] > character), key=lambda t: -scores[t])
            gens = sorted((tagger.readable_tag(t) for t in GENERALS if scores[tagger.readable_tag(t)] > general),
                          key=lambda t: -scores[t])
            caption = model.caption(image)
            assert caption == ", ".join(chars + gens)
            assert not set(caption.split(", ")) & set(RATINGS)
            seen.update(caption.split(", "))
    assert {"long hair", "^_^", "alice (wonderland)", "red circle"} <= seen


def test_broken_models_are_named(engine, tmp_path, captioners):
    _, _, captioner, tagger = engine
    settings = captioner.CaptionerSettings()
    with pytest.raises(tagger.CaptionModelError, match=r"broken-wd/model.onnx: not a loadable ONNX model"):
        captioner.load_captioner(captioners["broken-wd"], settings)
    bad_csv = random_tagger(tmp_path / "bad-csv")
    (bad_csv / "selected_tags.csv").write_text("tag_id,label\n1,x\n")
    with pytest.raises(tagger.CaptionModelError, match=r"bad-csv/selected_tags.csv: not a readable WD14 tags file"):
        captioner.load_captioner(bad_csv, settings)
    short_csv = random_tagger(tmp_path / "short-csv")
    (short_csv / "selected_tags.csv").write_text("tag_id,name,category,count\n0,x,0,1\n")
    with pytest.raises(tagger.CaptionModelError, match="gives 14 scores but selected_tags.csv lists 1 tags"):
        captioner.load_captioner(short_csv, settings)
    blip = shutil.copytree(captioners["tiny-blip"], tmp_path / "bad-blip")
    (blip / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(tagger.CaptionModelError, match="bad-blip: cannot load the transformers captioner"):
        captioner.load_captioner(blip, settings)
    with pytest.raises(tagger.CaptionModelError, match="neither"):
        captioner.load_captioner(tmp_path, settings)


def test_cancel_keeps_the_captions_written_so_far(engine, pack, tmp_path, concept_dataset, captioners):
    import comfy.model_management as mm
    from lora_foundry.training.data.dataset import load_dataset

    autocaption, edit, captioner, _ = engine
    folder = copy_dataset(concept_dataset, tmp_path, count=6)
    for txt in folder.glob("*.txt"):
        txt.unlink()
    dataset = load_dataset(tmp_path, min_side=32)
    model = captioner.load_captioner(captioners["tiny-wd"], captioner.CaptionerSettings(general_threshold=0.0))

    def cancel_after_three(done, total):
        if done == 3:
            mm.interrupt_current_processing(True)

    with pytest.raises(mm.InterruptProcessingException):
        autocaption.caption_items(dataset.items, "caption missing", "new files only", edit.EditOptions(), ".txt",
                                  model, on_progress=cancel_after_three,
                                  check_cancel=mm.throw_exception_if_processing_interrupted)
    written = sorted(p.name for p in folder.glob("*.txt"))
    assert written == ["img_000.txt", "img_001.txt", "img_002.txt"]
    assert all(p.read_text().strip() for p in folder.glob("*.txt"))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_missing_model_says_where_to_put_one(pack, comfy_root):
    from lora_foundry.nodes.caption import CaptionImages, captioner_bases

    bases = captioner_bases()
    assert bases and all(b.endswith("captioners") for b in bases)
    with pytest.raises(ValueError) as err:
        CaptionImages.model_folder("none", "caption missing")
    message = str(err.value)
    assert "no captioning model is installed" in message
    assert str(Path(bases[0]) / "<name>") in message and "model.onnx + selected_tags.csv" in message


# --- through the server --------------------------------------------------------------------------

def caption_workflow(folder: Path, model: str, use_loader: bool = True, **widgets) -> dict:
    """Load Dataset -> Caption Images as an API prompt, or Caption Images alone on `folder`."""
    inputs = {
        "model": model, "mode": "caption missing", "write_files": "new files only", "general_threshold": 0.35,
        "character_threshold": 0.85, "trigger_word": "", "class_word": "", "prefix": "", "suffix": "",
        "find_replace": "", "blacklist": "", "deduplicate": True, "max_tags": 0, "caption_extension": ".txt",
        "preview_count": 4, **widgets,
    }
    load = {"folder": str(folder), "resolution": 64, "min_side": 32, "max_side": 128, "bucket_step": 32,
            "no_upscale": False, "caption_extension": ".txt", "validation_split": 0.0, "seed": 0}
    if not use_loader:
        return {"2": {"class_type": "LoraFoundryCaptionImages", "inputs": {**inputs, "folder": str(folder)}}}
    return {"1": {"class_type": "LoraFoundryLoadDataset", "inputs": load},
            "2": {"class_type": "LoraFoundryCaptionImages", "inputs": {**inputs, "dataset": ["1", 0]}}}


def run_caption(server, folder: Path, model: str, **widgets) -> tuple[str, dict[str, str], list]:
    """(tag stats, {image name: caption}, preview images shown on the node)."""
    ui = server.run(caption_workflow(folder, model, **widgets), timeout=300)["2"]
    stats, listing = ui["text"]
    captions = dict(line.split(": ", 1) for line in listing.splitlines())
    return stats, {Path(k).name: v for k, v in captions.items()}, ui["images"]


@pytest.mark.server
def test_tagger_captions_only_missing_files(caption_server, captioners, concept_dataset, tmp_path, engine):
    from PIL import Image

    _, _, _, tagger = engine
    folder = copy_dataset(concept_dataset, tmp_path, count=6)
    for name in ("img_001.txt", "img_004.txt"):
        (folder / name).unlink()
    (folder / "img_002.txt").write_text("")  # empty: counts as no caption
    before = snapshot(folder)
    stats, captions, previews = run_caption(caption_server, tmp_path, "tiny-wd", general_threshold=0.5,
                                            character_threshold=0.6, trigger_word="sks", blacklist="solo")
    oracle = tagger.OnnxTagger(captioners["tiny-wd"], 0.5, 0.6)
    for name in ("img_001", "img_002", "img_004"):
        tags = [t for t in oracle.caption(Image.open(folder / f"{name}.png")).split(", ") if t and t != "solo"]
        want = ", ".join(["sks", *tags])
        assert captions[f"{name}.png"] == want
        assert (folder / f"{name}.txt").read_text() == want + "\n"
    for name, data in before.items():
        if name not in ("img_002.txt",) and name.endswith(".txt"):
            assert (folder / name).read_bytes() == data, f"{name} was changed"
    assert captions["img_000.png"] == "sks, " + before["img_000.txt"].decode()  # edits reach the graph, not the file
    assert "3 by the model" in stats and "3 written new, 0 replaced" in stats and "Tag frequency" in stats
    assert len(previews) == 4 and all((caption_server.base_dir / "temp" / p["filename"]).is_file() for p in previews)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.server
def test_recaption_overwrites_only_when_asked(caption_server, concept_dataset, tmp_path):
    folder = copy_dataset(concept_dataset, tmp_path, count=4)
    before = snapshot(folder)
    stats, captions, _ = run_caption(caption_server, tmp_path, "tiny-wd", mode="re-caption all",
                                     general_threshold=0.0, character_threshold=0.0)
    assert snapshot(folder) == before, "re-caption without overwrite changed a file"
    assert all("sks circle" not in c and c for c in captions.values()) and "0 written new, 0 replaced" in stats
    stats, captions, _ = run_caption(caption_server, tmp_path, "tiny-wd", mode="re-caption all", max_tags=3,
                                     write_files="overwrite existing", general_threshold=0.0, character_threshold=0.0)
    assert "4 replaced" in stats
    for name, caption in captions.items():
        assert len(caption.split(", ")) == 3
        assert (folder / name).with_suffix(".txt").read_text() == caption + "\n"


@pytest.mark.server
def test_transformers_captioner_on_a_folder(caption_server, concept_dataset, tmp_path):
    folder = copy_dataset(concept_dataset, tmp_path, count=3)
    before = snapshot(folder)
    stats, captions, _ = run_caption(caption_server, tmp_path, "tiny-blip", use_loader=False, mode="re-caption all",
                                     write_files="none", prefix="photo", max_new_tokens=6)
    assert snapshot(folder) == before
    assert len(captions) == 3 and "3 by the model" in stats
    for caption in captions.values():
        assert caption.startswith("photo, ")
        assert set(caption.removeprefix("photo, ").split()) <= set(BLIP_WORDS)


@pytest.mark.server
def test_errors_name_the_file_and_lose_nothing(caption_server, concept_dataset, tmp_path):
    folder = copy_dataset(concept_dataset, tmp_path, count=4)
    (folder / "notes.png").write_text("not an image")
    (folder / "img_001.txt").write_bytes(b"\xff\xfe broken \x80 caption")
    (folder / "img_002.txt").unlink()
    before = snapshot(folder)

    for model, expected in (("missing-model", r"'missing-model' is not installed .*models/captioners/<name>/"),
                            ("none", r"no model is selected"),
                            ("broken-wd", r"broken-wd/model.onnx: not a loadable ONNX model")):
        with pytest.raises(WorkflowError, match=expected):
            run_caption(caption_server, tmp_path, model)
        assert snapshot(folder) == before

    no_input = caption_workflow(tmp_path, "tiny-wd", use_loader=False)
    no_input["2"]["inputs"]["folder"] = " "
    with pytest.raises(WorkflowError, match="connect a dataset .* or give a folder"):
        caption_server.run(no_input)

    stats, captions, _ = run_caption(caption_server, tmp_path, "tiny-wd", mode="re-caption all",
                                     write_files="overwrite existing", general_threshold=0.0)
    assert (folder / "img_001.txt").read_bytes() == before["img_001.txt"], "an unreadable caption was overwritten"
    assert f"{folder / 'img_001.txt'}: cannot be read as UTF-8" in stats
    assert f"{folder / 'notes.png'}: not a readable image" in stats
    assert (folder / "img_002.txt").read_text().strip() == captions["img_002.png"]
    assert "notes.png" not in captions and (folder / "notes.png").read_text() == "not an image"


def post_caption(server, body) -> tuple[int, dict]:
    """POST /lora_foundry/caption; (HTTP status, JSON answer), errors included."""
    try:
        return 200, server.post("/lora_foundry/caption", body)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.server
def test_captions_edited_on_the_node_write_only_that_caption_file(caption_server, concept_dataset, tmp_path):
    folder = copy_dataset(concept_dataset, tmp_path / "data", count=4)
    sub = folder.name
    (tmp_path / "outside.txt").write_text("outside")
    workflow = caption_workflow(tmp_path / "data", "none", mode="keep existing", write_files="none", preview_count=3)
    rows = caption_server.run(workflow, timeout=300)["2"]["captions"]
    assert [r["image"] for r in rows] == [f"{sub}/img_00{i}.png" for i in range(3)], rows
    assert all(r["caption"] == (folder / f"img_00{i}.txt").read_text().strip() for i, r in enumerate(rows)), rows
    token = rows[0]["token"]
    assert {r["token"] for r in rows} == {token}

    text = "sks circle,  edited by hand \u00e9\n"  # exactly this, spaces and newline included
    status, answer = post_caption(caption_server, {"token": token, "image": f"{sub}/img_001.png", "caption": text})
    assert (status, answer) == (200, {"ok": True, "path": f"{sub}/img_001.txt"})
    assert (folder / "img_001.txt").read_text(encoding="utf-8") == text

    shutil.copy(folder / "img_000.png", folder / "new.png")  # in the folder, not in the run
    (folder / "img_002.txt").unlink()
    (folder / "img_002.txt").symlink_to(tmp_path / "outside.txt")  # a caption file that leads out
    before = snapshot(folder)
    good = {"token": token, "image": f"{sub}/img_000.png", "caption": "new"}
    refused = [
        ({"image": f"{sub}/img_003.png"}, "image", "not one of the 3 images this run showed"),
        ({"image": f"{sub}/new.png"}, "image", "not one of the 3 images"),
        ({"image": "../x.png"}, "image", "'..' is not allowed"),
        ({"image": f"{sub}/../{sub}/img_000.png"}, "image", "'..' is not allowed"),
        ({"image": str(folder / "img_000.png")}, "image", "absolute paths"),
        ({"image": f"{sub}/img_000.png\0.txt"}, "image", "NUL byte"),
        ({"image": 7}, "image", "as a string"),
        ({"image": f"{sub}/img_002.png"}, "image", "leads out of"),
        ({"token": "0" * 32}, "token", "unknown Caption Images run"),
        ({"token": None}, "token", "unknown Caption Images run"),
        ({"caption": ["a"]}, "caption", "must be a string"),
        ({"caption": "x" * 10_001}, "caption", "at most 10000"),
        ({"caption": "a\0b"}, "caption", "NUL byte"),
    ]
    for change, field, message in refused:
        status, answer = post_caption(caption_server, {**good, **change})
        assert status == 400 and answer["field"] == field, (change, status, answer)
        assert answer["error"].startswith(f"{field}: ") and message in answer["error"], (change, answer)
    status, answer = post_caption(caption_server, ["not", "an", "object"])
    assert status == 400 and answer["field"] == "body", answer
    assert snapshot(folder) == before and (tmp_path / "outside.txt").read_text() == "outside"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "outside.txt"]

    # The same prompt again: the node runs again (not from the cache) and reads the saved caption.
    outputs = caption_server.run(workflow, timeout=300)["2"]
    listing = dict(line.split(": ", 1) for line in outputs["text"][1].splitlines())
    assert listing[f"{sub}/img_001.png"] == "sks circle, edited by hand \u00e9", listing
    assert outputs["captions"][0]["token"] != token


@pytest.mark.server
@pytest.mark.slow
def test_example_workflow_captions_then_trains(caption_server, tiny_checkpoint, concept_dataset, tmp_path):
    from main_job import example_workflow, install_dataset
    from safetensors import safe_open

    path = REPO_ROOT / "example_workflows" / "caption_then_train.json"
    workflow = example_workflow(tiny_checkpoint.name, caption_server.object_info(), steps=4, path=path)
    caption = next(n for n in workflow["nodes"] if n["type"] == "LoraFoundryCaptionImages")
    caption["widgets_values"][0] = "tiny-wd"
    dataset = copy_dataset(concept_dataset, tmp_path, count=8)
    for txt in sorted(dataset.glob("*.txt"))[::2]:
        txt.unlink()
    install_dataset(caption_server, tmp_path)
    outputs = caption_server.run(workflow, timeout=900)
    written = sorted(dataset.glob("*.txt"))
    assert len(written) == 8
    lora = next(Path(t) for out in outputs.values() for t in out.get("text", []) if str(t).endswith(".safetensors"))
    with safe_open(str(lora), "pt") as f:
        frequency = json.loads(f.metadata()["ss_tag_frequency"])
    tags = frequency[dataset.name]
    assert tags.get("sks circle") == 4  # the captions that were there
    new_tags = {t for p in written[::2] for t in p.read_text().strip().split(", ")}
    assert new_tags and new_tags <= set(tags), "Train LoRA did not see the new captions"


def test_the_pack_loads_without_onnxruntime():
    """onnxruntime is imported only when a tagger is used, so the node loads without it."""
    import os
    import subprocess
    import sys

    code = ("import sys; from harness.comfy import setup_inprocess, import_pack; setup_inprocess(); "
            "pack = import_pack(); import importlib; "
            "assert 'LoraFoundryCaptionImages' in importlib.import_module('lora_foundry.nodes').node_ids(); "
            "print(sorted(m for m in ('onnxruntime', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT / "scripts")),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
