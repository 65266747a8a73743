"""What people and the daemon read about flows: listings, traces, counts, the reaper's candidates.

Named reads for the api, flowctl, the service's status line and the reaper; each
returns ``Row`` objects (or plain numbers), never peewee model instances.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from flowd.store.flows import select_flows
from flowd.store.models import FlowState, StepState
from flowd.store.rows import RESULT_COLUMNS, Row, decode, encode_time, execute, is_sqlite, rows, sql_bool

_RESULT_SELECT = "SELECT " + ", ".join(f'"{c}"' for c in RESULT_COLUMNS) + " FROM task_result"


def _marks(values: tuple[Any, ...]) -> str:
    return ", ".join("?" * len(values))


def list_flows(state: str | None = None, routine: str | None = None, limit: int = 50,
               before: int | None = None) -> list[Row]:
    """Newest flows first, optionally of one state and one routine; ``before``: ids below it."""
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if before is not None:
        where.append("id < ?")
        params.append(before)
    if state:
        where.append("state = ?")
        params.append(state)
    if routine:
        where.append("routine = ?")
        params.append(routine)
    return select_flows(" AND ".join(where), params, f"ORDER BY id DESC LIMIT {int(limit)}")


def child_flows(parent_id: int) -> list[Row]:
    """The sub-flows a flow started, oldest first."""
    return select_flows("parent_id = ?", (parent_id,))


def flow_trace(flow_id: int) -> list[Row]:
    """Every attempt of every step of a flow, in order."""
    return rows(execute(_RESULT_SELECT + " WHERE flow_id = ? ORDER BY position, attempt", (flow_id,)),
                RESULT_COLUMNS)


def latest_attempt(flow_id: int, position: int) -> tuple[int, str | None]:
    """(attempt number, state) of the latest attempt of a step; (0, None) before its first."""
    row = execute("SELECT attempt, state FROM task_result WHERE flow_id = ? AND position = ? "
                  "ORDER BY attempt DESC LIMIT 1", (flow_id, position)).fetchone()
    return (int(row[0]), str(row[1])) if row else (0, None)


def count_flows_by_state(states: Iterable[str] | None = None) -> dict[str, int]:
    """How many flows are in each state (every state of ``states``, or of FlowState, is a key)."""
    wanted = tuple(states) if states is not None else tuple(s.value for s in FlowState)
    counts = dict.fromkeys(wanted, 0)
    if states is None:
        found = execute("SELECT state, COUNT(*) FROM flow GROUP BY state")
    else:
        found = execute(f"SELECT state, COUNT(*) FROM flow WHERE state IN ({_marks(wanted)}) GROUP BY state", wanted)
    for state, count in found.fetchall():
        counts[str(state)] = int(count)
    return counts


def count_failed_since(since: dt.datetime) -> int:
    """How many flows ended FAILED at or after ``since``."""
    return int(execute("SELECT COUNT(*) FROM flow WHERE state = ? AND finished_at >= ?",
                       (FlowState.FAILED.value, encode_time(since))).fetchone()[0])


_ATTEMPT_COLUMNS = ("id", "flow_id", "position", "task", "worker_pid", "started_at", "routine", "deadline", "timeout")


def running_attempts(node_id: str | None) -> list[Row]:
    """Attempts that a live worker of this node should be running (a pid means nothing on
    another node; None: the one node of SQLite): the attempt (id, flow_id, position, task,
    worker_pid, started_at), its flow's routine and deadline, its task's timeout."""
    same = "IS" if is_sqlite() else "="
    cursor = execute("SELECT r.id, r.flow_id, r.position, r.task, r.worker_pid, r.started_at, f.routine, f.deadline, "
                     "t.timeout FROM task_result r JOIN flow f ON f.id = r.flow_id "
                     "LEFT JOIN task t ON t.name = r.task "
                     f"WHERE r.state = ? AND f.state = ? AND r.worker_pid IS NOT NULL AND f.node_id {same} ? "
                     "ORDER BY r.id", (StepState.RUNNING.value, FlowState.RUNNING.value, node_id))
    return [Row({name: decode(name, value) for name, value in zip(_ATTEMPT_COLUMNS, raw, strict=True)})
            for raw in cursor.fetchall()]


def unheld_flows(quiet_since: dt.datetime) -> list[Row]:
    """Admitted INIT/RUNNING flows no worker holds, unchanged since ``quiet_since`` and not
    waiting for a retry after it (id, dispatch_token): candidates for a lost queue message."""
    stamp = encode_time(quiet_since)
    cursor = execute("SELECT id, dispatch_token FROM flow WHERE admitted = ? AND state IN (?, ?) "
                     "AND worker_pid IS NULL AND updated_at < ? AND (next_attempt_at IS NULL OR next_attempt_at < ?) "
                     "ORDER BY id", (sql_bool(True), FlowState.INIT.value, FlowState.RUNNING.value, stamp, stamp))
    return [Row({"id": int(flow_id), "dispatch_token": int(token)}) for flow_id, token in cursor.fetchall()]
