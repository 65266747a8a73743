"""Flows and their attempts: the statements of the hot path, compiled once per process.

peewee builds its SQL anew for every query, which costs more than SQLite itself on
the per-step path; the engine goes through these named operations instead. The tables
are still the peewee models of ``models.py`` (same columns, same encodings).
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Iterable
from typing import Any, Protocol

import peewee

from flowd.errors import DuplicateRequest
from flowd.states import check_transition
from flowd.store.models import ACTIVE_STATES, DONE, INIT, RUNNING, WAITING, database
from flowd.store.rows import (
    BOOL_COLUMNS,
    CODED_COLUMNS,
    FLOW_COLUMNS,
    RESULT_COLUMNS,
    TIME_COLUMNS,
    Row,
    decode,
    encode,
    execute,
    is_sqlite,
    padded,
    padded_ids,
    rows,
    runs,
    sql_bool,
)

_FLOW_SELECT = "SELECT " + ", ".join(f'"{c}"' for c in FLOW_COLUMNS) + " FROM flow"
_RESULT_SELECT = "SELECT " + ", ".join(f'"{c}"' for c in RESULT_COLUMNS) + " FROM task_result"


def _locking(of: str = "") -> str:
    """`` FOR UPDATE`` for a flow read inside a write transaction on PostgreSQL.

    Several processes (and nodes) write the same rows there at once, each transaction
    reading a row and then writing what it decided. Locking the rows it reads makes
    that read-then-write as exclusive as on SQLite, whose writers take turns: a worker's
    late commit waits for a takeover (or the other way round) and then sees its result.
    Rows are read in id order, so two transactions lock them in the same order.
    """
    if is_sqlite() or not database.obj.in_transaction():
        return ""
    return f" FOR UPDATE{of}"


def get_flow(flow_id: int) -> Row | None:
    found = rows(execute(_FLOW_SELECT + " WHERE id = ?" + _locking(), (flow_id,)), FLOW_COLUMNS)
    return found[0] if found else None


def select_flows(where: str, params: Iterable[Any] = (), suffix: str = "ORDER BY id") -> list[Row]:
    return rows(execute(f"{_FLOW_SELECT} WHERE {where} {suffix}{_locking()}", params), FLOW_COLUMNS)


_HELD_SELECT = ("SELECT " + ", ".join(f'f."{c}"' for c in FLOW_COLUMNS)
                + ', r.state, r.task, r.attempt FROM flow f LEFT JOIN task_result r ON r.id = ? WHERE f.id = ?')


def flow_and_result(flow_id: int, result_id: int) -> tuple[Row | None, Row | None]:
    """A flow and one of its attempts (id, state, task, attempt) in one query."""
    raw = execute(_HELD_SELECT + _locking(" OF f"), (result_id, flow_id)).fetchone()
    if raw is None:
        return None, None
    flow = Row({name: decode(name, value) for name, value in zip(FLOW_COLUMNS, raw, strict=False)})
    state, task, attempt = raw[len(FLOW_COLUMNS):]
    result = None if state is None else Row({"id": result_id, "state": state, "task": task, "attempt": attempt})
    return flow, result


def flow_by_request_id(request_id: str) -> Row | None:
    found = select_flows("request_id = ?", (request_id,))
    return found[0] if found else None


UID_BATCH = 64
_uids: list[str] = []


def new_uid() -> str:
    """A random UUID4 as text, as ``str(uuid.uuid4())`` gives it, from random bytes read
    ``UID_BATCH`` at a time: a submit cost one ``getrandom`` system call and a ``UUID``
    object for its flow's uid before. ``list.pop`` and ``extend`` are atomic, so threads
    share the pool safely; a forked child empties its copy (never its parent's uids)."""
    try:
        return _uids.pop()
    except IndexError:
        pass
    raw = bytearray(os.urandom(16 * UID_BATCH))
    raw[6::16] = bytes((byte & 0x0F) | 0x40 for byte in raw[6::16])  # version 4
    raw[8::16] = bytes((byte & 0x3F) | 0x80 for byte in raw[8::16])  # variant RFC 4122
    text = raw.hex()
    made = [f"{text[i:i + 8]}-{text[i + 8:i + 12]}-{text[i + 12:i + 16]}-{text[i + 16:i + 20]}-"
            f"{text[i + 20:i + 32]}" for i in range(0, len(text), 32)]
    _uids.extend(made[1:])
    return made[0]


os.register_at_fork(after_in_child=_uids.clear)


_insert_sql: dict[tuple[str, ...], tuple[str, tuple[tuple[int, str], ...]]] = {}
_last_steps: tuple[object, str] = (None, "")


def insert_flow(values: dict[str, Any]) -> int:
    """Store a new flow; its id. Raises DuplicateRequest when another process stored its
    ``request_id`` in the same instant.

    A submit is one such INSERT, and the columns given recur (a submit's, a child's):
    the statement, and which of its columns have an encoding, are worked out once per
    column set, and only those columns go through :func:`encode` (the others it would
    pass through as they are; a bool the driver binds itself, as SQLite's 0/1). The
    routine's ``steps`` list is the same object for all its flows until the definitions
    change: its JSON is made once, not per flow."""
    global _last_steps
    names = tuple(values)
    cached = _insert_sql.get(names)
    if cached is None:
        sql = (f'INSERT INTO flow ({", ".join(chr(34) + n + chr(34) for n in names)}) '
               f'VALUES ({", ".join("?" * len(names))})')
        coded = tuple((index, name) for index, name in enumerate(names) if name in CODED_COLUMNS)
        cached = _insert_sql[names] = (sql, coded)
    sql, coded = cached
    params = list(values.values())
    for index, name in coded:
        value = params[index]
        if value is None:
            continue  # NULL as it is
        if name == "steps":
            last = _last_steps  # one read: another thread may replace it, never half of it
            if last[0] is not value:
                last = _last_steps = (value, encode(name, value))
            params[index] = last[1]
        else:
            params[index] = encode(name, value)
    try:
        if not is_sqlite():
            cursor = execute(sql + " RETURNING id", params)
            return int(cursor.fetchone()[0])
        cursor = execute(sql, params)
        return int(cursor.lastrowid)
    except peewee.IntegrityError as exc:
        if values.get("request_id") is not None and "request_id" in str(exc):
            raise DuplicateRequest(str(values["request_id"])) from exc
        raise


def update_flow(flow: Row, *, texts: dict[str, str] | None = None, defer: FlowWrites | None = None,
                **changes: Any) -> None:
    """Write ``changes`` to the flow's row and to ``flow`` itself.

    Columns whose value ``flow`` already has are left out: a column not in the SET
    list costs no index update (``state`` is in two indexes), and an empty change
    costs no statement. ``flow`` must be what the row holds (read in this transaction).
    ``texts``: the JSON text of some of the changed values, which the caller has
    already (a step's output as the flow's result): stored as it is, not encoded again.
    ``defer``: written by its ``flush`` (same transaction), with the other flows that
    get the same values.
    """
    known = flow.__dict__
    changed = {}
    for name, value in changes.items():  # a loop, not a comprehension: most values are the very object held
        old = known.get(name, _ABSENT)
        if old is not value and (old != value or type(old) is not type(value)):
            changed[name] = value
    changes = changed
    if not changes:
        return
    if "state" in changes:  # the one place a flow's state is written: checked against the table
        check_transition(flow.id, flow.state, changes["state"])
    if defer is not None:
        defer.add(flow, changes, texts)
        known.update(changes)
        return
    names = tuple(sorted(changes))
    sql = _update_sql.get(names)
    if sql is None:  # a handful of column sets recur (a claim, a next step, an end): built once each
        columns = ", ".join(f'"{n}" = ?' for n in names)
        sql = _update_sql[names] = f"UPDATE flow SET {columns} WHERE id = ?"
    if texts:
        execute(sql, [*[texts[n] if n in texts else encode(n, changes[n]) for n in names], flow.id])
    else:
        execute(sql, [*[encode(n, changes[n]) for n in names], flow.id])
    known.update(changes)


_update_sql: dict[tuple[str, ...], str] = {}
_ABSENT = object()  # a column the row was read without


class HasResultId(Protocol):
    task_result_id: int


class FlowWrites:
    """Flow updates and first attempts of one transaction, written together: one
    UPDATE per set of values and one INSERT, not one statement per flow.

    A worker's round moves every flow it holds on to its next step (the same
    ``updated_at``, the position its neighbours reach too) and claims new flows with
    the same values: those are a few statements per round. Only for rows this
    transaction holds and reads no more until ``flush`` (the claims and next steps of
    a worker's round): a deferred change is not in the database before it.
    """

    def __init__(self) -> None:
        self._changes: dict[int, dict[str, Any]] = {}  # flow id -> column -> encoded value
        self._results: list[tuple[HasResultId, tuple[Any, ...]]] = []
        self._outbox: list[tuple[Any, ...]] = []

    def add_outbox(self, topic: str, payload: str, correlation_data: str | None, now: dt.datetime,
                   node_id: str | None = None) -> None:
        """:func:`flowd.store.outbox.add_outbox` at the flush, the rows in the order added."""
        self._outbox.append((topic, payload, encode("retain", False), correlation_data, encode("created_at", now),
                             node_id))

    def insert_result(self, target: HasResultId, flow_id: int, position: int, task: str, input_json: str,
                      worker_pid: int | None, started_at: dt.datetime, node_id: str | None) -> None:
        """:func:`insert_result` of a step's first attempt; its id is set on
        ``target.task_result_id`` by the flush."""
        self._results.append((target, (flow_id, position, task, 1, RUNNING, input_json, worker_pid,
                                       encode("started_at", started_at), node_id)))

    def add(self, flow: Row, changes: dict[str, Any], texts: dict[str, str] | None = None) -> None:
        row = self._changes.setdefault(flow.id, {})
        for name, value in changes.items():
            row[name] = texts[name] if texts and name in texts else encode(name, value)

    def flush(self) -> None:
        """Write what was added since the last flush: the flows that change the same
        columns in one statement, those of their values that differ in a VALUES list
        (a round's flows end each with its result, move on to different positions)."""
        groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
        for flow_id, row in self._changes.items():
            groups.setdefault(tuple(sorted(row)), []).append((flow_id, row))
        self._changes = {}
        for names, members in groups.items():
            for start in range(0, len(members), 100):  # far below any backend's parameter limit
                _update_flows(names, members[start:start + 100])
        outbox_rows, self._outbox = self._outbox, []
        for chunk in runs(outbox_rows, 64):  # multi-row INSERTs, in the order added: ids in that order
            execute("INSERT INTO outbox (topic, payload, qos, retain, correlation_data, created_at, node_id) VALUES "
                    + ", ".join(["(?, ?, 1, ?, ?, ?, ?)"] * len(chunk)), [value for row in chunk for value in row])
        results, self._results = self._results, []
        for chunk_results in runs(results, 64):
            if is_sqlite() and not _SQLITE_RETURNING:
                for target, values_row in chunk_results:
                    target.task_result_id = _insert_result_row(values_row)
                continue
            marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk_results))
            cursor = execute(f"{_INSERT_RESULT} VALUES {marks} RETURNING flow_id, position, id",
                             [value for _, values_row in chunk_results for value in values_row])
            ids = {(flow_id, position): result_id for flow_id, position, result_id in cursor.fetchall()}
            for target, values_row in chunk_results:  # RETURNING's order is not promised: by flow and step
                target.task_result_id = int(ids[(values_row[0], values_row[1])])


