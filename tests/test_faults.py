"""Faults and a shared server: folders outside ComfyUI's refused unless allowed, cancel during latent caching,
kill -9 then resume, prompts back to back on one server with their memory released."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness.comfy import REPO_ROOT
from harness.server import WorkflowError
from harness.workflow import default_inputs, train_prompt

HEADLESS = REPO_ROOT / "scripts" / "train_lora.py"


def small_dataset(concept_dataset: Path, folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    for path in sorted((concept_dataset / "10_sks circle").glob("*.png"))[:count]:
        shutil.copy(path, folder / path.name)
        shutil.copy(path.with_suffix(".txt"), folder / f"{path.stem}.txt")
    return folder


# --- folders a shared server reads ------------------------------------------------------------------------------------


def test_folders_outside_comfyui_are_refused_unless_the_owner_allows_them(pack, tmp_path, monkeypatch):
    import folder_paths
    from lora_foundry.training.run import ALLOWED_ROOTS, resolve_input_folder

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.setenv(ALLOWED_ROOTS, "")
    with pytest.raises(ValueError, match=f"reg_folder: {outside} is outside ComfyUI's input, output and models "
                                         f"folders.*start ComfyUI with {ALLOWED_ROOTS}={outside}"):
        resolve_input_folder(str(outside), "reg_folder")
    with pytest.raises(ValueError, match=r"folder: '../x' leaves ComfyUI's input folder"):
        resolve_input_folder("../x")
    with pytest.raises(ValueError, match="is outside"):  # '..' inside an absolute path is normalised first
        resolve_input_folder(os.path.join(folder_paths.get_input_directory(), "..", "..", "etc"))
    inside = Path(folder_paths.get_input_directory()) / "mine"
    assert resolve_input_folder("mine") == inside
    assert resolve_input_folder(str(inside)) == inside
    assert resolve_input_folder(str(Path(folder_paths.models_dir) / "x")) == Path(folder_paths.models_dir) / "x"
    monkeypatch.setenv(ALLOWED_ROOTS, os.pathsep.join(["/nonexistent", str(tmp_path)]))
    assert resolve_input_folder(str(outside)) == outside
    monkeypatch.setenv(ALLOWED_ROOTS, "")
    assert resolve_input_folder(str(outside), restricted=False) == outside  # a headless run by the machine's user


@pytest.mark.server
def test_the_server_refuses_a_dataset_folder_outside_its_roots(server):
    """Load Dataset on /usr/share (outside the server's folders and the roots its owner listed) fails naming the
    setting and the way to allow it; the server keeps serving."""
    info = server.object_info()
    prompt = {"1": {"class_type": "LoraFoundryLoadDataset",
                    "inputs": {**default_inputs(info["LoraFoundryLoadDataset"]), "folder": "/usr/share"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    with pytest.raises(WorkflowError, match="folder: /usr/share is outside ComfyUI's input, output and models folders"
                                            ".*LORA_FOUNDRY_ALLOWED_ROOTS"):
        server.run(prompt, timeout=120)
    assert server.object_info()  # still up


# --- cancel and kill ------------------------------------------------------------------------------------------------


def test_cancel_during_latent_caching_leaves_only_whole_cache_files(pack, loaded_checkpoint, concept_dataset,
                                                                    tmp_path):
    """Cancel while the VAE encodes: the run stops before its next chunk, and what the disk cache holds is whole
    files (each reads back), none under a temporary name."""
    import comfy.model_management as mm
    from lora_foundry.lora_core.files import read_safetensors
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    images = small_dataset(concept_dataset, tmp_path / "images", count=20)
    dataset = load_dataset(images, resolution=64, min_side=64, max_side=64)
    encodes = []

    class CancelAfterFirst:  # the VAE, with the user pressing Cancel once its first chunk is encoded
        def __getattr__(self, name):
            return getattr(vae, name)

        def encode(self, pixels):
            encodes.append(len(pixels))
            latents = vae.encode(pixels)
            mm.interrupt_current_processing(True)
            return latents

    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=2, preset="attention"), model)
        trainer = Trainer(model, clip, CancelAfterFirst(), dataset, network,
                          TrainConfig(steps=1, latent_cache="disk"), output_dir=tmp_path / "out")
        try:
            with pytest.raises(mm.InterruptProcessingException):
                trainer.run()
        finally:
            mm.interrupt_current_processing(False)
    assert encodes == [16]  # one chunk of 16, then the cancel was seen
    # The latents (the captions' text-encoder outputs have a folder of their own).
    cached = [p for p in images.rglob("*") if p.is_file() and p.parent.name == ".lora_foundry_cache"]
    assert len(cached) == 16 and all(p.suffix == ".safetensors" and not p.name.startswith(".") for p in cached)
    assert all(read_safetensors(p)[0]["latent"].shape[1] == 4 for p in cached)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_kill_9_during_training_then_resume(pack, concept_dataset, tmp_path, tiny_checkpoint):
    """SIGKILL a headless run that saves every step, mid-run: every .safetensors left reads back whole (writes are
    atomic; a write the kill cut short can only leave a hidden .tmp file, which no loader lists), and the run resumes
    from its state to the end."""
    from lora_foundry.lora_core.files import read_safetensors
    from lora_foundry.training.engine.state import saved_loop

    base = tmp_path / "base"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "tiny.safetensors").symlink_to(tiny_checkpoint)
    images = small_dataset(concept_dataset, tmp_path / "images")

    def config(resume: bool, steps: int) -> Path:
        path = tmp_path / f"run-{resume}.toml"
        path.write_text(f'[run]\noutput_name = "killed"\nresume = {str(resume).lower()}\n'
                        f'[model]\ncheckpoint = "tiny.safetensors"\n'
                        f'[dataset]\nfolder = "{images}"\nresolution = 64\nmin_side = 64\nmax_side = 64\n'
                        '[network]\nrank = 2\nalpha = 2.0\ntargets = "attention"\n'
                        f'[training]\nsteps = {steps}\nsave_every = 1\n')
        return path

    run = base / "models" / "loras" / "killed"
    state = base / "output" / "lora_foundry_runs" / "killed" / "killed-state.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(HEADLESS), str(config(False, 10_000)), "--base-directory",
                                str(base), "--cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(run.glob("killed-step*.safetensors"))) < 3:
            time.sleep(0.1)
        time.sleep(0.5)  # inside some later step's writes
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    names = [p.name for p in run.iterdir()] + [p.name for p in state.parent.iterdir()]
    finals = [n for n in names if n.endswith(".safetensors")]
    assert len(finals) >= 4 and all(n.startswith("killed-st") for n in finals), names
    assert all(n.startswith(".") and n.endswith(".tmp") for n in set(names) - set(finals)), names
    for path in [*run.glob("*.safetensors"), state]:
        read_safetensors(path)  # whole: a half-written file fails to read
    step = saved_loop(state)["step"]
    assert step >= 3
    result = subprocess.run([sys.executable, str(HEADLESS), str(config(True, step + 2)), "--base-directory",
                             str(base), "--cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{step + 2} steps in" in result.stdout and (run / "killed.safetensors").is_file()
    assert saved_loop(state)["step"] == step + 2


KILLED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from harness.comfy import import_pack
import_pack()
from lora_foundry.lora_core import files


class HalfThenKilled:  # the file object of a write that SIGKILL stops half-way
    def __init__(self, *args, **kwargs):
        self.file = open(*args, **kwargs)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)


files.open = HalfThenKilled
files.write_safetensors({"x": __import__("torch").ones(1000)}, sys.argv[2])
"""


def test_a_write_killed_half_way_leaves_the_old_file_whole(tmp_path):
    """The kill lands inside the write, every time: the file keeps its old bytes and only a hidden .tmp is left."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter.safetensors"
    save_file({"x": torch.zeros(10)}, str(path))
    old = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(REPO_ROOT / "scripts"), str(path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert path.read_bytes() == old and torch.equal(load_file(str(path))["x"], torch.zeros(10))
    left = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(left) == 1 and left[0].startswith(".adapter.safetensors.") and left[0].endswith(".tmp"), left


# --- one server, many prompts ---------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def sampling_prompt(checkpoint: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
            "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def pixels(server, outputs: dict) -> bytes:
    from PIL import Image

    (path,) = server.output_files(outputs)
    with Image.open(path) as img:
        return img.convert("RGB").tobytes()


@pytest.mark.server
def test_training_and_sampling_interleaved_in_the_queue(server, tiny_checkpoint, concept_dataset, tmp_path):
    """Train, sample, train queued at once: the sample in between is the base model's, pixel for pixel what it is
    alone (a training run leaves no adapter, patch or hook on the cached model)."""
    images = small_dataset(concept_dataset, tmp_path / "images", count=2)
    info = server.object_info()
    alone = pixels(server, server.run(sampling_prompt(tiny_checkpoint.name, "alone")))
    ids = [server.queue(train_prompt(info, tiny_checkpoint.name, images, "interleaved", seed=1, save_every=1)),
           server.queue(sampling_prompt(tiny_checkpoint.name, "between")),
           server.queue(train_prompt(info, tiny_checkpoint.name, images, "interleaved", seed=2, save_every=1))]
    outputs = [server.wait(i, timeout=600) for i in ids]
    assert pixels(server, outputs[1]) == alone
    assert "1 steps" in outputs[0]["4"]["text"][0] and "1 steps" in outputs[2]["4"]["text"][0]


@pytest.mark.server
def test_fifty_training_prompts_keep_the_server_memory_flat(server, tiny_checkpoint, concept_dataset, tmp_path):
    """50 short training prompts back to back on one server: its RSS after each stays flat (the slope over the last
    40 is reported and bounded), each run starts with the last one's memory released, and no temporary file is left
    anywhere under the server's folders."""
    import json

    from conftest import ARTIFACTS

    images = small_dataset(concept_dataset, tmp_path / "images", count=2)
    info = server.object_info()
    pid = server.process.pid
    start = rss_mb(pid)
    rss = []
    began = time.monotonic()
    for seed in range(50):
        outputs = server.run(train_prompt(info, tiny_checkpoint.name, images, "soak", seed=100 + seed, save_every=1), timeout=300)
        assert "1 steps" in outputs["4"]["text"][0]
        rss.append(rss_mb(pid))
    seconds = time.monotonic() - began
    tail = rss[10:]
    mean_x, mean_y = (len(tail) - 1) / 2, sum(tail) / len(tail)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(tail)) / sum(
        (x - mean_x) ** 2 for x in range(len(tail)))
    figures = {"runs": 50, "seconds": round(seconds, 1), "rss_before_mb": round(start, 1),
               "rss_after_first_mb": round(rss[0], 1), "rss_after_second_mb": round(rss[1], 1),
               "rss_after_last_mb": round(rss[-1], 1), "slope_last_40_mb_per_run": round(slope, 3)}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "soak_50_runs.json").write_text(json.dumps(figures, indent=1))
    print(figures)
    assert slope < 0.5, figures  # a run that kept its model clone, latents or adapter would add megabytes each
    assert rss[-1] - rss[9] < 40, figures
    assert rss[1] - rss[0] < 20, figures  # the second run started with the first's memory released
    left = [p for p in server.base_dir.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffixes]
    assert not left, left
    assert len(list((server.base_dir / "models" / "loras").glob("soak*"))) == 50


