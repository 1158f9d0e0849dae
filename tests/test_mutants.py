"""Every guard fails with its mechanism broken: each mutant of tests/mutants.py, applied to a copy of the repository,
makes the test it names fail (README: Development, "A new mechanism lands with its mutant")."""

from __future__ import annotations

import ast
import queue
from concurrent.futures import ThreadPoolExecutor

import pytest
from mutants import MUTANTS, REPO_ROOT, ForkedPytest, copy_repository, imported_from, mutated, run

pytestmark = pytest.mark.mutants


def test_each_mutant_breaks_one_line_that_is_there():
    """Names are unique; each line is in its file exactly once (else StaleMutant) and its replacement compiles;
    each test's file exists (a wrong node id is caught when it runs)."""
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    for mutant in MUTANTS:
        original, broken = mutated(mutant)
        assert broken != original and mutant.line.strip() != mutant.replacement.strip(), mutant.name
        if mutant.file.endswith(".py"):  # web/js mutants are checked by the browser tests they break
            ast.parse(broken, mutant.file)
        assert (REPO_ROOT / mutant.test.split("::")[0]).is_file(), mutant.name


# One copy of the repository each, every mutant's test on one thread: the machines this runs on have two cores. Under
# xdist the other worker shares them; two single-thread processes beside it only take turns (no spin-waiting), and the
# longest module of the suite is done sooner.
WORKERS = 2


def test_every_guarding_test_kills_its_mutant(tmp_path_factory):
    """Each mutant applied to a copy of the repository (its tests import the copy, not us) makes its test fail. Two
    copies take turns, so two mutants run at once, each test in one thread."""
    copies: queue.Queue = queue.Queue()
    for index in range(WORKERS):
        copy = copy_repository(tmp_path_factory.mktemp(f"mutants{index}") / "lora_foundry")
        assert imported_from(copy) == copy
        copies.put((copy, ForkedPytest(copy, threads=1)))

    def run_on_a_free_copy(mutant):
        copy, runner = copies.get()
        try:
            return run(mutant, copy, runner)
        finally:
            copies.put((copy, runner))

    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            outcomes = list(pool.map(run_on_a_free_copy, MUTANTS))
    finally:
        while not copies.empty():
            copies.get()[1].close()
    survivors = [o for o in outcomes if not o.killed]
    assert not survivors, "\n".join(
        f"{o.mutant.name} survived: {o.mutant.test} passes with {o.mutant.file} changed from {o.mutant.line!r} to "
        f"{o.mutant.replacement!r}\n{o.output[-1500:]}" for o in survivors)
