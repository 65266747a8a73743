#!/usr/bin/env python3
"""Issue 17, the house: turn the flat ``flowd/`` package into sub-packages.

    python3 move.py /path/to/tree [--allow-dirty] [--no-install] [--dry-run]

Moves each module with ``git mv`` and rewrites every reference to it, by pattern:

* Python imports (found with ``ast``, so also the ones inside functions):
  ``from flowd import a, b`` is split per new parent package (``from flowd.store import
  models``; a module whose file name changes keeps its old name as an alias:
  ``from flowd.mqtt import bridge as mqtt_bridge``, so the code using it is unchanged);
  ``from flowd.X import ...`` and ``import flowd.X`` get the new dotted path.
* attribute chains ``flowd.X.y`` in code, in files that bind the name ``flowd``;
* strings and comments: dotted module names (monkeypatch targets, ``sys.modules`` keys,
  ``-m`` arguments, logger names, ``-c`` code, ``:mod:`` references), source paths
  ``flowd/X.py``, bare ``"X.py"`` names in files that read flowd's sources, the entry
  points and package list of pyproject.toml, the module table of docs/DESIGN.md.
  Two names are also something else: ``flowd.service`` is the systemd unit, and
  ``flowd.lease``/``flowd.workers`` are [flowd] configuration keys. The rules for them
  are in ``_is_module_use``; what they leave alone is listed at the end.

Then: empty ``__init__.py`` (a docstring) for each new package, ``ruff check --select I
--fix`` to sort the rewritten imports, a check that every ``flowd`` import in the tree
names a module that exists, and ``pip install -e .`` again (the console scripts).

Exits non-zero with a message when it meets something it cannot map: a module of
``flowd/`` in no list below, a sub-package it does not know, a relative import, a target
that exists already, an import left pointing at a moved module, a dirty work tree.
"""

from __future__ import annotations

import argparse
import ast
import io
import itertools
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

# old module (flowd/<old>.py) -> new dotted name
PLAN: dict[str, str] = {}
for _pkg, _mods in {
    "store": ["models", "migrations", "durability", "integrity", "salvage", "dbrecover"],
    "mqtt": ["mqtt_bridge:bridge", "mqtt_client:client", "intake", "outbox", "listener", "topics",
             "homeassistant", "payloads", "status"],
    "engine": ["engine", "flowmessages", "lease", "waiting", "recovery", "reaper", "runner", "batch"],
    "queue": ["queue", "workers"],
    "schedule": ["scheduler", "scheduler_gate:gate", "cron"],
    "service": ["service", "sdnotify", "journal", "logs", "libc", "imports", "wakeup"],
    "cli": ["cli", "cli_run:run", "display", "foreground", "hints"],
}.items():
    for _entry in _mods:
        _old, _, _new = _entry.partition(":")
        PLAN[_old] = f"flowd.{_pkg}.{_new or _old}"

STAY = {"__init__", "__main__", "api", "task", "testing", "config", "errors", "catalog", "apply", "loader"}
KNOWN_PACKAGES = {"store", "web", "__pycache__"}  # sub-packages of flowd/ before the move
PACKAGE_DOCS = {
    "mqtt": "The MQTT side: the paho client and bridge, the intake of submits, the outbox publisher, topics.",
    "engine": "The flow state machine and what drives it: runner, batches, recovery, reaper, waits, leases.",
    "queue": "The huey queue that hands flows to worker processes, and the worker processes.",
    "schedule": "APScheduler, built only once a routine has a schedule, and the schedule expressions.",
    "service": "``flowd run``: the daemon's wiring, systemd (sd_notify, journal), logging, libc, imports.",
    "cli": "flowctl: the command line, its output and its hints, and ``flowctl run``.",
}
# Not rewritten: measurements of the old code, generated or external files.
SKIP_PARTS = {".git", ".venv", "__pycache__", "flowd.egg-info", "node_modules"}
# The move tools name the old modules on purpose.
SKIP_PREFIXES = ("bench/results/", "scripts/house/")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".service", ".txt", ".cfg", ".ini", ".tpl", ".rst", ".yml",
                 ".yaml", ".conf", ".json", ""}