# --- cancel in the toolbox, a full disk while training ------------------------------------------------------------


def test_cancel_stops_extraction_and_merging_at_the_next_layer(pack, loaded_checkpoint):
    """Cancel raised while extracting and merging: the work stops after the layer in hand (the nodes' progress
    callback honours it), and nothing is returned to save."""
    import comfy.model_management as mm
    from lora_foundry.lora_core.extract import extract_lora
    from lora_foundry.lora_core.merge import merge_exact
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.lora_core.ranks import RankRule
    from lora_foundry.nodes.host import comfy_progress

    model, _, _ = loaded_checkpoint
    with torch.inference_mode(False):
        network = LoraNetwork.create(NetworkConfig(rank=2, preset="attention"), model)
    calls = []
    honour = comfy_progress()

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 2:
            mm.interrupt_current_processing(True)  # the user presses Cancel during the second layer's report
        honour(done, total)

    for work in (lambda: merge_exact([(network, 1.0), (network, 0.5)], RankRule(2), progress=progress),
                 lambda: extract_lora(model, model, rule=RankRule(2), preset="attention", progress=progress)):
        calls.clear()
        try:
            with pytest.raises(mm.InterruptProcessingException):
                work()
        finally:
            mm.interrupt_current_processing(False)
        assert len(calls) == 2 and calls[-1][1] > 2, calls  # stopped with layers left


