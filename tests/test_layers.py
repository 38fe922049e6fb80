"""The pure layers stay pure: domain/ and protocol/ never import trio, lmdb or socket."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "engine"
FORBIDDEN = {"trio", "lmdb", "socket", "asyncio", "engine.runtime", "engine.storage"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


PURE_FILES = sorted((ROOT / "domain").glob("*.py")) + sorted((ROOT / "protocol").glob("*.py"))


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_layer_imports(path: Path) -> None:
    bad = {
        name for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_there_are_pure_files_to_check() -> None:
    assert len(PURE_FILES) >= 6
