"""The pack's layout as a newcomer reads it: training/ in rooms named for what they are, dependencies one way, no
import circle (function-level and TYPE_CHECKING imports included), and no module past ~400 lines without a reason.

Reads the source with ast: no import of the pack, no host needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_core", "nodes", "training")
ENTRY_POINTS = {"training.run", "training.headless"}  # what nodes and the command line call
ROOMS = ("data", "captioning", "engine", "configs")
# Which rooms each may import from (besides lora_core and itself): data <- engine <- configs <- run / headless;
# captioning reads data only.
MAY_IMPORT = {"data": set(), "captioning": {"data"}, "engine": {"data"}, "configs": {"data", "engine"}}
LONG = 400


def modules() -> dict[str, Path]:
    """{dotted name relative to the pack: file} of every module of the pack's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The pack modules `name` imports anywhere in its file (inside functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".")
            if node.level - 1 > len(parts):
                continue
            target = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_foundry."):
            target = node.module.removeprefix("lora_foundry.")
        else:
            continue
        named = {f"{target}.{alias.name}" for alias in node.names} & known.keys()  # `from . import memory`
        out.update(named or ({target} & known.keys()))
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    """{module: the pack modules it imports}."""
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read_from_the_source():
    edges = graph()
    assert "training.engine.loop" in edges["training.engine.trainer"]
    assert "training.engine.context" in edges["training.engine.loop"]
    assert "training.data.dataset" in edges["training.engine.preparation"]
    assert "lora_core.network" in edges["training.engine.trainer"]


def test_the_circle_finder_finds_a_circle_hidden_in_a_function():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges = graph()
    edges["training.engine.config"] = edges["training.engine.config"] | {"training.engine.trainer"}
    assert any("training.engine.trainer" in c for c in cycles(edges))


def test_no_module_of_the_pack_imports_itself_back():
    assert cycles(graph()) == []


def test_training_modules_live_in_rooms_and_depend_one_way():
    edges = graph()
    misplaced, backwards = [], []
    for name, targets in edges.items():
        parts = name.split(".")
        if parts[0] != "training" or len(parts) == 1:
            continue
        if len(parts) == 2 and name not in ENTRY_POINTS and parts[1] not in ROOMS:
            misplaced.append(name)
            continue
        room = parts[1] if len(parts) > 2 else None
        for target in targets:
            if target in ENTRY_POINTS and room:
                backwards.append(f"{name} -> {target}")
            elif room and target.startswith("training."):
                other = target.split(".")[1]
                if other != room and other not in MAY_IMPORT[room]:
                    backwards.append(f"{name} -> {target}")
            if target.startswith("nodes"):
                backwards.append(f"{name} -> {target}")
    assert not misplaced, f"training modules outside the rooms {ROOMS}: {misplaced}"
    assert not backwards, "imports against the rooms' direction:\n" + "\n".join(sorted(backwards))


def test_no_training_module_is_long_without_saying_why():
    long = []
    for name, path in modules().items():
        if not name.startswith("training"):
            continue
        lines = path.read_text(encoding="utf-8").count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > LONG and f"Over {LONG} lines because" not in doc:
            long.append(f"{name}: {lines} lines")
    assert not long, f"modules over {LONG} lines whose docstring does not say why: {long}"