ID = r"[A-Za-z_][A-Za-z0-9_]*"


class MoveError(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"move.py: error: {message}")


def rel_new_path(old: str) -> str:
    """'engine' -> 'engine/engine.py' (relative to flowd/)."""
    return PLAN[old].removeprefix("flowd.").replace(".", "/") + ".py"


class Rewriter:
    """The text rules, shared by every file; it keeps what it left alone for the report."""

    def __init__(self, plan: dict[str, str], config_keys: set[str]) -> None:
        self.plan = plan
        self.config_keys = config_keys & set(plan)  # module names that are also [flowd] keys
        names = "|".join(sorted(plan, key=len, reverse=True))
        self.dotted = re.compile(rf"(?<![\w.{{/$-])flowd\.({names})(?![\w])")
        self.path = re.compile(rf"(?<![\w.])flowd/({names})\.py(?![\w])")
        self.bare = re.compile(rf"({names})\.py")
        self.from_import = re.compile(r"(?<![\w.])from flowd import ([\w ,]+?)(?=\s*(?:;|\\n|\n|$|\"|'))")
        self.left_alone: list[str] = []
        self.changed_logger_names: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ the ambiguous names
    def _is_module_use(self, text: str, m: re.Match[str], kind: str, where: str) -> bool:
        """Whether ``flowd.<name>`` at ``m`` names the module (kind: 'string', 'prose', 'code')."""
        name = m.group(1)
        before = text[max(0, m.start() - 12):m.start()]
        after = text[m.end():m.end() + 40]
        line_before = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
        module_context = (re.match(rf"[.:]{ID}", after) is not None and not re.match(r"\.d\b", after)) \
            or re.search(r"(from |import |-m |-m\", \"|:mod:`~?|logger |getLogger\(\")$", before) is not None \
            or re.search(r"(?:^|[\s;(\"'])import [\w., ]*$", line_before) is not None \
            or re.match(r" import\b", after) is not None
        if name == "service":
            # flowd.service is also the unit file: a module only where the context says so;
            # a log line of the daemon's logger reads 'flowd.service: <lowercase message>'.
            if module_context and not re.match(r"\.d\b", after):
                return True
            if kind == "string" and re.match(r": [a-z]", after):
                return True
            seen = text[max(0, m.start() - 30):m.end() + 30]
            self.left_alone.append(f"{where}: 'flowd.service' read as the systemd unit: ...{seen!r}")
            return False
        literal = re.sub(r"^[rRbBuUfF]*(['\"]{1,3})(.*)\1$", r"\2", text, flags=re.S)
        if name in self.config_keys and kind == "string" and literal == m.group(0):
            self.left_alone.append(f"{where}: {m.group(0)!r} read as the [flowd] configuration key")
            return False
        return True

    def dotted_sub(self, text: str, kind: str, where: str) -> str:
        def repl(m: re.Match[str]) -> str:
            if text[max(0, m.start() - 1):m.start()] == "{" and kind == "string":
                return m.group(0)  # an f-string expression: a variable called flowd
            if not self._is_module_use(text, m, kind, where):
                return m.group(0)
            return self.plan[m.group(1)]
        return self.dotted.sub(repl, text)

    def path_sub(self, text: str) -> str:
        return self.path.sub(lambda m: "flowd/" + rel_new_path(m.group(1)), text)

    def from_import_sub(self, text: str) -> str:
        """'from flowd import a, b' inside code held in a string: one statement per parent."""
        def repl(m: re.Match[str]) -> str:
            names = [n.strip() for n in m.group(1).split(",") if n.strip()]
            if not any(n.split(" as ")[0].strip() in self.plan for n in names):
                return m.group(0)
            return "; ".join(import_lines(names, self.plan))
        return self.from_import.sub(repl, text)

    def string(self, text: str, where: str, reads_sources: bool) -> str:
        new = self.from_import_sub(text)
        new = self.dotted_sub(new, "string", where)
        new = self.path_sub(new)
        bare = re.fullmatch(r"([rRbBuU]?)(['\"])(\w+)\.py\2", new)
        if reads_sources and bare and bare.group(3) in self.plan:
            new = f"{bare.group(1)}{bare.group(2)}{rel_new_path(bare.group(3))}{bare.group(2)}"
        return new

    def prose(self, text: str, where: str) -> str:
        return self.path_sub(self.dotted_sub(text, "prose", where))


