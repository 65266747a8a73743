"""Hand-written SQL for the hot path: flows, attempts and the definitions they use.

peewee builds its SQL anew for every query, which costs more than SQLite itself on
the per-step path (tens of queries per flow). The engine goes through these few
statements instead, compiled once per process; the tables are still the peewee models
of ``models.py`` (same columns, same encodings), and everything off the hot path uses
peewee directly.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import peewee

from flowd.models import ACTIVE_STATES, FlowState, StepState, database, dumps

FLOW_COLUMNS = (
    "id", "uid", "routine", "steps", "state", "position", "args", "kwargs", "request_id", "trigger", "reply_to",
    "correlation_data", "admitted", "dispatch_token", "worker_pid", "step_attempt", "interruptions",
    "next_attempt_at", "deadline", "result", "error", "created_at", "started_at", "finished_at", "updated_at",
    "parent_id", "depth", "wait_topic", "wait_match", "wait_until",
)
RESULT_COLUMNS = ("id", "flow_id", "position", "task", "attempt", "state", "input", "output", "error", "worker_pid",
                  "started_at", "finished_at")
_JSON = {"steps", "args", "kwargs", "result", "wait_match", "input", "output"}
_TIMES = {"next_attempt_at", "deadline", "created_at", "started_at", "finished_at", "updated_at", "wait_until"}
_BOOLS = {"admitted"}


class Row:
    """A row as plain attributes (``flow.state``), like a peewee model instance."""

    __slots__ = ("__dict__",)

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # columns are set in __init__; this only types them
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value

    @property
    def is_ended(self) -> bool:
        return self.state not in ACTIVE_STATES


def _decode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON:
        return json.loads(value)
    if name in _TIMES and isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    if name in _BOOLS:
        return bool(value)
    return value


def _encode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON:
        return dumps(value)
    if name in _TIMES and isinstance(value, dt.datetime) and _is_sqlite():
        return value.isoformat(sep=" ")
    if isinstance(value, bool) and _is_sqlite():
        return int(value)
    return value


def _is_sqlite() -> bool:
    return isinstance(database.obj, peewee.SqliteDatabase)


def sql_bool(value: bool) -> Any:
    """A boolean as the backend wants it as a parameter (SQLite 0/1, PostgreSQL bool)."""
    return _encode("admitted", value)


_postgres_sql: dict[str, str] = {}


def _sql(text: str) -> str:
    """Adapt '?' placeholders to the backend's paramstyle (PostgreSQL wants %s)."""
    if _is_sqlite():
        return text
    cached = _postgres_sql.get(text)
    if cached is None:
        cached = _postgres_sql[text] = text.replace("?", "%s")
    return cached


def execute(text: str, params: Iterable[Any] = ()) -> Any:
    return database.obj.execute_sql(_sql(text), tuple(params))


def _rows(cursor: Any, columns: tuple[str, ...]) -> list[Row]:
    return [Row({name: _decode(name, value) for name, value in zip(columns, raw, strict=True)})
            for raw in cursor.fetchall()]


_FLOW_SELECT = "SELECT " + ", ".join(f'"{c}"' for c in FLOW_COLUMNS) + " FROM flow"
_RESULT_SELECT = "SELECT " + ", ".join(f'"{c}"' for c in RESULT_COLUMNS) + " FROM task_result"


def get_flow(flow_id: int) -> Row | None:
    found = _rows(execute(_FLOW_SELECT + " WHERE id = ?", (flow_id,)), FLOW_COLUMNS)
    return found[0] if found else None


def select_flows(where: str, params: Iterable[Any] = (), suffix: str = "ORDER BY id") -> list[Row]:
    return _rows(execute(f"{_FLOW_SELECT} WHERE {where} {suffix}", params), FLOW_COLUMNS)


_HELD_SELECT = ("SELECT " + ", ".join(f'f."{c}"' for c in FLOW_COLUMNS)
                + ', r.state, r.task, r.attempt FROM flow f LEFT JOIN task_result r ON r.id = ? WHERE f.id = ?')


