"""The package's layers: every import inside src/prunekit points down (architecture.md).

Module-level and function-level imports are both read from the source, so a lazy import cannot
hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prunekit"

# Lowest first. A module may import its own layer or any layer below it; no exceptions.
#   core      the model view protocol, plan, masks, surgery, accounting: knows no family, takes an adapter
#   families  one adapter per model family and their registry (the only Hugging Face module names)
#   io        saved folders: save/load (reads the families' registry), remote-code files, reports
#   tasks     data, evaluation and loss of each task family
#   methods   one module per pruning method; each returns a plan
#   deploy    latency benchmarks, ONNX export, ONNX Runtime evaluation
#   pipeline  prunekit.api: load -> data -> method -> plan -> surgery -> report -> save
#   entry     the command line, compare, demo and the package's own namespace
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("prunekit.core",)),
    ("families", ("prunekit.families",)),
    ("io", ("prunekit.io",)),
    ("tasks", ("prunekit.tasks",)),
    ("methods", ("prunekit.methods",)),
    ("deploy", ("prunekit.deploy",)),
    ("pipeline", ("prunekit.api",)),
    ("entry", ("prunekit.compare", "prunekit.demo", "prunekit.cli", "prunekit.__main__", "prunekit._compat",
               "prunekit")),
]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} belongs to no layer; add it to LAYERS"
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "prunekit" or name.startswith("prunekit.")}


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "remote_code" not in p.parts)


def _existing(name: str) -> bool:
    """A name imported from a module may be a class or function, not a module: keep modules."""
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    here = module_name(path)
    upward = [name for name in imports_of(path) if _existing(name) and layer_of(name) > layer_of(here)]
    assert not upward, f"{here} ({LAYERS[layer_of(here)][0]}) imports upward: {sorted(upward)}"


def test_top_level_is_entry_points_only() -> None:
    """What stands at the top of the package is the layer map, not a pile of helpers."""
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith("__pycache__"))
    assert top == sorted([
        "__init__.py", "__main__.py", "_compat.py", "api.py", "cli.py", "compare.py", "demo.py",
        "core", "deploy", "families", "io", "methods", "tasks",
    ])


def test_remote_code_never_imports_prunekit() -> None:
    for path in (PACKAGE / "families" / "remote_code").glob("*.py"):
        assert not imports_of(path), f"{path.name} imports prunekit; it must load without it"


def test_old_import_paths_still_work() -> None:
    import importlib
    import warnings

    from prunekit._compat import MOVED

    for old, new in MOVED.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(old)
        target = importlib.import_module(new)
        assert module is target or all(getattr(module, name) is getattr(target, name)
                                       for name in getattr(target, "__all__", ())), old


def _module_graph() -> dict[str, set[str]]:
    """Each module's prunekit imports that name modules (not classes or functions inside them)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "remote_code" in path.parts:
            continue
        names = {name for name in imports_of(path) if _existing(name)}
        # `from prunekit.x import y`: the edge goes to y when y is a module, else to prunekit.x.
        graph[module_name(path)] = {name for name in names
                                    if not any(other.startswith(name + ".") for other in names)} - {"prunekit"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    """No two modules import each other, directly or through others (lazy imports included)."""
    assert _cycles(_module_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tests_mirror_the_source_layout() -> None:
    """A folder of tests per package of src/prunekit; at the top only the entry points' tests."""
    tests = Path(__file__).resolve().parent
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("fixtures", "__pycache__"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == packages
    top_modules = {p.stem for p in PACKAGE.glob("*.py")} | {"layout"}
    # test_<module>.py, or test_<module>_<part>.py for a module with several test files (cli)
    strays = [p.name for p in tests.glob("test_*.py")
              if not any(p.stem == f"test_{m}" or p.stem.startswith(f"test_{m}_") for m in top_modules)]
    assert not strays, f"tests of no top-level module at the top: {strays}"
