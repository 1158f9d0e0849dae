"""Shared fixtures: the real ComfyUI host in-process, generated models, and a live server."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from harness import fixtures
from harness.comfy import REPO_ROOT, allowed_roots_env, import_pack, setup_inprocess
from harness.server import ComfyServer

os.environ.update(allowed_roots_env())  # tests give nodes folders in temporary and cache folders

# Under pytest-xdist (the README's test command: two workers) each worker computes on one core: two workers with two
# OpenMP threads each on a 2-core machine spin-wait for each other (toy pretraining steps ran ~6x slower so). Set
# before torch is imported; the servers and subprocesses a test starts inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# The modules that read the toy bases: the toy-world tests and the bench smoke runs (bench_toyworld.py).
TOYWORLD_TESTS = (Path(__file__).with_name("test_toyworld.py"), Path(__file__).with_name("test_bench.py"))


def pytest_configure(config):
    """Under xdist, the controller makes the toy bases and their judges (cached in .cache/toyworld/) before the
    workers start, on two threads as everywhere (toyworld.pretrain.fixed_threads): minutes of work that would
    otherwise hold one worker while the other ran beside it on the same two cores."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    chosen = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    if not any(path == module or path in module.parents for path in chosen for module in TOYWORLD_TESTS):
        return
    from toyworld.prepare import FAMILIES, prepare

    capture = config.pluginmanager.getplugin("capturemanager")

    def log(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(message, flush=True)

    prepare(0, log=log, families=FAMILIES if selects_flow_world(config) else ("sd15",))


def selects_flow_world(config) -> bool:
    """Whether the run's -m expression takes the flow toy world's tests (they carry `toyworld` and `flow_world`)."""
    from _pytest.mark.expression import Expression

    expression = config.option.markexpr
    return not expression or Expression.compile(expression).evaluate(
        lambda name, **_: name in ("toyworld", "flow_world", "server", "slow"))


# The longest work on a quiet 2-core machine (one worker each), longest first: the toy-world classes (minutes each,
# their bases made before the workers start), then modules; the rest follow in their collection order. Scheduled so,
# the short modules fill in at the end and both workers finish together.
LONG_WORK = ("TestSD15", "TestSD3", "test_mutants", "test_browser", "test_train", "test_memory",
             "test_training_features", "test_faults", "test_bench", "test_configs", "test_gpu_check", "test_workflows",
             "test_families", "test_video", "test_stack")


def pytest_collection_modifyitems(config, items):
    """The long work first, longest first: with --dist loadscope (a module, or a class, per worker) and no
    reordering, the longest work starts at once and the short modules fill in behind it."""
    def rank(item) -> int:
        name = item.cls.__name__ if item.get_closest_marker("toyworld") else Path(str(item.fspath)).stem
        return LONG_WORK.index(name) if name in LONG_WORK else len(LONG_WORK)

    items.sort(key=rank)


ARTIFACTS = Path(os.environ.get("LORA_FOUNDRY_ARTIFACTS", REPO_ROOT / "test-artifacts"))


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    return setup_inprocess()


@pytest.fixture(scope="session")
def pack(comfy_root):
    """This repository imported as a package, the way ComfyUI imports a custom node pack."""
    return import_pack()


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return fixtures.tiny_sd15_checkpoint()


@pytest.fixture(scope="session")
def tiny_parts() -> dict[str, Path]:
    return fixtures.tiny_sd15_parts()


@pytest.fixture(scope="session")
def concept_dataset() -> Path:
    return fixtures.concept_dataset()


@pytest.fixture(scope="session")
def loaded_checkpoint(comfy_root, tiny_checkpoint):
    """(MODEL patcher, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded by ComfyUI itself."""
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    return model, clip, vae


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_checkpoint, tiny_parts):
    """A real ComfyUI server with the pack and the fixture models, shared by the session."""
    base = tmp_path_factory.mktemp("comfy")
    models = {
        "checkpoints": [tiny_checkpoint],
        "diffusion_models": [tiny_parts["unet"]],
        "text_encoders": [tiny_parts["clip"]],
        "vae": [tiny_parts["vae"]],
    }
    srv = ComfyServer(base, models=models)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "server.log").write_text(srv.log())


@pytest.fixture
def one_thread():
    """Small matrices: on a busy 2-core machine two OpenMP threads spin-wait for each other and run such
    work 10-100x slower than one thread does."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def comfy_nodes(comfy_root):
    """ComfyUI's nodes.py. A plain `import nodes` finds this repository's nodes/ package when the
    working directory is on sys.path (`python -m pytest`), so it is loaded from the host's file."""
    module = sys.modules.get("nodes")
    if not hasattr(module, "LoraLoader"):
        spec = importlib.util.spec_from_file_location("nodes", comfy_root / "nodes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["nodes"] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loras_dir(comfy_root, tmp_path_factory):
    """A folder registered as ComfyUI's "loras", where LoraLoader finds our files."""
    import folder_paths

    path = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(path))
    return path


@pytest.fixture(scope="session")
def core(pack) -> SimpleNamespace:
    """The engine modules, imported the way ComfyUI imports the pack."""
    def load(name):
        return importlib.import_module(f"{pack.__name__}.lora_core.{name}")

    network = load("network")
    return SimpleNamespace(
        adapters=load("adapters"), apply=load("apply"), files=load("files"), kohya_keys=load("kohya_keys"),
        targets=load("targets"), ranks=load("ranks"), svd=load("svd"), merge=load("merge"), extract=load("extract"),
        resize=load("resize"), metadata=load("metadata"), network=network,
        Config=network.NetworkConfig, Network=network.LoraNetwork,
    )


def comfy_weights(patcher, keys) -> dict:
    """The weights ComfyUI computes from `patcher`'s patches for `keys` (what patch_model writes)."""
    import comfy.lora
    import torch

    entries = patcher.get_key_patches()
    out = {}
    with torch.no_grad():
        for key in keys:
            (weight, convert), *patches = entries[key]
            out[key] = comfy.lora.calculate_weight(patches, convert(weight.float().clone(), inplace=True), key)
    return out


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Every torch.utils.checkpoint.checkpoint call while the test runs: proof that checkpointing engaged."""
    import torch.utils.checkpoint as cp

    calls = []
    real = cp.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cp, "checkpoint", counting)
    return calls



def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, with the browser tests of each frontend a scope of their own (each brings its own server and
    browser): the two frontends' runs, minutes each, go to both workers instead of one."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFrontend(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            frontend = re.search(r"\[(\d+\.\d+\.\d+)", nodeid)
            return f"{scope}[{frontend.group(1)}]" if scope.endswith("test_browser.py") and frontend else scope

    return ByFrontend(config, log)
