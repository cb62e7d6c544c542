"""The floors of the layout (README "Layout"): datamodules < components < lit_modules < envs < vla_zoo, nothing
imports upward, and components/ stays pure torch.nn (no Lightning, no config parsing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FLOORS = ["datamodules", "components", "lit_modules", "envs", "vla_zoo"]
#: Beyond the floors above it: what a package must not import.
EXTRA = {"components": ["lightning", "jsonargparse", "yaml"]}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", FLOORS)
def test_no_package_imports_a_floor_above_it(package: str) -> None:
    forbidden = FLOORS[FLOORS.index(package) + 1:] + EXTRA.get(package, [])
    found = []
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert not found, found
