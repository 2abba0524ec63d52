"""The package's layers: every import inside src/prunekit points down (architecture.md).

Module-level and function-level imports are both read from the source, so a lazy import cannot
hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prunekit"

# Lowest first. A module may import its own layer or any layer below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("prunekit.core.errors", "prunekit.core.memory", "prunekit.core.runtime", "prunekit.core.view")),
    ("families", ("prunekit.families",)),
    ("core", ("prunekit.core",)),
    ("tasks", ("prunekit.tasks",)),
    ("methods", ("prunekit.methods",)),
    ("tools", ("prunekit.bench", "prunekit.export", "prunekit.reports")),
    ("pipeline", ("prunekit.api", "prunekit.onnxrt")),
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
    if here == "prunekit._compat":
        return  # names every old path as a string, imports by name on request
    upward = [name for name in imports_of(path) if _existing(name) and layer_of(name) > layer_of(here)]
    assert not upward, f"{here} ({LAYERS[layer_of(here)][0]}) imports upward: {sorted(upward)}"


def test_top_level_is_entry_points_only() -> None:
    """What stands at the top of the package is the layer map, not a pile of helpers."""
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith("__pycache__"))
    assert top == sorted([
        "__init__.py", "__main__.py", "_compat.py", "api.py", "bench.py", "cli.py", "compare.py",
        "core", "demo.py", "export.py", "families", "methods", "onnxrt.py", "reports.py", "tasks",
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