def _update_flows(names: tuple[str, ...], members: list[tuple[int, dict[str, Any]]]) -> None:
    """One UPDATE of the columns ``names`` of several flows (id, column -> encoded value)."""
    first = members[0][1]
    same = [n for n in names if all(type(row[n]) is type(first[n]) and row[n] == first[n] for _, row in members)]
    varying = [n for n in names if n not in same]
    columns = [f'"{name}" = ?' for name in same]
    if not varying or (is_sqlite() and not _SQLITE_UPDATE_FROM):
        groups: dict[tuple[Any, ...], list[int]] = {}
        for flow_id, row in members:
            groups.setdefault(tuple(row[n] for n in varying), []).append(flow_id)
        columns += [f'"{name}" = ?' for name in varying]
        for values, flow_ids in groups.items():
            wanted = padded_ids(flow_ids)
            execute(f"UPDATE flow SET {', '.join(columns)} WHERE id IN ({', '.join('?' * len(wanted))})",
                    [*(first[n] for n in same), *values, *wanted])
        return
    columns += [f'"{name}" = v.column{index}' for index, name in enumerate(varying, 2)]
    size = padded(len(members))  # rows of NULLs after the members: they join no flow
    if is_sqlite():
        marks = ", ".join(["(" + ", ".join("?" * (len(varying) + 1)) + ")"] * size)
    else:  # PostgreSQL types a VALUES column from its values: parameters need their casts
        marks = ", ".join(["(?::bigint, " + ", ".join(f"?::{_postgres_type(n)}" for n in varying) + ")"] * size)
    execute(f"UPDATE flow SET {', '.join(columns)} FROM (VALUES {marks}) AS v WHERE flow.id = v.column1",
            [*(first[n] for n in same), *(value for flow_id, row in members for value in (flow_id, *(
                row[n] for n in varying))), *[None] * ((size - len(members)) * (len(varying) + 1))])


