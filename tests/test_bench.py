"""Every benchmark script runs to its end: each is run with `--smoke` (its smallest run through every part, on the
CPU), so none breaks unseen between the sessions that measure with it."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from harness.comfy import REPO_ROOT

BENCH = REPO_ROOT / "bench"
# Script: what its last table prints when the run got to the end.
SMOKE_RUNS = {
    "bench_engine.py": "adapter cost (s)",
    "bench_extract.py": "concat, ranks 8+4",
    "bench_svd_shapes.py": "SDXL d2",
    "bench_toyworld.py": "written: ",
    "bench_train.py": "ratios ours/native",
}
SMOKE_RUN_ELSEWHERE = {"gpu_check.py", "bench_dispatch.py"}  # tests/test_gpu_check.py runs and reads them


def _is_script(path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def test_every_bench_script_has_a_smoke_run():
    scripts = {path.name for path in BENCH.glob("*.py") if _is_script(path)}
    assert scripts == set(SMOKE_RUNS) | SMOKE_RUN_ELSEWHERE, "a new bench script needs --smoke and a row here"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_bench_script_runs_to_its_table(script, tmp_path):
    extra = ["--base-dir", str(tmp_path / "comfy"), "--out", str(tmp_path / "out")] if script == "bench_toyworld.py" \
        else []
    # bench_toyworld pretrains the toy base when none is cached (under xdist the controller has made it already).
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *extra], capture_output=True, text=True,
                          timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert SMOKE_RUNS[script] in done.stdout, done.stdout[-3000:]


def test_toyworld_bench_gives_each_setting_to_the_node_that_has_it(pack):
    """Load Dataset has a `seed` too (its validation split's): a variant's seed must reach Train LoRA, or every
    training seed of a sweep trains seed 0 on another split (stop 53's sweeps did); a setting neither node has is
    refused, where the server would drop it silently. Every recorded variant sets only real inputs."""
    import importlib.util

    from lora_foundry.nodes import dataset, train

    spec = importlib.util.spec_from_file_location("bench_toyworld", BENCH / "bench_toyworld.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    train_inputs = set(train.REQUIRED_WIDGETS + train.OPTIONAL_WIDGETS)
    dataset_inputs = set(dataset.REQUIRED_WIDGETS + dataset.OPTIONAL_WIDGETS)
    ours, theirs = bench.route({"seed": 3, "learning_rate": 4e-3, "prior_loss_weight": 2.0}, train_inputs,
                               dataset_inputs)
    assert ours == {"seed": 3, "learning_rate": 4e-3} and theirs == {"prior_loss_weight": 2.0}
    with pytest.raises(ValueError, match="min_timestep"):
        bench.route({"min_timestep": 250}, train_inputs, dataset_inputs)
    applied_by_the_bench = {"preserve_world", "concept_repeats"}
    for variant in bench.VARIANTS.values():
        settings = {**bench.SWEEP_BASE, **variant, "preservation_class": "", "reg_folder": ""}
        bench.route({k: v for k, v in settings.items() if k not in applied_by_the_bench}, train_inputs, dataset_inputs)
