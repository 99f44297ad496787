"""The package's structure: imports point one way, down the layers that trainer/__init__.py lists.

Read from the source (every import, those under TYPE_CHECKING too, since a type-only import is how
the last import circle closed), so a new module is checked without being listed here. Imports by
name count too: a string that names a module of the package (`importlib.import_module("trainer.x")`,
a registry of extractors `{"name": "trainer.quality.x"}`, a `"trainer.x:Class"` spec) is an import
of that module, since it is how the circle fid -> classifier -> fid once hid from the check.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import trainer

PACKAGE = Path(trainer.__file__).parent
# Layer of each part of the package: a module may import from lower layers and from its own subpackage.
LAYERS = {"util": 0, "core": 1, "monitor": 2, "quality": 2, "prepare": 3, "loop": 4}
TOOLS = 5  # entry points and their helpers (train, prepare, evaluate, sample, bench, ...): may use each other


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def layer_of(module: str) -> int:
    return LAYERS.get(part_of(module), TOOLS)


# A module named in a string: "trainer.quality.classifier", or "trainer.x:Class" as extractor specs are written.
MODULE_STRING = re.compile(r"^(?P<module>trainer(\.\w+)*)(:\w+)?$")


def _run_targets(tree: ast.AST) -> set[int]:
    """The strings after a "-m" in a command list: a module run in another process, not imported."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            for flag, arg in zip(node.elts, node.elts[1:], strict=False):
                if isinstance(flag, ast.Constant) and flag.value == "-m":
                    targets.update(id(n) for n in ast.walk(arg))
    return targets


def trainer_imports(path: Path) -> set[str]:
    found = set()
    tree = ast.parse(path.read_text())
    run_targets = _run_targets(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from trainer.x import y`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("trainer"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in run_targets:
            named = MODULE_STRING.match(node.value)  # imported by name, later
            if named:
                found.add(named["module"])
    return found


def module_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in trainer_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle():
    graph = module_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target] if target in trail else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in module_graph().items():
        if module == "trainer":
            continue  # the package's __init__ installs the torchvision shim from util
        for target in targets:
            same_part = part_of(module) == part_of(target) and part_of(module) in LAYERS
            between_tools = layer_of(module) == layer_of(target) == TOOLS  # entry points may use each other
            if target != "trainer" and not (same_part or between_tools) and layer_of(target) >= layer_of(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point sideways or up: " + ", ".join(sorted(upward))


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    fake = root / "trainer"
    for name, text in {"__init__.py": "", "core/__init__.py": "", "quality/__init__.py": "", **files}.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    return fake


def _fails(check, *needles: str) -> None:
    try:
        check()
    except AssertionError as exc:
        assert all(n in str(exc) for n in needles), str(exc)
    else:
        raise AssertionError(f"{check.__name__} passed; it should have found {needles}")


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with both faults trips them."""
    fake = _fake_package(
        tmp_path,
        {
            "core/a.py": "from trainer.core.b import x\nfrom trainer.loop import run\n",
            "core/b.py": "from trainer.core import a\nx = 1\n",
            "loop.py": "run = 1\n",
        },
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    _fails(test_no_import_cycle, "trainer.core.a", "trainer.core.b")
    _fails(test_imports_point_down_the_layers, "trainer.core.a -> trainer.loop")


def test_the_check_sees_a_cycle_through_imports_by_name(tmp_path, monkeypatch):
    """The circle that once hid: a registry string one way, a plain import back (and an import_module
    call, and a `module:Class` spec, each closing a circle of its own)."""
    fake = _fake_package(
        tmp_path,
        {
            "quality/fid.py": 'import importlib\nEXTRACTORS = {"ours": "trainer.quality.classifier"}\n',
            "quality/classifier.py": '"""Uses trainer.quality.fid (a docstring is no import)."""\nfrom trainer.quality import fid\n',
        },
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert module_graph()["trainer.quality.fid"] == {"trainer.quality.classifier"}
    _fails(test_no_import_cycle, "import cycle: trainer.quality.classifier -> trainer.quality.fid")

    (fake / "quality" / "fid.py").write_text("EXTRACTORS = {}\n")  # the registry gone: no circle
    test_no_import_cycle()
    (fake / "quality" / "fid.py").write_text(
        'import importlib\nimportlib.import_module("trainer.quality.classifier")\n'
    )
    _fails(test_no_import_cycle, "trainer.quality.fid", "trainer.quality.classifier")
    (fake / "quality" / "fid.py").write_text('DEFAULT = "trainer.quality.classifier:Extractor"\n')
    _fails(test_no_import_cycle, "trainer.quality.fid", "trainer.quality.classifier")
    # running a module in another process imports nothing here
    (fake / "quality" / "fid.py").write_text(
        'import sys\nCOMMAND = [sys.executable, "-m", "trainer.quality.classifier"]\n'
    )
    test_no_import_cycle()
    (fake / "quality" / "fid.py").write_text('SPEC = "tests.standin_extractor:StandInExtractor"\n')
    _fails(test_the_package_imports_nothing_that_only_a_checkout_has, "trainer.quality.fid: tests.standin_extractor")


def test_the_package_imports_nothing_that_only_a_checkout_has():
    """tools/ and tests/ are not installed with the package: the trainer must not need them."""
    checkout_only = re.compile(r"^(tools|tests)(\.\w+)*(:\w+)?$")
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        names += [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        found += [f"{module_name(path)}: {name}" for name in names if checkout_only.match(name)]
    assert not found, found


def test_the_launchers_rank_is_read_in_one_place(monkeypatch):
    """`RANK` / `LOCAL_RANK` (which process this is, before or without a process group) come from
    trainer.util.ranks.launch_rank; a module reading them itself would be a second answer."""
    from trainer.util.ranks import launch_rank

    readers = [
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if any(
            isinstance(n, ast.Constant) and n.value in ("RANK", "LOCAL_RANK")
            for n in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert readers == ["trainer.util.ranks"], readers
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch_rank() == launch_rank(local=True) == 0  # no launcher
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (launch_rank(), launch_rank(local=True), launch_rank(environ={"RANK": "3"})) == (5, 1, 3)


def test_config_and_errors_import_without_torch():
    """Config errors, `--help` and job.sh's run-directory lookup stay instant: no torch behind them."""
    code = "import sys, trainer.core.config, trainer.util.errors, trainer.util.ranks; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, timeout=60).returncode == 0


def test_training_imports_without_torch_fidelity_or_wandb():
    """They load on first use (an evaluation, a W&B run): a machine without them still trains."""
    code = "import sys, trainer.loop, trainer.prepare; sys.exit(bool({'torch_fidelity', 'wandb'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, timeout=120).returncode == 0
