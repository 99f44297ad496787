"""tools/mutation_check.py stays runnable: every mutant's text is found exactly once in its module, and
every test it selects exists (the check itself runs for minutes and is not part of the suite)."""

from __future__ import annotations

import ast
import dataclasses
import re

from tests.conftest import REPO
from tools import mutation_check


def _tests_in(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def problems(mutants, modules, selections) -> list[str]:
    found = [f"stale mutant {m.id}" for m in mutants if (REPO / modules[m.module]).read_text().count(m.old) != 1]
    found += [f"mutant {m.id}: no selection {m.tests!r}" for m in mutants if m.tests not in selections]
    for selection in selections.values():
        for item in selection:
            if not item.startswith("tests/"):
                continue  # a pytest option, e.g. -m "not slow"
            path, _, test = item.partition("::")
            if not (REPO / path).is_file():
                found.append(f"no file {path}")
            elif test and re.sub(r"\[.*\]$", "", test) not in _tests_in(REPO / path):
                found.append(f"no test {item}")
    return found


def test_every_mutant_applies_and_every_selected_test_exists():
    assert not problems(mutation_check.MUTANTS, mutation_check.MODULES, mutation_check.SELECTIONS)


def test_the_check_sees_a_stale_mutant_and_a_moved_test():
    mutant = dataclasses.replace(mutation_check.MUTANTS[0], id="planted", old="no such line")
    selections = {**mutation_check.SELECTIONS, "step": ["tests/test_step.py::test_that_moved", "tests/test_gone.py"]}
    assert problems([mutant], mutation_check.MODULES, selections) == [
        "stale mutant planted",
        "no test tests/test_step.py::test_that_moved",
        "no file tests/test_gone.py",
    ]
