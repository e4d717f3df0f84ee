"""Module wiring: no import cycles between the stages' modules (lazy imports inside functions
count too: they hide a cycle, they do not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "histoflow"


def imported_modules(module: str) -> set[str]:
    """The histoflow modules ``histoflow.<module>`` imports anywhere in its code."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    package = module.rsplit(".", 1)[0] if "." in module else ""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
            target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            out.add(target)
            out.update(f"{target}.{a.name}" if target else a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("histoflow."):
            out.add(node.module[len("histoflow."):])
        elif isinstance(node, ast.Import):
            out.update(a.name[len("histoflow."):] for a in node.names if a.name.startswith("histoflow."))
    return out


@pytest.mark.parametrize("a,b", [("encoders", "ssl"), ("features", "stain")])
def test_these_modules_do_not_import_each_other_both_ways(a, b):
    assert not (b in imported_modules(a) and a in imported_modules(b)), f"{a} and {b} import each other"
