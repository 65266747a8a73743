"""Flows stored after the fact, already ended: a foreground run kept with ``--record``."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flowd.store.flows import insert_flow
from flowd.store.rows import encode, execute, is_sqlite


def insert_ended_flow(*, routine: str, steps: list[str], state: str, position: int, args: list[Any],
                      kwargs: dict[str, Any], trigger: str, result: Any, error: str | None,
                      started_at: dt.datetime, finished_at: dt.datetime, parent_id: int | None, depth: int) -> int:
    """A flow that ran elsewhere, stored ended (inside the caller's transaction); its id."""
    return insert_flow({
        "uid": str(uuid.uuid4()), "routine": routine, "steps": steps, "state": state, "position": position,
        "args": args, "kwargs": kwargs, "trigger": trigger, "admitted": True, "dispatch_token": 0, "step_attempt": 0,
        "interruptions": 0, "result": result, "error": error, "created_at": started_at, "started_at": started_at,
        "finished_at": finished_at, "updated_at": finished_at, "parent_id": parent_id, "depth": depth})


def insert_ended_result(flow_id: int, position: int, task: str, attempt: int, state: str, step_input: Any,
                        output: Any, error: str | None, started_at: dt.datetime, finished_at: dt.datetime) -> int:
    """One finished attempt of such a flow (inside the caller's transaction); its id."""
    values = [flow_id, position, task, attempt, state, encode("input", step_input), encode("output", output), error,
              encode("started_at", started_at), encode("finished_at", finished_at)]
    sql = ("INSERT INTO task_result (flow_id, position, task, attempt, state, input, output, error, started_at, "
           "finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    if not is_sqlite():
        return int(execute(sql + " RETURNING id", values).fetchone()[0])
    return int(execute(sql, values).lastrowid)