_INTEGER_COLUMNS = {"id", "position", "dispatch_token", "worker_pid", "step_attempt", "interruptions", "parent_id",
                    "depth"}


def _postgres_type(name: str) -> str:
    if name in _INTEGER_COLUMNS:
        return "bigint"
    if name in TIME_COLUMNS:
        return "timestamp"
    return "boolean" if name in BOOL_COLUMNS else "text"


_INSERT_RESULT = ("INSERT INTO task_result (flow_id, position, task, attempt, state, input, worker_pid, started_at, "
                  "node_id)")
# RETURNING came with SQLite 3.35 (Debian 12 has 3.40); PostgreSQL has it. Without it, a row at a time.
_SQLITE_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
_SQLITE_UPDATE_FROM = _SQLITE_RETURNING  # UPDATE ... FROM came with 3.33; with RETURNING (finish_held_results)


def _insert_result_row(values: tuple[Any, ...]) -> int:
    sql = _INSERT_RESULT + " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    if not is_sqlite():
        return int(execute(sql + " RETURNING id", values).fetchone()[0])
    return int(execute(sql, values).lastrowid)


def running_result(flow_id: int, position: int) -> Row | None:
    found = rows(execute(_RESULT_SELECT + " WHERE flow_id = ? AND position = ? AND state = ? "
                          "ORDER BY attempt DESC LIMIT 1", (flow_id, position, RUNNING)),
                  RESULT_COLUMNS)
    return found[0] if found else None


