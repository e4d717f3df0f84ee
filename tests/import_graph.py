"""What a rule's script may import, found statically, function by function.

Module-level imports of histoflow are light on purpose (stage modules import torch, OpenSlide
and friends inside the functions that need them), so "every import of every module reachable"
would say every script needs everything. Instead this follows what a script can execute: its
own imports, the module-level imports of each histoflow module loaded, and for each histoflow
function or class it uses, the imports inside it and the histoflow functions it names (same
module, imported by name, or ``module.attr``). A name is followed even on a branch that rarely
runs, so the result is an upper bound of what the rule's job imports. Imports guarded by
``try: ... except ImportError`` are optional (their absence is handled) and reported apart.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "histoflow"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


@dataclass
class Needs:
    required: set[str] = field(default_factory=set)     # third-party top-level module names
    optional: set[str] = field(default_factory=set)


def _module_file(name: str) -> Path | None:
    base = REPO / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_import_error_guard(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = [handler.type] if not isinstance(handler.type, ast.Tuple) else list(handler.type.elts)
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception") for n in names):
            return True
    return False


class Module:
    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.is_package = path.name == "__init__.py"
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.defs: dict[str, ast.AST] = {}
        self.bindings: dict[str, str] = {}        # name -> "pkg.mod" or "pkg.mod:attr" or a third-party module
        self.top_imports: list[tuple[str, bool]] = []   # (target, optional)
        self.top_calls: set[str] = set()
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
        self._scan_top(self.tree.body, optional=False)

    def resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.name.split(".")
        base = parts if self.is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def import_targets(self, node: ast.Import | ast.ImportFrom) -> list[tuple[str | None, str]]:
        """(bound name, target) of an import statement."""
        if isinstance(node, ast.Import):
            return [(a.asname or a.name.split(".")[0], a.name if a.asname else a.name) for a in node.names]
        module = self.resolve(node)
        out = []
        for a in node.names:
            if a.name == "*":
                out.append((None, module))
            elif _module_file(f"{module}.{a.name}"):
                out.append((a.asname or a.name, f"{module}.{a.name}"))
            else:
                out.append((a.asname or a.name, f"{module}:{a.name}"))
        return out

    def _scan_top(self, body: list[ast.stmt], optional: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name, target in self.import_targets(node):
                    if name:
                        self.bindings[name] = target
                    self.top_imports.append((target, optional))
            elif isinstance(node, ast.Try):
                guard = optional or _is_import_error_guard(node)
                self._scan_top(node.body, guard)
                for h in node.handlers:
                    self._scan_top(h.body, optional)
                self._scan_top(node.orelse + node.finalbody, optional)
            elif isinstance(node, ast.If):
                if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                    continue
                self._scan_top(node.body + node.orelse, optional)
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                # calls made while the module is imported (a name merely referenced is not run)
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name):
                        self.top_calls.add(sub.func.id)


@cache
def load(name: str) -> Module | None:
    path = _module_file(name)
    return Module(name, path) if path else None


class Walker:
    def __init__(self):
        self.needs = Needs()
        self.seen: set[str] = set()
        self.attrs: set[str] = set()           # attribute names accessed by walked code
        self.pending: dict[str, list[tuple[Module, ast.AST]]] = {}   # methods not yet reached

    def third_party(self, target: str, optional: bool) -> None:
        top = target.split(":")[0].split(".")[0]
        if top in STDLIB or top in (PACKAGE, "snakemake"):
            return
        (self.needs.optional if optional else self.needs.required).add(top)

    def target(self, target: str, optional: bool = False) -> None:
        module, _, attr = target.partition(":")
        if module.split(".")[0] != PACKAGE:
            self.third_party(module, optional)
            return
        if optional:        # a guarded histoflow import: its own needs are still followed
            pass
        self.module(module)
        if attr:
            self.attr(module, attr)

    def module(self, name: str) -> None:
        if f"module {name}" in self.seen:
            return
        self.seen.add(f"module {name}")
        parts = name.split(".")
        for i in range(1, len(parts)):
            self.module(".".join(parts[:i]))
        mod = load(name)
        if mod is None:
            return
        for target, optional in mod.top_imports:
            module, _, attr = target.partition(":")
            if module.split(".")[0] == PACKAGE and attr and not _module_file(f"{module}.{attr}"):
                # `from .x import name` at module level runs module x, not `name`: the name is
                # followed where walked code uses it (Walker.name via the module's bindings)
                self.module(module)
                continue
            self.target(target, optional)
        for call in mod.top_calls:
            if call in mod.defs:
                self.function(mod, call)

    def attr(self, module: str, attr: str) -> None:
        mod = load(module)
        if mod is None:
            return
        if attr in mod.defs:
            self.function(mod, attr)
        elif attr in mod.bindings:
            self.target(mod.bindings[attr])
        elif _module_file(f"{module}.{attr}"):
            self.module(f"{module}.{attr}")

    def function(self, mod: Module, name: str) -> None:
        key = f"def {mod.name}.{name}"
        if key in self.seen:
            return
        self.seen.add(key)
        node = mod.defs[name]
        if isinstance(node, ast.ClassDef):
            self.klass(mod, node)
        else:
            self.body(mod, node)

    def klass(self, mod: Module, node: ast.ClassDef) -> None:
        """A class: its bases, class-level statements and special methods now; any other method
        once some walked code accesses an attribute of that name (``target.bag_loss``)."""
        for base in node.bases:
            self.body(mod, base)
        for stmt in node.body:
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.body(mod, stmt)
            elif stmt.name.startswith("__") or stmt.name in self.attrs:
                self.body(mod, stmt)
            else:
                self.pending.setdefault(stmt.name, []).append((mod, stmt))

    def body(self, mod: Module, node: ast.AST, optional: bool = False) -> None:
        local: dict[str, str] = {}
        guarded: set[int] = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Try) and _is_import_error_guard(sub):
                for stmt in sub.body:
                    guarded |= {id(n) for n in ast.walk(stmt)}
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                for bound, target in mod.import_targets(sub):
                    if bound:
                        local[bound] = target
                    self.target(target, optional or id(sub) in guarded)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                self.name(mod, sub.id, local)
            elif isinstance(sub, ast.Attribute):
                self.attrs.add(sub.attr)
                for method_mod, method in self.pending.pop(sub.attr, []):
                    self.body(method_mod, method)
                if isinstance(sub.value, ast.Name):
                    target = local.get(sub.value.id) or mod.bindings.get(sub.value.id)
                    if target and ":" not in target and target.split(".")[0] == PACKAGE:
                        self.attr(target, sub.attr)

    def name(self, mod: Module, name: str, local: dict[str, str]) -> None:
        if name in local:
            target = local[name]
        elif name in mod.defs:
            self.function(mod, name)
            return
        elif name in mod.bindings:
            target = mod.bindings[name]
        else:
            return
        module, _, attr = target.partition(":")
        if module.split(".")[0] == PACKAGE and attr:
            self.attr(module, attr)


def script_needs(script: Path, extra_entries: list[str] = ()) -> Needs:
    """Third-party modules a rule script may import (``extra_entries``: ``module:function``
    entry points it reaches by name, e.g. a slide step dispatched by rule name)."""
    walker = Walker()
    tree = ast.parse(script.read_text(), filename=str(script))
    fake = Module.__new__(Module)
    fake.name, fake.path, fake.is_package, fake.tree = "__script__", script, False, tree
    fake.defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    fake.bindings, fake.top_imports, fake.top_calls = {}, [], set()
    fake._scan_top(tree.body, optional=False)
    for target, optional in fake.top_imports:
        walker.target(target, optional)
    walker.body(fake, tree)
    for entry in extra_entries:
        walker.target(entry)
    return walker.needs