def test_a_full_disk_while_training_keeps_the_last_files(pack, loaded_checkpoint, concept_dataset, tmp_path,
                                                         monkeypatch):
    """The disk fills up while step 2's state is written: the run stops with a message naming the file, and step 1's
    checkpoint and state are whole and still step 1's."""
    import errno

    from lora_foundry.lora_core.files import read_safetensors
    from lora_foundry.lora_core.network import LoraNetwork, NetworkConfig
    from lora_foundry.training.data.dataset import load_dataset
    from lora_foundry.training.engine.state import saved_loop
    from lora_foundry.training.engine.trainer import TrainConfig, Trainer

    model, clip, vae = loaded_checkpoint
    dataset = load_dataset(small_dataset(concept_dataset, tmp_path / "images"), resolution=64, min_side=64,
                           max_side=64)
    with torch.inference_mode(False):
        trainer = Trainer(model, clip, vae, dataset, LoraNetwork.create(NetworkConfig(rank=2, preset="attention"),
                                                                        model),
                          TrainConfig(steps=4, save_every=1), output_dir=tmp_path / "out", name="full")
        writes = []
        real_fsync = os.fsync

        def fsync(fd):
            writes.append(fd)
            if len(writes) == 4:  # step 1: checkpoint, state; step 2: checkpoint, then the state fails
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(OSError, match=r"full-state.safetensors: could not be written .*No space left on device"
                                          r".*the previous file is unchanged"):
            trainer.run()
        monkeypatch.setattr(os, "fsync", real_fsync)
    out = tmp_path / "out"
    assert saved_loop(out / "full-state.safetensors")["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["full-state.safetensors", "full-step000001.safetensors",
                                                     "full-step000002.safetensors"]
    for path in out.iterdir():
        read_safetensors(path)