def insert_result(flow_id: int, position: int, task: str, step_input: Any, worker_pid: int | None,
                  started_at: dt.datetime, attempt: int | None = None, node_id: str | None = None
                  ) -> tuple[int, int]:
    """Start the next attempt of a step (``attempt`` when the caller knows it is the
    first); returns (task_result id, attempt number). ``step_input`` as a ``str`` is its
    JSON text already."""
    if attempt is None:
        row = execute("SELECT COALESCE(MAX(attempt), 0) + 1 FROM task_result WHERE flow_id = ? AND position = ?",
                      (flow_id, position)).fetchone()
        attempt = int(row[0])
    encoded = step_input if isinstance(step_input, str) else encode("input", step_input)
    return _insert_result_row((flow_id, position, task, attempt, RUNNING, encoded, worker_pid,
                               encode("started_at", started_at), node_id)), attempt


def update_result(result_id: int, **changes: Any) -> None:
    names = sorted(changes)
    sql = f'UPDATE task_result SET {", ".join(chr(34) + n + chr(34) + " = ?" for n in names)} WHERE id = ?'
    execute(sql, [*(encode(n, changes[n]) for n in names), result_id])


def end_running_results(flow_id: int, state: str, error: str | None, now: dt.datetime) -> None:
    execute("UPDATE task_result SET state = ?, error = ?, finished_at = ? WHERE flow_id = ? AND state = ?",
            (state, error, encode("finished_at", now), flow_id, RUNNING))


