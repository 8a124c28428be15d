"""The package's layout: no import circle (function-level imports included), small modules, and
``import distillkit`` putting the zoo into timm's registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distillkit"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from distillkit import registry" imports the submodule registry, not only the package
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, set(modules)) for name, path in modules.items()}
    for name, targets in graph.items():
        # "from distillkit.zoo import classic" names both the package and the submodule: keep the submodule
        targets.discard(name)
        for target in list(targets):
            if any(t.startswith(target + ".") for t in targets) and target != "distillkit":
                targets.discard(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_has_no_circle():
    graph = _import_graph()
    assert "distillkit.evaluate" in graph and "distillkit.registry" in graph["distillkit.evaluate"]  # it reads imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_function_level_circle(tmp_path):
    # the check must see imports inside functions: the old zoo -> registry -> builtins -> zoo circle was one
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from distillkit import registry\n")
    assert _imports(module, {"distillkit", "distillkit.registry"}) == {"distillkit", "distillkit.registry"}


def test_no_module_is_larger_than_one_concept():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_importing_distillkit_registers_the_zoo_in_timm():
    code = ("import distillkit, timm; m = timm.create_model('convnet3', num_classes=10, in_chans=1, img_size=28); "
            "import torch; print(tuple(m(torch.zeros(2, 1, 28, 28)).shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10)"
