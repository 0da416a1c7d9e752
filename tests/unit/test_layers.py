"""Imports go one way (docs/development.md): cli -> commands -> kernel, views, system,
export, recording -> model -> errors, never back up; only kernel/ imports bcc, only views/
rich, only cli.py click, only export/ prometheus_client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tcptrace"

# Each part of the package, by floor: a part imports nothing from a higher floor. Modules of a
# part not listed (a new one) are not checked until it is placed here.
FLOOR = {
    "cli": 5,
    "commands": 4,
    "kernel": 3,
    "views": 3,
    "system": 3,
    "export": 3,
    "recording": 3,
    "model": 2,
    "errors": 1,
    "printable": 1,
}
# Parts of one floor that stay apart: the kernel layer knows nothing of how results are shown
# (prometheus_client and rich stay out of it).
APART = {("kernel", "export"), ("kernel", "views")}
OWNERS = {"bcc": "kernel", "rich": "views", "click": "cli", "prometheus_client": "export"}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported(path: Path) -> set[str]:
    """Top-level names imported (``tcptrace.x`` as ``tcptrace.x``), TYPE_CHECKING included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "tcptrace":
                names.update(f"tcptrace.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if part_of(p) in FLOOR)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way(path: Path) -> None:
    part = part_of(path)
    for name in imported(path):
        top, _, rest = name.partition(".")
        if top == "tcptrace" and rest and rest != "__version__":
            target = rest.split(".")[0]
            assert FLOOR.get(target, 0) <= FLOOR[part], f"{part} imports {name}, above it"
            assert (part, target) not in APART, f"{part} imports {name}"
        elif top in OWNERS:
            assert OWNERS[top] == part, f"{part} imports {top}"