def step_output(flow_id: int, position: int) -> Any:
    """The output of the latest DONE attempt of a step (None if there is none)."""
    row = execute("SELECT output FROM task_result WHERE flow_id = ? AND position = ? AND state = ? "
                  "ORDER BY attempt DESC LIMIT 1", (flow_id, position, DONE)).fetchone()
    return decode("output", row[0]) if row else None


def done_outputs(flow_id: int, before: int) -> list[Any]:
    """Outputs of every finished step before ``before``, in order (``Task.results``)."""
    rows = execute("SELECT position, output FROM task_result WHERE flow_id = ? AND position < ? AND state = ? "
                   "ORDER BY position, attempt", (flow_id, before, DONE)).fetchall()
    by_position = {position: decode("output", output) for position, output in rows}
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
                        (routine, sql_bool(False), INIT, int(limit)), "ORDER BY id LIMIT ?")  # one text




def has_pending(routine: str) -> bool:
    """Whether some flow of ``routine`` waits for admission."""
    return execute("SELECT 1 FROM flow WHERE routine = ? AND admitted = ? AND state = ? LIMIT 1",
                   (routine, sql_bool(False), INIT)).fetchone() is not None


def flows_by_id(flow_ids: list[int]) -> dict[int, Row]:
    """Several flows in one query (a worker claiming one queue message)."""
    if not flow_ids:
        return {}
    if len(flow_ids) == 1:
        found = get_flow(flow_ids[0])
        return {found.id: found} if found is not None else {}
    wanted = padded_ids(flow_ids)
    return {row.id: row for row in select_flows(f"id IN ({', '.join('?' * len(wanted))})", wanted)}


_FINISH_HELD = ("UPDATE task_result SET state = ?, output = ?, finished_at = ?, started_at = COALESCE(?, started_at) "
                "WHERE id = ? AND state = ? AND EXISTS (SELECT 1 FROM flow WHERE id = ? AND state = ? "
                "AND worker_pid = ? AND node_id {same} ? AND dispatch_token = ?")
_FINISH_HELD_SQLITE = _FINISH_HELD.format(same="IS") + ")"  # IS: NULL (one node, no id) matches NULL
_FINISH_HELD_POSTGRES = _FINISH_HELD.format(same="=") + " FOR UPDATE)"


def finish_held_result(result_id: int, output_json: str, now: dt.datetime, started_at: dt.datetime | None,
                       flow_id: int, worker_pid: int, token: int, node_id: str | None) -> bool:
    """Record a finished attempt (its output as JSON text) if its worker still holds the
    flow (same node, same worker, same dispatch token, flow RUNNING, attempt RUNNING):
    the check and the write in one statement. False: the flow was cancelled or taken over (the token is the
    fence: a node frozen past its lease commits nothing), and nothing was written."""
    # On PostgreSQL the flow row is locked (see _locking): a takeover under way is waited for.
    cursor = execute(_FINISH_HELD_SQLITE if is_sqlite() else _FINISH_HELD_POSTGRES,
                     (DONE, output_json, encode("finished_at", now),
                      encode("started_at", started_at), result_id, RUNNING, flow_id,
                      RUNNING, worker_pid, node_id, token))
    return int(cursor.rowcount) == 1


