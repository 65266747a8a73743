#!/usr/bin/env python3
"""Issue 17's figures: one home per library, no import circles.

    python3 check_homes.py [/path/to/tree]      (default: the current folder)

For each third-party family (peewee/playhouse/sqlite3, paho, apscheduler, huey, systemd)
it prints the flowd modules that import it, at module level ('top') or inside a function
('fn'), and whether they all sit in one module or one sub-package. Then the import
circles among flowd modules: with module-level imports only (what Python runs at import
time; an import of ``flowd.a.b`` also runs ``flowd/a/__init__.py``, except from inside
``flowd.a``, whose ``__init__`` is then already running), and the circles that
only the imports inside functions close ("hidden"). Imports under ``if TYPE_CHECKING:``
are left out of both (they never run). Then the modules over 600 lines. Exit status 1
when a family has more than one home, a circle of either kind exists or a module is too
long, else 0 (``tests/test_layout.py`` runs it).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

FAMILIES = {
    "peewee/playhouse/sqlite3": ("peewee", "playhouse", "sqlite3"),
    "paho": ("paho",),
    "apscheduler": ("apscheduler",),
    "huey": ("huey",),
    "systemd": ("systemd",),
}
MAX_LINES = 600
DYNAMIC = {"import_module", "__import__", "find_spec", "defer_import", "import_for"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class Imports(ast.NodeVisitor):
    """(imported name, 'top' | 'fn') for every import of a module, TYPE_CHECKING blocks left out."""

    def __init__(self, this: str, is_package: bool) -> None:
        self.this, self.is_package = this, is_package
        self.found: list[tuple[str, str, int]] = []
        self.depth = 0

    def _where(self) -> str:
        return "fn" if self.depth else "top"

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, self._where(), node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.this.split(".")
            base = base[: len(base) - node.level + (1 if self.is_package else 0)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        self.found.append((module, self._where(), node.lineno))
        for alias in node.names:  # 'from pkg import sub' may import the sub-module
            self.found.append((f"{module}.{alias.name}", self._where() + "?", node.lineno))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in DYNAMIC and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.found.append((node.args[0].value, self._where() + " by name", node.lineno))
        self.generic_visit(node)


def scan(root: Path) -> tuple[dict[str, list[tuple[str, str, int]]], set[str]]:
    modules: dict[str, list[tuple[str, str, int]]] = {}
    for path in sorted((root / "flowd").rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        name = module_name(root, path)
        visitor = Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        modules[name] = visitor.found
    return modules, set(modules)


def flowd_targets(name: str, known: set[str]) -> list[str]:
    """The flowd modules an import of ``name`` runs: the module and every parent package."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known]


def graph(modules: dict[str, list[tuple[str, str, int]]], known: set[str], with_fn: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for this, found in modules.items():
        parts = this.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}  # already running when this runs
        for name, where, _ in found:
            if name.split(".")[0] != "flowd" or where.endswith("by name"):
                continue
            if where.startswith("fn") and not with_fn:
                continue
            if where.endswith("?") and name not in known:
                continue  # 'from flowd.x import attr': attr is not a module
            edges[this].update(t for t in flowd_targets(name, known) if t != this and t not in ancestors)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return sorted(out)


def a_cycle(edges: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first)."""
    members, start = set(comp), comp[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                return paths[v] + [start]
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return comp


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    modules, known = scan(root)
    lines = {module_name(root, path): len(path.read_text().splitlines())
             for path in sorted((root / "flowd").rglob("*.py")) if "__pycache__" not in path.parts}
    bad = False
    print(f"flowd modules: {len(known)} in {root / 'flowd'}")
    print("\nLibrary homes ('top': module level, 'fn': inside a function, 'by name': importlib/defer_import):")
    for family, roots in FAMILIES.items():
        users: dict[str, list[str]] = defaultdict(list)
        for this, found in modules.items():
            for name, where, line in found:
                if name.split(".")[0] in roots and not where.endswith("?"):
                    users[this].append(f"{name} ({where.rstrip('?')}, line {line})")
        homes = sorted(users)
        packages = {m.rsplit(".", 1)[0] if m.count(".") >= 2 else m for m in homes}
        one = len(homes) <= 1 or (len(packages) == 1 and all(m.count(".") >= 2 for m in homes))
        verdict = ("one home: " + (homes[0] if len(homes) == 1 else next(iter(packages)) + "/")) if homes and one \
            else "not imported" if not homes else f"{len(homes)} modules in {len(packages)} places"
        bad |= bool(homes) and not one
        print(f"  {family}: {verdict}")
        for m in homes:
            print(f"    {m}: {', '.join(sorted(set(users[m])))}")
    top = graph(modules, known, with_fn=False)
    full = graph(modules, known, with_fn=True)
    top_circles = circles(top)
    print("\nImport circles, module-level imports:", "none" if not top_circles else len(top_circles))
    for comp in top_circles:
        print(f"  {' -> '.join(a_cycle(top, comp))}   (component: {', '.join(comp)})")
    bad |= bool(top_circles)
    hidden = [c for c in circles(full) if c not in top_circles]
    print("Import circles hidden by imports inside functions:", "none" if not hidden else len(hidden))
    for comp in hidden:
        print(f"  {' -> '.join(a_cycle(full, comp))}   (component of {len(comp)}: {', '.join(comp)})")
    bad |= bool(hidden)
    long = {m: n for m, n in lines.items() if n > MAX_LINES}
    print(f"Modules over {MAX_LINES} lines:", "none" if not long else ", ".join(f"{m} ({n})" for m, n in long.items()))
    bad |= bool(long)
    fn_count = sum(1 for found in modules.values() for name, where, _ in found
                   if where == "fn" and name.split(".")[0] == "flowd")
    print(f"\nImports of flowd modules inside functions: {fn_count}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
