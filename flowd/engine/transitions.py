"""The engine's named checks on a flow: claimable, held by, the retry wait, the time
limit. The table of the moves its state may make is ``flowd.states.TRANSITIONS``; the
store checks every state it writes against it."""

from __future__ import annotations

import datetime as dt

from flowd.states import INIT, RUNNING
from flowd.store import Row
from flowd.store.models import utcnow

RUNNABLE = frozenset({INIT, RUNNING})  # what a queue message may start a step of


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