# SQLite: UPDATE ... FROM came with 3.33, RETURNING with 3.35. A VALUES list's columns are
# column1, column2, ... on both backends; PostgreSQL wants their types (casts).
_FINISH_MANY_SQLITE = (
    "UPDATE task_result SET state = ?, output = v.column2, finished_at = ?, "
    "started_at = COALESCE(v.column3, task_result.started_at) FROM (VALUES {marks}) AS v "
    "WHERE task_result.id = v.column1 AND task_result.state = ? AND EXISTS (SELECT 1 FROM flow WHERE "
    "flow.id = v.column4 AND flow.state = ? AND flow.worker_pid = ? AND flow.node_id IS ? "
    "AND flow.dispatch_token = v.column5) RETURNING task_result.id")
# The held flows are locked first, in id order (as _locking's reads), then their attempts updated.
_FINISH_MANY_POSTGRES = (
    "WITH v AS (VALUES {marks}), held AS (SELECT f.id FROM flow f JOIN v ON f.id = v.column4 "
    "AND f.dispatch_token = v.column5 WHERE f.state = ? AND f.worker_pid = ? AND f.node_id = ? "
    "ORDER BY f.id FOR UPDATE OF f) "
    "UPDATE task_result r SET state = ?, output = v.column2, finished_at = ?, "
    "started_at = COALESCE(v.column3, r.started_at) FROM v JOIN held ON held.id = v.column4 "
    "WHERE r.id = v.column1 AND r.state = ? RETURNING r.id")
_POSTGRES_ROW = "(?::bigint, ?::text, ?::timestamp, ?::bigint, ?::bigint)"


class HeldStep(Protocol):
    flow: Any
    task_result_id: int
    started_at: dt.datetime | None
    flow_id: int
    token: int


def finish_held_results(steps: list[HeldStep], output_jsons: list[str], now: dt.datetime, worker_pid: int,
                        node_id: str | None) -> set[int]:
    """:func:`finish_held_result` of several steps of one worker (each with its output
    as JSON text): one statement for a round, not one per step. The attempt ids
    recorded; the others were cancelled or taken over. Steps without a ``flow`` are left out.

    Each row is checked and written as by :func:`finish_held_result`. On PostgreSQL
    the same rows are locked (each held flow, then its attempt), the flows in id order.
    """
    finished = [(step.task_result_id, text, step.started_at, step.flow_id, step.token)
                for step, text in zip(steps, output_jsons, strict=True) if step.flow is not None]
    if not finished:
        return set()
    if is_sqlite() and not _SQLITE_UPDATE_FROM:
        return {row[0] for row in finished if finish_held_result(row[0], row[1], now, row[2], row[3], worker_pid,
                                                                 row[4], node_id)}
    done, running, stamp = DONE, RUNNING, encode("finished_at", now)
    recorded: set[int] = set()
    for start in range(0, len(finished), 128):  # 5 parameters a row: far below any backend's limit
        chunk = finished[start:start + 128]
        values = [value for result_id, text, started_at, flow_id, token in chunk
                  for value in (result_id, text, encode("started_at", started_at), flow_id, token)]
        if is_sqlite():  # rows of NULLs after the steps: they match no attempt
            size = padded(len(chunk))
            values += [None] * (5 * (size - len(chunk)))
            sql = _FINISH_MANY_SQLITE.format(marks=", ".join(["(?, ?, ?, ?, ?)"] * size))
            params = [done, stamp, *values, running, RUNNING, worker_pid, node_id]
        else:
            sql = _FINISH_MANY_POSTGRES.format(marks=", ".join([_POSTGRES_ROW] * len(chunk)))
            params = [*values, RUNNING, worker_pid, node_id, done, stamp, running]
        recorded.update(int(row[0]) for row in execute(sql, params).fetchall())
    return recorded


# ---------------------------------------------------------------- named selections of the engine
def active_children(parent_id: int) -> list[Row]:
    placeholders = ", ".join("?" * len(ACTIVE_STATES))
    return select_flows(f"parent_id = ? AND state IN ({placeholders})", (parent_id, *ACTIVE_STATES))


