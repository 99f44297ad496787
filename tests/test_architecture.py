"""The package's structure: imports point one way, down the layers that trainer/__init__.py lists.

Read from the source (every import, those under TYPE_CHECKING too, since a type-only import is how
the last import circle closed), so a new module is checked without being listed here.
"""

from __future__ import annotations

import ast
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


def trainer_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from trainer.x import y`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("trainer"))
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
            between_tools = layer_of(module) == layer_of(target) == TOOLS  # e.g. evaluate -> checkpoint_args
            if target != "trainer" and not (same_part or between_tools) and layer_of(target) >= layer_of(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point sideways or up: " + ", ".join(sorted(upward))


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with both faults trips them."""
    fake = tmp_path / "trainer"
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "a.py").write_text("from trainer.core.b import x\nfrom trainer.loop import run\n")
    (fake / "core" / "b.py").write_text("from trainer.core import a\nx = 1\n")
    (fake / "loop.py").write_text("run = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    try:
        test_no_import_cycle()
    except AssertionError as exc:
        assert "trainer.core.a" in str(exc) and "trainer.core.b" in str(exc)
    else:
        raise AssertionError("the cycle a -> b -> a was not found")
    try:
        test_imports_point_down_the_layers()
    except AssertionError as exc:
        assert "trainer.core.a -> trainer.loop" in str(exc)
    else:
        raise AssertionError("core importing the loop was not found")


def test_config_and_errors_import_without_torch():
    """Config errors, `--help` and job.sh's run-directory lookup stay instant: no torch behind them."""
    code = "import sys, trainer.core.config, trainer.util.errors; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, timeout=60).returncode == 0


def test_training_imports_without_torch_fidelity_or_wandb():
    """They load on first use (an evaluation, a W&B run): a machine without them still trains."""
    code = "import sys, trainer.loop, trainer.prepare; sys.exit(bool({'torch_fidelity', 'wandb'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, timeout=120).returncode == 0
