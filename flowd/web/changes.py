"""What ``/metrics`` counts, read from the database: standard library only.

Steps run in worker processes and flows change state there, so the daemon's process
cannot count them as they happen. Each scrape reads what changed since the previous
one instead (through :mod:`flowd.api`): flows and step attempts newer than the last id
seen, plus those that had not ended then. The first reading is the baseline, taken
when the daemon starts: the console's libraries (prometheus_client among them) are
imported only at the first connection, and what ran before it is still counted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flowd import api
from flowd.store.models import ENDED_STATES


@dataclass
class Counted:
    """What started and ended since the previous :meth:`Changes.read`."""

    started: list[str] = field(default_factory=list)                  # routine, per flow
    ended: list[tuple[str, str]] = field(default_factory=list)        # (routine, state), per end
    took: list[tuple[str, str, float]] = field(default_factory=list)  # (routine, task, seconds), per attempt


class Changes:
    """The ids seen at the previous reading; :meth:`read` returns what is new since.

    >>> changes = Changes()      # with api configured: the baseline, counted from now on
    >>> counted = changes.read()
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flow_cursor: int | None = None
        self._open_flows: set[int] = set()
        self._attempt_cursor: int | None = None
        self._open_attempts: set[int] = set()
        self._ended_last: dict[int, str | None] = {}
        self.read()  # the baseline: what exists now is not counted

    def read(self) -> Counted:
        """What started and ended since the previous reading; a flow retried and ended
        again counts again, the same end seen twice counts once."""
        with self._lock:
            counted = Counted()
            touched = self._read_attempts(counted)
            self._read_flows(counted, touched)
            return counted

    def _read_attempts(self, counted: Counted) -> set[int]:
        # Attempts first: a flow with new attempts may have been retried after it ended,
        # so it is looked at again even though it was not open at the previous reading.
        baseline = self._attempt_cursor is None
        attempts, newest = api.attempt_changes(self._attempt_cursor, self._open_attempts)
        running: set[int] = set()
        touched: set[int] = set()
        for attempt_id, flow_id, routine, task, took in attempts:
            if self._flow_cursor is not None and flow_id <= self._flow_cursor:
                touched.add(flow_id)  # newer flows are read anyway
            if took is None:
                running.add(attempt_id)
            elif not baseline:
                counted.took.append((routine, task, took))
        # Rows committed between reading the newest id and the query came too: never count them twice.
        self._open_attempts = running
        self._attempt_cursor = max([newest, *(a[0] for a in attempts)])
        return touched

    def _read_flows(self, counted: Counted, touched: set[int]) -> None:
        baseline = self._flow_cursor is None
        rows, newest = api.flow_changes(self._flow_cursor, self._open_flows | touched)
        still_open: set[int] = set()
        ended: dict[int, str | None] = {}
        for flow_id, routine, state, finished_at in rows:
            if self._flow_cursor is not None and flow_id > self._flow_cursor:
                counted.started.append(routine)
            if state not in ENDED_STATES:
                still_open.add(flow_id)
                continue
            ended[flow_id] = finished_at
            if not baseline and self._ended_last.get(flow_id, "") != finished_at:
                counted.ended.append((routine, state))
        self._open_flows, self._ended_last = still_open, ended
        self._flow_cursor = max([newest, *(r[0] for r in rows)])