def running_admitted(node_id: str | None) -> list[Row]:
    """Flows a worker of this node was running (or about to) when its daemon stopped
    (no node: held before schema v6)."""
    return select_flows("state = ? AND admitted = ? AND (node_id = ? OR node_id IS NULL)",
                        (RUNNING, sql_bool(True), node_id))


def admitted_not_ended(node_id: str | None) -> list[Row]:
    """Flows admitted and not finished (INIT or RUNNING), except those another node's
    worker holds: each needs a queue message."""
    return select_flows("admitted = ? AND state IN (?, ?) AND (worker_pid IS NULL OR node_id IS NULL OR node_id = ?)",
                        (sql_bool(True), INIT, RUNNING, node_id))


def pending_routines() -> set[str]:
    """Routines with flows waiting for admission."""
    rows = execute("SELECT DISTINCT routine FROM flow WHERE admitted = ? AND state = ?",
                   (sql_bool(False), INIT)).fetchall()
    return {row[0] for row in rows}


def retry_waiting() -> list[Row]:
    """Admitted flows no worker holds that wait for a retry (``next_attempt_at``)."""
    return select_flows("state IN (?, ?) AND admitted = ? AND worker_pid IS NULL AND next_attempt_at IS NOT NULL",
                        (INIT, RUNNING, sql_bool(True)))


def waiting_flows() -> list[Row]:
    """Flows WAITING for an MQTT message."""
    return select_flows("state = ? AND wait_topic IS NOT NULL", (WAITING,))


def waiting_topics() -> set[str]:
    rows = execute("SELECT DISTINCT wait_topic FROM flow WHERE state = ? AND wait_topic IS NOT NULL",
                   (WAITING,)).fetchall()
    return {row[0] for row in rows}


def anything_expired(now: dt.datetime) -> bool:
    """Whether some wait or some unheld flow is past its time (one cheap query)."""
    stamp = encode("wait_until", now)
    placeholders = ", ".join("?" * len(ACTIVE_STATES))
    return execute(f"SELECT 1 FROM flow WHERE (state = ? AND wait_until <= ?) OR (state IN ({placeholders}) "
                   "AND deadline <= ? AND worker_pid IS NULL) LIMIT 1",
                   (WAITING, stamp, *ACTIVE_STATES, stamp)).fetchone() is not None


def expired_waits(now: dt.datetime) -> list[Row]:
    return select_flows("state = ? AND wait_until <= ?", (WAITING, encode("wait_until", now)))


def overdue_unheld(now: dt.datetime) -> list[Row]:
    """Active flows past their routine's deadline that no worker holds."""
    placeholders = ", ".join("?" * len(ACTIVE_STATES))
    return select_flows(f"state IN ({placeholders}) AND deadline <= ? AND worker_pid IS NULL",
                        (*ACTIVE_STATES, encode("deadline", now)))


def delete_result(result_id: int) -> None:
    execute("DELETE FROM task_result WHERE id = ?", (result_id,))


def restamp_running(result_ids: list[int], now: dt.datetime) -> None:
    """Move the ``started_at`` of attempts still RUNNING to ``now``."""
    stamp = encode("started_at", now)
    for start in range(0, len(result_ids), 500):
        chunk = result_ids[start:start + 500]
        execute(f"UPDATE task_result SET started_at = ? WHERE id IN ({', '.join('?' * len(chunk))}) AND state = ?",
                (stamp, *chunk, RUNNING))


def held_tokens(flow_ids: list[int], worker_pid: int, node_id: str | None) -> dict[int, int]:
    """flow id -> dispatch token of those of ``flow_ids`` RUNNING and held by ``worker_pid`` of ``node_id``."""
    if not flow_ids:
        return {}
    marks = ", ".join("?" * len(flow_ids))
    same = "IS" if is_sqlite() else "="
    rows = execute(f"SELECT id, dispatch_token FROM flow WHERE id IN ({marks}) AND state = ? AND worker_pid = ? "
                   f"AND node_id {same} ?", (*flow_ids, RUNNING, worker_pid, node_id)).fetchall()
    return {int(flow_id): int(token) for flow_id, token in rows}
