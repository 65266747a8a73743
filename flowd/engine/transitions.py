"""The states a flow may move between (SPEC 1), in one table, and the named checks on a flow.

Every change of ``Flow.state`` the engine makes goes through :func:`check_transition`;
a move the table does not list is a bug, refused before anything is written. A new
flow starts in INIT (an insert, not a move). RUNNING -> RUNNING is the next step, a
retry or an interrupted attempt queued again; WAITING -> DONE is a last step whose wait
or sub-flow ended; FAILED or CANCELLED -> INIT is ``flowctl retry``.
"""

from __future__ import annotations

import datetime as dt

from flowd.errors import FlowdError
from flowd.store import Row
from flowd.store.models import FlowState, utcnow

INIT, RUNNING, WAITING = FlowState.INIT, FlowState.RUNNING, FlowState.WAITING
DONE, FAILED, CANCELLED = FlowState.DONE, FlowState.FAILED, FlowState.CANCELLED

TRANSITIONS: dict[FlowState, frozenset[FlowState]] = {
    INIT: frozenset({RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({RUNNING, WAITING, DONE, FAILED, CANCELLED}),
    WAITING: frozenset({RUNNING, DONE, FAILED, CANCELLED}),
    DONE: frozenset(),
    FAILED: frozenset({INIT}),
    CANCELLED: frozenset({INIT}),
}
ENDED = frozenset({DONE, FAILED, CANCELLED})
RUNNABLE = frozenset({INIT, RUNNING})  # what a queue message may start a step of


class IllegalTransition(FlowdError):
    """The engine tried a move the table does not allow (a bug, not a user's mistake)."""


def check_transition(flow: Row, new: str) -> None:
    """Refuse ``flow``'s move to ``new`` unless the table allows it."""
    old = flow.state
    if new not in TRANSITIONS[FlowState(old)]:
        raise IllegalTransition(f"flow {flow.id} cannot move from {old} to {new}")


def is_claimable(flow: Row | None, token: int) -> bool:
    """A queue message for ``flow`` with ``token`` may start its step: the message is the
    latest (token), the flow admitted, runnable, and no worker holds it."""
    return (flow is not None and flow.dispatch_token == token and bool(flow.admitted)
            and flow.state in RUNNABLE and not flow.worker_pid)


def is_held_by(flow: Row | None, pid: int, node_id: str | None, token: int) -> bool:
    """The worker ``pid`` of node ``node_id`` still holds ``flow`` through the message with
    ``token`` (not cancelled, taken over or queued again since)."""
    return (flow is not None and flow.state == RUNNING and flow.worker_pid == pid and flow.node_id == node_id
            and flow.dispatch_token == token)


def retry_wait(flow: Row, now: dt.datetime) -> float | None:
    """Seconds until the flow's retry falls due (None: due now, or no retry waiting)."""
    if flow.next_attempt_at and flow.next_attempt_at > now:
        return float((flow.next_attempt_at - now).total_seconds())
    return None


def time_limit(timeout: float | None, deadline: dt.datetime | None, since: dt.datetime | None = None, *,
               floor: float = 0.0) -> float | None:
    """Seconds an attempt started at ``since`` (default: now) may run: its task's
    ``timeout``, cut by its flow's ``deadline`` (never below ``floor``); None: no limit."""
    limits = [float(timeout)] if timeout else []
    if deadline is not None:
        limits.append(max((deadline - (since or utcnow())).total_seconds(), floor))
    return min(limits) if limits else None
