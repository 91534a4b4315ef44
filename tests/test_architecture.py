"""docs/architecture.md against the code: the module table, no import circle, no arrow up.

Imports are read with ``ast`` from every module under src/hotmodel, wherever
they stand: at the top, inside a function, and inside ``if TYPE_CHECKING:``
blocks too. A type-only import still ties two modules together (a reader, and
mypy, must read both to read either), so it counts for circles and layers alike.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "hotmodel"
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    """Every module, by dotted name (a package by its own name)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> Iterator[str]:
    """The hotmodel modules one import statement in ``module`` reaches."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert not node.level, f"{module}: a relative import (this test reads absolute ones)"
        base = node.module or ""
        names = [f"{base}.{alias.name}" for alias in node.names]
        names = [name if name in MODULES else base for name in names]
    for name in names:
        while name and name not in MODULES:  # import a.b.c: the module a.b.c, else a.b
            name = name.rpartition(".")[0]
        if name.startswith("hotmodel") and name != module:
            yield name


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for target in _imported(node, module)
        }
    return graph


# --- (a) the module table ---


def _layout_rows() -> list[str]:
    """The first cells of the module table ("## Layout")."""
    text = DOC.read_text(encoding="utf-8")
    layout = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1] for line in layout.splitlines() if line.startswith("| `")]


def test_every_module_is_in_the_docs_module_table_and_every_row_exists() -> None:
    listed = {name for cell in _layout_rows() for name in re.findall(r"`([\w/]+\.py)`", cell)}
    files = {str(path.relative_to(SRC)) for path in MODULES.values() if path.name != "__init__.py"}
    missing, stale = sorted(files - listed), sorted(listed - files)
    assert not missing, f"modules missing from docs/architecture.md's table: {missing}"
    assert not stale, f"rows of docs/architecture.md's table that name no module: {stale}"


# --- (b) no import circle ---


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules, the first repeated at the end)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            found = visit(target)
            if found is not None:
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module)
        if found is not None:
            return found
    return None


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_between_hotmodel_modules() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, f"an import circle: {' → '.join(cycle or ())}"


# --- (c) the layers, and no arrow up ---


def _layers() -> list[list[str]]:
    """The layers the doc states, outermost first: its one ``layers:`` line."""
    (line,) = [
        line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("layers:")
    ]
    return [
        [name.strip().rstrip("/") for name in layer.split(",")]
        for layer in line.removeprefix("layers:").split("→")
    ]


def _layer_of(module: str, layers: list[list[str]]) -> int:
    """The index of ``module``'s layer (0: the outermost); the package itself
    (``hotmodel/__init__.py``: its version) sits at the bottom."""
    if module == "hotmodel":
        return len(layers) - 1
    top = module.split(".")[1]
    (index,) = [i for i, names in enumerate(layers) if top in names]
    return index


def test_every_module_is_in_one_layer() -> None:
    layers = _layers()
    names = [name for layer in layers for name in layer]
    assert len(names) == len(set(names)), "a name in two layers"
    tops = {module.split(".")[1] for module in MODULES if module != "hotmodel"}
    unplaced, unknown = sorted(tops - set(names)), sorted(set(names) - tops)
    assert not unplaced, f"in no layer of docs/architecture.md: {unplaced}"
    assert not unknown, f"a layer names what does not exist: {unknown}"


def test_no_import_goes_up_a_layer() -> None:
    layers = _layers()
    up = sorted(
        f"{module} → {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer_of(target, layers) < _layer_of(module, layers)
    )
    assert not up, f"imports up a layer of docs/architecture.md: {up}"