def flow_and_result(flow_id: int, result_id: int) -> tuple[Row | None, Row | None]:
    """A flow and one of its attempts (id, state, task, attempt) in one query."""
    raw = execute(_HELD_SELECT, (result_id, flow_id)).fetchone()
    if raw is None:
        return None, None
    flow = Row({name: _decode(name, value) for name, value in zip(FLOW_COLUMNS, raw, strict=False)})
    state, task, attempt = raw[len(FLOW_COLUMNS):]
    result = None if state is None else Row({"id": result_id, "state": state, "task": task, "attempt": attempt})
    return flow, result


def flow_by_request_id(request_id: str) -> Row | None:
    found = select_flows("request_id = ?", (request_id,))
    return found[0] if found else None


def insert_flow(values: dict[str, Any]) -> int:
    names = list(values)
    sql = f'INSERT INTO flow ({", ".join(chr(34) + n + chr(34) for n in names)}) VALUES ({", ".join("?" * len(names))})'
    if not _is_sqlite():
        cursor = execute(sql + " RETURNING id", [_encode(n, values[n]) for n in names])
        return int(cursor.fetchone()[0])
    cursor = execute(sql, [_encode(n, values[n]) for n in names])
    return int(cursor.lastrowid)


def update_flow(flow: Row, **changes: Any) -> None:
    """Write ``changes`` to the flow's row and to ``flow`` itself.

    Columns whose value ``flow`` already has are left out: a column not in the SET
    list costs no index update (``state`` is in two indexes), and an empty change
    costs no statement. ``flow`` must be what the row holds (read in this transaction).
    """
    known = flow.__dict__
    changes = {name: value for name, value in changes.items() if name not in known or known[name] != value
               or type(known[name]) is not type(value)}
    if not changes:
        return
    names = sorted(changes)
    sql = f'UPDATE flow SET {", ".join(chr(34) + n + chr(34) + " = ?" for n in names)} WHERE id = ?'
    execute(sql, [*(_encode(n, changes[n]) for n in names), flow.id])
    flow.__dict__.update(changes)


def running_result(flow_id: int, position: int) -> Row | None:
    found = _rows(execute(_RESULT_SELECT + " WHERE flow_id = ? AND position = ? AND state = ? "
                          "ORDER BY attempt DESC LIMIT 1", (flow_id, position, StepState.RUNNING.value)),
                  RESULT_COLUMNS)
    return found[0] if found else None


