"""One store seam (issue 12): only the store package and the schema/catalog modules talk
SQL or peewee queries; everyone else calls named operations of ``flowd.store``.

The scan reads each module of ``flowd/`` with ``ast`` and reports, with file and line:
a peewee model (Flow, TaskResult, Outbox, NodeStatus, Task, Routine, ...) used as a
query root (``Flow.select``, ``Flow.id == 3``), a peewee query method (``.where(``,
``.execute_sql(``, ``.get_or_none(`` ...), peewee, playhouse, sqlite3 or psycopg
imported (the store sorts their exceptions too), and SQL in string literals, whole
statements or WHERE pieces (``"state = ? AND worker_pid IS NULL"``; docstrings aside).
The second test proves the scan on pieces of the code as it was before the seam (api,
cli, outbox, reaper).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import peewee

from flowd.store import models

FLOWD = Path(__file__).resolve().parent.parent / "flowd"

# Where SQL and peewee queries belong: the store itself, the schema and its upkeep
# (models, migrations, integrity checks, salvage and recovery of damaged files), and the
# catalog of tasks and routines with the file that feeds it.
ALLOWED = {"store/models.py", "store/migrations.py", "catalog.py", "apply.py", "store/integrity.py",
           "store/dbrecover.py", "store/salvage.py"}

MODEL_NAMES = {name for name, value in vars(models).items()
               if isinstance(value, type) and issubclass(value, peewee.Model) and value is not models.BaseModel}
QUERY_METHODS = {"execute_sql", "get_or_none", "get_by_id", "get_or_create", "where", "order_by", "group_by",
                 "tuples", "dicts", "on_conflict", "insert_many", "delete_instance", "in_", "not_in", "is_null",
                 "select", "create_table"}
DRIVERS = {"peewee", "playhouse", "sqlite3", "psycopg", "psycopg2"}
PEEWEE_QUERY_NAMES = {"fn", "SQL", "JOIN", "Case", "Value", "NodeList"}
SQL = re.compile(r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\s+\"?\w+\"?\s+SET\b|\bDELETE\s+FROM\b"
                 r"|\bPRAGMA\s+incremental_vacuum\b|\bRETURNING\b"
                 # a WHERE clause handed to the store in pieces: "parent_id = ? AND state IN (?, ?)"
                 r"|\b\w+\"?\s*(?:=|<=|>=|<|>|<>|!=)\s*\?|\bIN\s*\(\?|\b\w+\s+IS\s+(?:NOT\s+)?NULL\b")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may say SELECT ... FROM)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def store_violations(source: str, where: str) -> list[str]:
    """Every SQL text or peewee query in ``source``, as 'where:line: what'."""
    tree = ast.parse(source)
    models_here: set[str] = set()      # names bound to a peewee model in this module
    module_aliases: set[str] = set()   # names bound to flowd.store.models itself
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "flowd.store.models":
            models_here.update(a.asname or a.name for a in node.names if a.name in MODEL_NAMES)
        elif isinstance(node, ast.ImportFrom) and node.module == "flowd.store":
            module_aliases.update(a.asname or a.name for a in node.names if a.name == "models")
        elif isinstance(node, ast.Import):
            module_aliases.update(a.asname or a.name for a in node.names if a.name == "flowd.store.models")
        if isinstance(node, ast.ImportFrom) and node.module in ("peewee", "playhouse.shortcuts"):
            for alias in node.names:
                if alias.name in PEEWEE_QUERY_NAMES:
                    problems.append(f"{where}:{node.lineno}: imports peewee's {alias.name} (a query builder)")
        imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for name in imported:
            if name.split(".")[0] in DRIVERS:
                problems.append(f"{where}:{node.lineno}: imports {name} (database drivers live in the store)")
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            root = node.value
            if isinstance(root, ast.Name) and root.id in models_here:
                problems.append(f"{where}:{node.lineno}: peewee model query {root.id}.{node.attr}")
            elif (isinstance(root, ast.Attribute) and isinstance(root.value, ast.Name)
                  and root.value.id in module_aliases and root.attr in MODEL_NAMES):
                problems.append(f"{where}:{node.lineno}: peewee model query models.{root.attr}.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in QUERY_METHODS:
            receiver = node.func.value
            if node.func.attr == "select" and isinstance(receiver, ast.Name) and receiver.id in ("select", "selector"):
                continue  # select.select(), a selectors selector's select(): the system call
            problems.append(f"{where}:{node.lineno}: peewee query method .{node.func.attr}()")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            match = SQL.search(node.value)
            if match:
                problems.append(f"{where}:{node.lineno}: SQL text {node.value.strip()[:60]!r}")
    return sorted(set(problems), key=lambda p: (p.split(":")[0], int(p.split(":")[1])))


def scanned_modules() -> list[Path]:
    """Every module of flowd/ outside the store package and the allowed homes."""
    return sorted(p for p in FLOWD.rglob("*.py")
                  if "store" not in p.relative_to(FLOWD).parts[:-1] and p.name not in ALLOWED)


def test_no_sql_or_peewee_query_outside_the_store() -> None:
    modules = scanned_modules()
    names = {p.relative_to(FLOWD).as_posix() for p in modules}
    assert {"api.py", "cli/cli.py", "engine/engine.py", "engine/reaper.py", "service/service.py", "mqtt/outbox.py",
            "cli/display.py", "schedule/scheduler.py",
            "engine/batch.py", "engine/runner.py", "mqtt/bridge.py", "engine/waiting.py", "cli/foreground.py",
            "cli/hints.py"} <= names
    problems = [v for p in modules for v in store_violations(p.read_text(), p.relative_to(FLOWD).as_posix())]
    assert problems == [], "SQL or peewee queries outside flowd/store/:\n" + "\n".join(problems)


# Pieces of flowd before the seam (commit 95128f6), one per kind of thing the scan must catch.
BEFORE = {
    "api.py": '''
from flowd.store.models import ENDED_STATES, Flow, TaskResult, database

def get_flow(flow_id):
    """The flow with its current state: SELECT * FROM flow WHERE id = ?, in peewee."""
    return Flow.get_or_none(Flow.id == flow_id)

def prune(cutoff):
    ended = Flow.select(Flow.id).where(Flow.state.in_(ENDED_STATES) & (Flow.finished_at < cutoff))
    TaskResult.delete().where(TaskResult.flow.in_(ended)).execute()
    database.obj.execute_sql("PRAGMA incremental_vacuum")
''',
    "cli/cli.py": '''
def cmd_status(ctx):
    from peewee import fn

    from flowd.store import models

    rows = models.Flow.select(models.Flow.state, fn.COUNT(models.Flow.id)).group_by(models.Flow.state).tuples()
    return rows
''',
    "mqtt/outbox.py": '''
import select

def _select_sql(table, param):
    """Plain SQL: SELECT id FROM outbox is what this builds."""
    select.select([], [], [], 0)
    return (f"SELECT id, topic, payload, qos, retain, correlation_data FROM {table} "
            f"WHERE id > {param} ORDER BY id LIMIT {param}")
''',
    "cli.py (errors)": '''
def store_failure(exc):
    import sqlite3

    import peewee

    return isinstance(exc, (sqlite3.OperationalError, peewee.OperationalError))
''',
    "engine/reaper.py": '''
from flowd.store.models import Flow as F

def lost(cursor, ids, store):
    cursor.execute("DELETE FROM outbox WHERE id = ?", ids)
    store.select_flows("admitted = ? AND worker_pid IS NULL", (True,))
    return F.update(parent=None)
''',
}


def test_the_scan_catches_the_code_before_the_seam() -> None:
    found = {name: store_violations(source, name) for name, source in BEFORE.items()}
    api_found = "\n".join(found["api.py"])
    for what in ("Flow.get_or_none", "Flow.select", "TaskResult.delete", ".where()", ".in_()", ".execute_sql()",
                 "SQL text 'PRAGMA incremental_vacuum'"):
        assert what in api_found, (what, found["api.py"])
    assert "SELECT * FROM" not in api_found, "a docstring is prose, not SQL"
    cli_found = "\n".join(found["cli/cli.py"])
    assert "imports peewee's fn" in cli_found and "models.Flow.select" in cli_found and ".tuples()" in cli_found
    errors_found = "\n".join(found["cli.py (errors)"])
    assert "imports sqlite3" in errors_found and "imports peewee" in errors_found
    assert [p for p in found["mqtt/outbox.py"] if "SQL text 'SELECT id, topic" in p], found["mqtt/outbox.py"]
    assert not any(".select()" in p or ":5:" in p for p in found["mqtt/outbox.py"]), found["mqtt/outbox.py"]
    reaper_found = "\n".join(found["engine/reaper.py"])
    assert "SQL text 'DELETE FROM outbox" in reaper_found and "F.update" in reaper_found
    assert "SQL text 'admitted = ? AND worker_pid IS NULL'" in reaper_found
    # Clean code passes: a str.join, a select() call on the select module, SQL words in prose.
    clean = ('"""UPDATE flow SET x: never here."""\nimport select\nselect.select([], [], [], 0)\n'
             'print(", ".join(["a"]), "select from the list", "is it NULL?")\n')
    assert store_violations(clean, "clean.py") == []
