"""What the engine hands around: the effects of a transaction, admission counts, a
submission and a claimed step (plain data, no database access but ``Slots``' counts)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowd import store
from flowd.mqtt.status import Status
from flowd.store import Row

# (flow id, dispatch token, delay): a delay is always the flow's stored next_attempt_at
# minus now, so the queue may take the time from the database (queue.RetryTimer).
Enqueue = Callable[[int, int, float | None], None]
EnqueueMany = Callable[[list[tuple[int, int]]], None]


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    enqueue: list[tuple[int, int, float | None]] = field(default_factory=list)
    signal_pids: list[int] = field(default_factory=list)
    published: bool = False
    statuses: list[Status] = field(default_factory=list)  # sent after the commit
    slots: Slots = field(default_factory=lambda: Slots())

    def extend(self, other: Effects) -> None:
        self.enqueue.extend(other.enqueue)
        self.signal_pids.extend(other.signal_pids)
        self.published = self.published or other.published
        self.statuses.extend(other.statuses)


@dataclass
class Slots:
    """What one transaction has learnt about its routines' admission, so a batch of
    submits or step completions asks the database once per routine, not once per flow.

    Every flow the transaction admits, ends or leaves pending updates it; nothing else
    writes flows while the transaction holds the write lock.
    """

    active: dict[str, int] = field(default_factory=dict)   # admitted, not ended
    pending: dict[str, bool] = field(default_factory=dict)  # some flow waits for admission

    def count_active(self, routine: str) -> int:
        if routine not in self.active:
            self.active[routine] = store.count_active(routine)
        return self.active[routine]

    def has_pending(self, routine: str) -> bool:
        if routine not in self.pending:
            self.pending[routine] = store.has_pending(routine)
        return self.pending[routine]

    def admitted(self, routine: str) -> None:
        if routine in self.active:
            self.active[routine] += 1

    def ended(self, routine: str) -> None:
        if routine in self.active:
            self.active[routine] -= 1

    def left_pending(self, routine: str) -> None:
        self.pending[routine] = True


@dataclass(frozen=True)
class Submission:
    """One request to start a flow (``Engine.submit_many``)."""

    routine: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    reply_to: str | None = None
    correlation_data: str | None = None
    trigger: str = "api"
    require_mqtt: bool = False


@dataclass
class ClaimedStep:
    """A step a worker holds: everything it needs to run it without more queries."""

    flow_id: int
    flow_uid: str
    routine: str
    token: int
    steps: list[str]
    position: int
    attempt: int
    task_result_id: int
    task_name: str
    script: str | None
    options: dict[str, Any]
    timeout: float | None
    args: list[Any]
    kwargs: dict[str, Any]
    results: list[dict[str, Any]]
    deadline: dt.datetime | None
    started_at: dt.datetime | None = None  # set by the runner when perform() really starts
    # The flow as this worker last wrote it: a held flow changes only through its holder
    # (a cancel or a takeover changes its token, worker or state, which the next write checks).
    flow: Row | None = field(default=None, repr=False, compare=False)
    # The output's JSON text, encoded once when the runner checked it: stored as this
    # attempt's output and as the next attempt's input without encoding it again.
    output_json: str | None = field(default=None, repr=False, compare=False)