def insert_result(flow_id: int, position: int, task: str, step_input: Any, worker_pid: int | None,
                  started_at: dt.datetime, attempt: int | None = None) -> tuple[int, int]:
    """Start the next attempt of a step (``attempt`` when the caller knows it is the
    first); returns (task_result id, attempt number)."""
    if attempt is None:
        row = execute("SELECT COALESCE(MAX(attempt), 0) + 1 FROM task_result WHERE flow_id = ? AND position = ?",
                      (flow_id, position)).fetchone()
        attempt = int(row[0])
    values = [flow_id, position, task, attempt, StepState.RUNNING.value, _encode("input", step_input), worker_pid,
              _encode("started_at", started_at)]
    sql = ('INSERT INTO task_result (flow_id, position, task, attempt, state, input, worker_pid, started_at) '
           'VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
    if not _is_sqlite():
        return int(execute(sql + " RETURNING id", values).fetchone()[0]), attempt
    return int(execute(sql, values).lastrowid), attempt


def update_result(result_id: int, **changes: Any) -> None:
    names = sorted(changes)
    sql = f'UPDATE task_result SET {", ".join(chr(34) + n + chr(34) + " = ?" for n in names)} WHERE id = ?'
    execute(sql, [*(_encode(n, changes[n]) for n in names), result_id])


def end_running_results(flow_id: int, state: str, error: str | None, now: dt.datetime) -> None:
    execute("UPDATE task_result SET state = ?, error = ?, finished_at = ? WHERE flow_id = ? AND state = ?",
            (state, error, _encode("finished_at", now), flow_id, StepState.RUNNING.value))


def step_output(flow_id: int, position: int) -> Any:
    """The output of the latest DONE attempt of a step (None if there is none)."""
    row = execute("SELECT output FROM task_result WHERE flow_id = ? AND position = ? AND state = ? "
                  "ORDER BY attempt DESC LIMIT 1", (flow_id, position, StepState.DONE.value)).fetchone()
    return _decode("output", row[0]) if row else None


def done_outputs(flow_id: int, before: int) -> list[Any]:
    """Outputs of every finished step before ``before``, in order (``Task.results``)."""
    rows = execute("SELECT position, output FROM task_result WHERE flow_id = ? AND position < ? AND state = ? "
                   "ORDER BY position, attempt", (flow_id, before, StepState.DONE.value)).fetchall()
    by_position = {position: _decode("output", output) for position, output in rows}
    return [by_position[p] for p in sorted(by_position)]


def count_active(routine: str) -> int:
    placeholders = ", ".join("?" * len(ACTIVE_STATES))
    row = execute(f"SELECT COUNT(*) FROM flow WHERE routine = ? AND admitted = ? AND state IN ({placeholders})",
                  (routine, sql_bool(True), *ACTIVE_STATES)).fetchone()
    return int(row[0])


def active_flows(routine: str) -> list[Row]:
    placeholders = ", ".join("?" * len(ACTIVE_STATES))
    return select_flows(f"routine = ? AND admitted = ? AND state IN ({placeholders})",
                        (routine, sql_bool(True), *ACTIVE_STATES))


def pending_flows(routine: str, limit: int = 1_000_000) -> list[Row]:
    return select_flows("routine = ? AND admitted = ? AND state = ?",
                        (routine, sql_bool(False), FlowState.INIT.value), f"ORDER BY id LIMIT {int(limit)}")


def add_outbox(topic: str, payload: str, correlation_data: str | None, now: dt.datetime) -> None:
    execute("INSERT INTO outbox (topic, payload, qos, retain, correlation_data, created_at) "
            "VALUES (?, ?, 1, ?, ?, ?)", (topic, payload, _encode("retain", False), correlation_data,
                                          _encode("created_at", now)))


@dataclass(frozen=True)
class RoutineInfo:
    name: str
    steps: list[str]
    mode: str
    max: int
    timeout: float | None
    enabled: bool
    mqtt: bool
    status: str = "steps"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    script: str
    options: dict[str, Any]
    timeout: float | None
    retries: int
    retry_delay: float
    retry_backoff_max: float


class Definitions:
    """Routines and tasks of this process, re-read only when the definitions version changes."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.routines: dict[str, RoutineInfo] = {}
        self.tasks: dict[str, TaskInfo] = {}

    def refresh(self) -> None:
        row = execute("SELECT value FROM meta WHERE key = 'definitions_version'").fetchone()
        version = int(row[0]) if row else 0
        if version == self.version:
            return
        tasks = {}
        for name, script, options, timeout, retries, delay, backoff in execute(
                "SELECT name, script, options, timeout, retries, retry_delay, retry_backoff_max FROM task"):
            tasks[name] = TaskInfo(name, script, json.loads(options) if options else {}, timeout, retries, delay,
                                   backoff)
        steps: dict[int, list[tuple[int, str]]] = {}
        for routine_id, position, task_name in execute(
                "SELECT s.routine_id, s.position, t.name FROM routine_step s JOIN task t ON t.id = s.task_id"):
            steps.setdefault(routine_id, []).append((position, task_name))
        routines = {}
        for routine_id, name, mode, limit, timeout, enabled, mqtt, status in execute(
                'SELECT id, name, mode, "max", timeout, enabled, mqtt, status FROM routine'):
            routines[name] = RoutineInfo(name, [t for _, t in sorted(steps.get(routine_id, []))], mode, limit,
                                         timeout, bool(enabled), bool(mqtt), status)
        self.tasks, self.routines, self.version = tasks, routines, version