def import_lines(names: list[str], plan: dict[str, str]) -> list[str]:
    """['models', 'api', 'mqtt_bridge as mb'] -> import statements grouped by parent package."""
    groups: dict[str, list[str]] = {}
    for entry in names:
        name, _, alias = (part.strip() for part in entry.partition(" as "))
        if name in plan:
            parent, leaf = plan[name].rsplit(".", 1)
            bound = alias or name
            groups.setdefault(parent, []).append(leaf if leaf == bound else f"{leaf} as {bound}")
        else:
            groups.setdefault("flowd", []).append(entry.strip())
    return [f"from {parent} import {', '.join(items)}" for parent, items in groups.items()]


# ---------------------------------------------------------------------- Python files
def _offsets(source: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", source)]


def _char_col(source_lines: list[str], lineno: int, byte_col: int) -> int:
    line = source_lines[lineno - 1]
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def rewrite_python(source: str, where: str, rw: Rewriter, reads_sources: bool) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return rewrite_text_py_fallback(source, where, rw)
    lines = source.split("\n")  # as tokenize and ast count lines (str.splitlines also splits at \f, \x1c...)
    starts = _offsets(source)

    def pos(lineno: int, col: int) -> int:
        return starts[lineno - 1] + _char_col(lines, lineno, col)

    edits: list[tuple[int, int, str]] = []
    import_spans: list[tuple[int, int]] = []
    binds_flowd = False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level and _inside_flowd(where):
                raise MoveError(f"{where}:{node.lineno}: relative import (from {'.' * node.level}"
                                f"{node.module or ''} import ...): write it absolute first")
            if node.level:
                continue
            module = node.module or ""
            start = pos(node.lineno, node.col_offset)
            end = pos(node.end_lineno or node.lineno, node.end_col_offset or 0)
            import_spans.append((start, end))
            if module == "flowd" and any(a.name in rw.plan for a in node.names):
                indent = re.match(r"\s*", lines[node.lineno - 1]).group(0)  # type: ignore[union-attr]
                entries = [a.name + (f" as {a.asname}" if a.asname else "") for a in node.names]
                new = f"\n{indent}".join(import_lines(entries, rw.plan))
                if node.col_offset != len(indent):  # after a ';' on the line: keep one line
                    new = "; ".join(import_lines(entries, rw.plan))
                edits.append((start, end, new))
            elif module.startswith("flowd."):
                text = source[start:end]
                edits.append((start, end, rw.dotted.sub(lambda m: rw.plan[m.group(1)], text)))
        elif isinstance(node, ast.Import):
            start = pos(node.lineno, node.col_offset)
            end = pos(node.end_lineno or node.lineno, node.end_col_offset or 0)
            import_spans.append((start, end))
            if any(a.name.split(".")[0] == "flowd" and a.asname is None for a in node.names):
                binds_flowd = True
            text = source[start:end]
            new = rw.dotted.sub(lambda m: rw.plan[m.group(1)], text)
            if new != text:
                edits.append((start, end, new))

    def in_import(offset: int) -> bool:
        return any(s <= offset < e for s, e in import_spans)

    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        start = starts[tok.start[0] - 1] + tok.start[1]
        end = starts[tok.end[0] - 1] + tok.end[1]
        if in_import(start):
            continue
        if tok.type == tokenize.NAME and tok.string == "flowd" and binds_flowd and i + 2 < len(tokens):
            dot, name = tokens[i + 1], tokens[i + 2]
            prev = tokens[i - 1] if i else None
            if (dot.string == "." and name.type == tokenize.NAME and name.string in rw.plan
                    and not (prev is not None and prev.string == ".")):
                name_end = starts[name.end[0] - 1] + name.end[1]
                edits.append((start, name_end, rw.plan[name.string]))
        elif tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            new = rw.string(tok.string, f"{where}:{tok.start[0]}", reads_sources)
            if new != tok.string:
                edits.append((start, end, new))
        elif tok.type == tokenize.COMMENT:
            new = rw.prose(tok.string, f"{where}:{tok.start[0]}")
            if new != tok.string:
                edits.append((start, end, new))
    edits = _ast_matchers(source, rw, edits)
    edits.sort()
    for (s1, e1, _), (s2, _, _) in itertools.pairwise(edits):
        if s2 < e1:
            raise MoveError(f"{where}: overlapping rewrites at offsets {s1} and {s2} (a bug of move.py)")
    out = source
    for start, end, new in reversed(edits):
        out = out[:start] + new + out[end:]
    return out


def _ast_matchers(source: str, rw: Rewriter, edits: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Code that recognises ``from flowd import <old>`` in an ast (``node.module == "flowd"``, then
    ``alias.name == "<old>"`` within a few lines): the new parent and leaf names."""
    names = "|".join(sorted(rw.plan, key=len, reverse=True))
    for m in re.finditer(rf"\.module\s*==\s*(\"flowd\")((?:[^\n]*\n){{0,3}}?[^\n]*?\.name\s*==\s*)\"({names})\"",
                         source):
        parent, leaf = rw.plan[m.group(3)].rsplit(".", 1)
        edits = [e for e in edits if not (m.start(1) <= e[0] < m.end())]
        edits.append((m.start(1), m.end(1), f'"{parent}"'))
        edits.append((m.end(2), m.end(), f'"{leaf}"'))
    return edits


def rewrite_text_py_fallback(source: str, where: str, rw: Rewriter) -> str:
    """A file that does not parse (a syntax-error fixture): imports by regex only."""
    if re.search(r"^\s*from flowd import", source, re.M) and any(
            re.search(rf"^\s*from flowd import .*\b{name}\b", source, re.M) for name in rw.plan):
        raise MoveError(f"{where}: does not parse and imports a moved module with 'from flowd import'")
    return rw.prose(source, where)


def _inside_flowd(where: str) -> bool:
    return where.startswith("flowd/")


def wrap_long_lines(text: str, limit: int, untouched: set[str]) -> str:
    """Re-wrap the lines the rewrite made longer than ``limit`` (pyproject's line-length)."""
    skipped: set[int] = set()
    for _ in range(200):
        lines = text.split("\n")
        todo = [i for i, line in enumerate(lines) if len(line) > limit and line not in untouched and i not in skipped]
        if not todo:
            return text
        i = todo[0]
        new = _wrap_line(text, lines, i, limit)
        if new is None:
            skipped.add(i)
        else:
            text = new
    return text


def _wrap_line(text: str, lines: list[str], i: int, limit: int) -> str | None:
    line = lines[i]
    m = re.match(r"^(\s*)import ((?:[\w.]+(?: as \w+)?, )+[\w.]+(?: as \w+)?)\s*$", line)
    if m:  # 'import a, b, c' (also in code held in a string): as many statements as needed
        out, current = [], []
        for name in m.group(2).split(", "):
            if current and len(m.group(1) + "import " + ", ".join([*current, name])) > limit:
                out.append(m.group(1) + "import " + ", ".join(current))
                current = []
            current.append(name)
        out.append(m.group(1) + "import " + ", ".join(current))
        return "\n".join([*lines[:i], *out, *lines[i + 1:]])
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    stack: list[tuple[int, int]] = []  # (row, col) of the open brackets
    best: tuple[int, int] | None = None  # (end col of the comma, indent of the next line)
    row = i + 1
    for n, tok in enumerate(tokens):
        if tok.start[0] > row:
            break
        if tok.type == tokenize.OP and tok.string in "([{":
            stack.append(tok.start)
        elif tok.type == tokenize.OP and tok.string in ")]}" and stack:
            stack.pop()
        if tok.start[0] != row:
            continue
        if tok.type == tokenize.COMMENT and not re.match(r"#\s*(noqa|type:|pragma)", tok.string):
            code = line[:tok.start[1]].rstrip()
            if code.strip() and len(code) <= limit:
                indent = re.match(r"\s*", line).group(0)  # type: ignore[union-attr]
                return "\n".join([*lines[:i], indent + tok.string, code, *lines[i + 1:]])
        if (tok.type == tokenize.OP and tok.string == "," and stack and tok.end[1] <= limit
                and n + 1 < len(tokens) and tokens[n + 1].start[0] == row
                and tokens[n + 1].type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)):
            open_row, open_col = stack[-1]
            indent = open_col + 1 if open_row == row else len(re.match(r"\s*", line).group(0))  # type: ignore[union-attr]
            best = (tok.end[1], indent)
    if best is None:
        return None
    cut, indent = best
    return "\n".join([*lines[:i], line[:cut], " " * indent + line[cut:].lstrip(), *lines[i + 1:]])


# ---------------------------------------------------------------------- other files
def rewrite_pyproject(text: str, rw: Rewriter, packages: list[str]) -> str:
    text = rw.prose(text, "pyproject.toml")
    m = re.search(r"(?m)^(packages\s*=\s*)\[([^\]]*)\]", text)
    if not m:
        raise MoveError("pyproject.toml: no 'packages = [...]' under [tool.setuptools]")
    listed = re.findall(r"\"([^\"]+)\"", m.group(2))
    wanted = sorted(set(listed) | set(packages))
    return text[:m.start()] + m.group(1) + "[" + ", ".join(f'"{p}"' for p in wanted) + "]" + text[m.end():]


def rewrite_design(text: str, rw: Rewriter) -> str:
    """docs/DESIGN.md: the module table's `x.py` cells and the '# x.py' lines of its code blocks."""
    names = "|".join(sorted(rw.plan, key=len, reverse=True))
    text = re.sub(rf"(?m)^\| `({names})\.py` \|", lambda m: f"| `{rel_new_path(m.group(1))}` |", text)
    text = re.sub(rf"(?m)^# ({names})\.py$", lambda m: f"# {rel_new_path(m.group(1))}", text)
    return rw.prose(text, "docs/DESIGN.md")


# ---------------------------------------------------------------------- the run
def git(tree: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise MoveError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def config_keys(tree: Path) -> set[str]:
    """The field names of the [flowd] section (config.FlowdSection)."""
    tree_ast = ast.parse((tree / "flowd/config.py").read_text())
    for node in tree_ast.body:
        if isinstance(node, ast.ClassDef) and node.name == "FlowdSection":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise MoveError("flowd/config.py: no class FlowdSection (needed to tell config keys from modules)")


def survey(tree: Path) -> dict[str, str]:
    """Check flowd/ against PLAN and STAY; the plan for the modules present."""
    flowd = tree / "flowd"
    if not (flowd / "__init__.py").is_file():
        raise MoveError(f"{tree}: no flowd/__init__.py")
    problems = []
    for item in sorted(flowd.iterdir()):
        if item.is_dir():
            if item.name not in KNOWN_PACKAGES:
                problems.append(f"flowd/{item.name}/: a sub-package move.py does not know (already moved?)")
        elif item.suffix == ".py" and item.stem not in PLAN and item.stem not in STAY:
            problems.append(f"flowd/{item.name}: in no list (add it to PLAN or STAY in move.py)")
    if problems:
        raise MoveError("cannot map:\n  " + "\n  ".join(problems))
    present = {old: new for old, new in PLAN.items() if (flowd / f"{old}.py").is_file()}
    for old in sorted(set(PLAN) - set(present)):
        print(f"move.py: note: flowd/{old}.py is not there; nothing to move for it", file=sys.stderr)
    for old in present:
        target = flowd / rel_new_path(old)
        if target.exists():
            raise MoveError(f"{target.relative_to(tree)} exists already")
    for pkg in {new.split(".")[1] for new in present.values()} - KNOWN_PACKAGES:
        if (flowd / f"{pkg}.py").exists() and pkg not in present:
            raise MoveError(f"flowd/{pkg}.py would be shadowed by the package flowd/{pkg}/")
    return present


def text_files(tree: Path) -> list[str]:
    out = []
    for rel in git(tree, "ls-files", "-z").split("\0"):
        if not rel or any(part in SKIP_PARTS for part in Path(rel).parts) or rel.startswith(SKIP_PREFIXES):
            continue
        path = tree / rel
        if path.is_symlink() or not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        out.append(rel)
    return out


def verify(tree: Path, plan: dict[str, str]) -> list[str]:
    """Every flowd import (module level, in functions, in code strings) names a module of the tree."""

    def exists(dotted: str) -> bool:
        path = tree / dotted.replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    problems = []
    for rel in text_files(tree):
        if not rel.endswith(".py"):
            continue
        try:
            mod = ast.parse((tree / rel).read_text())
        except SyntaxError:
            continue
        for node in ast.walk(mod):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "flowd":
                names = [node.module or ""]
                if node.module == "flowd":
                    problems += [f"{rel}:{node.lineno}: from flowd import {a.name}: a moved module"
                                 for a in node.names if a.name in plan]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "flowd"]
            problems += [f"{rel}:{node.lineno}: imports {name}, not a module of the tree" for name in names
                         if not exists(name)]
            if isinstance(node, (ast.List, ast.Tuple)):
                items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                for flag, target in itertools.pairwise(items):
                    if flag == "-m" and isinstance(target, str) and target.split(".")[0] == "flowd" and not (
                            (tree / target.replace(".", "/")).with_suffix(".py").is_file()
                            or (tree / target.replace(".", "/") / "__main__.py").is_file()):
                        problems.append(f"{rel}:{node.lineno}: runs -m {target}, which cannot run")
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in re.finditer(r"(?<![\w.])(?:from|import) (flowd(?:\.\w+)+)", node.value):
                    if not exists(m.group(1)):
                        problems.append(f"{rel}:{node.lineno}: code in a string imports {m.group(1)}")
                for m in re.finditer(r"(?<![\w.])from flowd import ([\w, ]+)", node.value):
                    problems += [f"{rel}:{node.lineno}: code in a string: from flowd import {n.strip()}"
                                 for n in m.group(1).split(",") if n.strip() in plan]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path)
    parser.add_argument("--allow-dirty", action="store_true", help="run on a work tree with uncommitted changes")
    parser.add_argument("--no-install", action="store_true", help="do not re-run 'pip install -e .' in .venv")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what would be left alone")
    args = parser.parse_args()
    tree: Path = args.tree.resolve()
    if not (tree / ".git").exists():
        raise MoveError(f"{tree} is not a git work tree")
    if not args.allow_dirty and git(tree, "status", "--porcelain", "--untracked-files=no").strip():
        raise MoveError(f"{tree} has uncommitted changes (commit them, or --allow-dirty)")

    plan = survey(tree)
    rw = Rewriter(plan, config_keys(tree))
    new_packages = sorted({new.rsplit(".", 1)[0] for new in plan.values()})
    print(f"move.py: {len(plan)} modules into {', '.join(p for p in new_packages)}")

    # 1. rewrite every reference, files still at their old places
    changed: list[str] = []
    length = re.search(r"(?m)^line-length\s*=\s*(\d+)", (tree / "pyproject.toml").read_text())
    limit = int(length.group(1)) if length else 88
    for rel in text_files(tree):
        path = tree / rel
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if "flowd" not in text:
            continue
        if rel.endswith(".py"):
            reads_sources = re.search(r"/\s*[\"']flowd[\"']", text) is not None
            new = rewrite_python(text, rel, rw, reads_sources)
        elif rel == "pyproject.toml":
            new = rewrite_pyproject(text, rw, [p for p in new_packages])
        elif rel == "docs/DESIGN.md":
            new = rewrite_design(text, rw)
        else:
            new = rw.prose(text, rel)
        if new != text and rel.endswith(".py"):
            new = wrap_long_lines(new, limit, set(text.split("\n")))
        if new != text:
            changed.append(rel)
            if not args.dry_run:
                path.write_text(new)
    if args.dry_run:
        print("\n".join(f"  would change {rel}" for rel in changed))
        print("\n".join(f"  left alone: {line}" for line in rw.left_alone))
        return 0

    # 2. move the files, add the packages
    for pkg in new_packages:
        folder = tree / pkg.replace(".", "/")
        init = folder / "__init__.py"
        if not init.exists():
            folder.mkdir(parents=True, exist_ok=True)
            init.write_text(f'"""{PACKAGE_DOCS.get(pkg.split(".")[-1], pkg)}"""\n')
            git(tree, "add", str(init.relative_to(tree)))
    for old in plan:
        git(tree, "mv", f"flowd/{old}.py", f"flowd/{rel_new_path(old)}")
    # 'python -m flowd.cli' (flowctl) keeps working now that flowd.cli is a package
    if plan.get("cli") == "flowd.cli.cli" and not (tree / "flowd/cli/__main__.py").exists():
        (tree / "flowd/cli/__main__.py").write_text(
            '"""``python -m flowd.cli`` is the same as ``flowctl``."""\n\nfrom flowd.cli.cli import main\n\n'
            'if __name__ == "__main__":\n    raise SystemExit(main())\n')
        git(tree, "add", "flowd/cli/__main__.py")
    for cache in (tree / "flowd").glob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)

    # 3. sort the rewritten imports
    ruff = next((str(p) for p in (tree / ".venv/bin/ruff",) if p.exists()), shutil.which("ruff"))
    moved = {f"flowd/{old}.py": f"flowd/{rel_new_path(old)}" for old in plan}
    py_changed = sorted({moved.get(rel, rel) for rel in changed if rel.endswith(".py")} | set(moved.values()))
    if ruff is None:
        raise MoveError("ruff not found (.venv/bin/ruff or PATH): the rewritten imports are left unsorted")
    done = subprocess.run([ruff, "check", "--select", "I", "--fix", "--quiet", *py_changed], cwd=tree,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise MoveError(f"ruff could not sort the imports:\n{done.stdout}{done.stderr}")

    # 4. nothing left pointing at a moved module
    problems = verify(tree, plan)
    if problems:
        raise MoveError("references left to moved modules:\n  " + "\n  ".join(problems))

    # 5. the console scripts point at the new modules only once reinstalled
    venv_python = tree / ".venv/bin/python"
    if venv_python.exists() and not args.no_install:
        extra = "[test,systemd]" if (tree / ".venv/bin/pytest").exists() else ""
        done = subprocess.run([str(venv_python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "--no-deps", "-e", f".{extra}"], cwd=tree, capture_output=True, text=True)
        if done.returncode != 0:
            raise MoveError(f"pip install -e . failed (run scripts/setup.sh):\n{done.stderr}")
        print("move.py: reinstalled flowd in .venv (console scripts flowd, flowctl)")

    print(f"move.py: moved {len(plan)} modules, rewrote {len(changed)} files:")
    for old, new in plan.items():
        print(f"  flowd/{old}.py -> flowd/{rel_new_path(old)}  ({'flowd.' + old} -> {new})")
    loggers = [f"{'flowd.' + old} -> {new}" for old, new in plan.items()
               if "getLogger(__name__)" in (tree / "flowd" / rel_new_path(old)).read_text()]
    print(f"move.py: logger names (getLogger(__name__)) that change, {len(loggers)}:\n  " + "\n  ".join(loggers))
    units: dict[str, int] = {}
    for line in rw.left_alone:
        if "read as the systemd unit" in line:
            units[line.split(":")[0]] = units.get(line.split(":")[0], 0) + 1
        else:
            print(f"  left alone: {line}")
    print("  left alone, 'flowd.service' read as the systemd unit: "
          + ", ".join(f"{path} ({n})" for path, n in sorted(units.items())))
    done = subprocess.run([ruff, "check", "--select", "E501", "--output-format", "concise", "--quiet",
                           *py_changed], cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        print("move.py: error: the move is done, but the rewrite made these lines too long; wrap them by hand:\n"
              + done.stdout, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
