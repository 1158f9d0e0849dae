"""Every guard fails with its mechanism broken: each mutant of tests/mutants.py, applied to a copy of the repository,
makes the test it names fail (README: Development, "A new mechanism lands with its mutant")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from mutants import MUTANTS, REPO_ROOT, copy_repository, imported_from, mutated, run

pytestmark = pytest.mark.mutants


def test_each_mutant_breaks_one_line_that_is_there():
    """Names are unique; each line is in its file exactly once (else StaleMutant) and its replacement compiles;
    each test's file exists (a wrong node id is caught when it runs)."""
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    for mutant in MUTANTS:
        original, broken = mutated(mutant)
        assert broken != original and mutant.line.strip() != mutant.replacement.strip(), mutant.name
        ast.parse(broken, mutant.file)
        assert (REPO_ROOT / mutant.test.split("::")[0]).is_file(), mutant.name


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """One copy of the repository for all mutants (each is undone after its run); its tests import it, not us."""
    copy = copy_repository(tmp_path_factory.mktemp("mutants") / "lora_foundry")
    assert imported_from(copy) == copy
    return copy


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_the_guarding_test_kills_the_mutant(mutant, copy):
    outcome = run(mutant, copy)
    assert outcome.killed, (f"{mutant.name} survived: {mutant.test} passes with {mutant.file} changed from "
                            f"{mutant.line!r} to {mutant.replacement!r}\n{outcome.output[-2000:]}")
