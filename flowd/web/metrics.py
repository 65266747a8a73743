"""``/metrics``: the Prometheus families of SPEC 11, counted from the database.

Steps run in worker processes and flows change state there, so the daemon's process
cannot count them as they happen. Each scrape reads what changed since the previous
one instead (through :mod:`flowd.api`): flows and step attempts newer than the last id
seen, plus those that had not ended then. Counters therefore count what started and
ended since the daemon started, as Prometheus expects of a counter (pruning old flows
never lowers them); a flow retried and ended again counts again. The gauges are read
at each scrape.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from flowd import api
from flowd.models import ENDED_STATES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Steps on a device range from a few milliseconds (a reading) to minutes (a download).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


class Metrics:
    """The registry and what was seen at the previous scrape.

    >>> metrics = Metrics()      # with api configured: counts from now on
    >>> text = metrics.render()  # Prometheus text format
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.started = Counter("flowd_flows_started", "Flows submitted since flowd started.", ["routine"], registry=r)
        self.ended = Counter("flowd_flows_ended", "Flows that ended (DONE, FAILED, CANCELLED) since flowd started.",
                             ["routine", "state"], registry=r)
        self.step_duration = Histogram("flowd_step_duration_seconds", "How long each attempt of a step took.",
                                       ["routine", "task"], buckets=STEP_BUCKETS, registry=r)
        self.queue_depth = Gauge("flowd_queue_depth", "Messages waiting in the worker queue.", registry=r)
        self.outbox = Gauge("flowd_outbox_messages", "Messages in the outbox, waiting for the broker.", registry=r)
        self.broker = Gauge("flowd_broker_connected", "1 while flowd is connected to its MQTT broker.", registry=r)
        self.database = Gauge("flowd_database_bytes", "Size of the SQLite database and its WAL on disk.", registry=r)
        self._lock = threading.Lock()
        self._flow_cursor: int | None = None
        self._open_flows: set[int] = set()
        self._attempt_cursor: int | None = None
        self._open_attempts: set[int] = set()
        self._ended_last: dict[int, str | None] = {}
        self._children: dict[tuple[str, ...], Any] = {}
        self._count_changes()  # the baseline: what exists now is not counted

    def render(self) -> bytes:
        """Count what changed, read the gauges, and format every family."""
        with self._lock:
            self._count_changes()
            overview = api.node_overview()
            self.queue_depth.set(overview["queue_depth"] or 0)
            self.outbox.set(overview["outbox"])
            self.broker.set(1 if overview["broker_connected"] else 0)
            self.database.set(overview["database_bytes"] or 0)
            return generate_latest(self.registry)

    def _child(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, kept: a busy minute brings thousands of observations."""
        key = (str(id(family)), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def _count_changes(self) -> None:
        # Attempts first: a flow with new attempts may have been retried after it ended,
        # so it is looked at again even though it was not open at the previous scrape.
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
                self._child(self.step_duration, routine, task).observe(took)
        # Rows committed between reading the newest id and the query came too: never count them twice.
        self._open_attempts = running
        self._attempt_cursor = max([newest, *(a[0] for a in attempts)])

        baseline = self._flow_cursor is None
        rows, newest = api.flow_changes(self._flow_cursor, self._open_flows | touched)
        still_open: set[int] = set()
        ended: dict[int, str | None] = {}
        for flow_id, routine, state, finished_at in rows:
            if self._flow_cursor is not None and flow_id > self._flow_cursor:
                self._child(self.started, routine).inc()
            if state not in ENDED_STATES:
                still_open.add(flow_id)
                continue
            ended[flow_id] = finished_at
            # The same end seen twice (it ended just before the previous scrape) counts once.
            if not baseline and self._ended_last.get(flow_id, "") != finished_at:
                self._child(self.ended, routine, state).inc()
        self._open_flows, self._ended_last = still_open, ended
        self._flow_cursor = max([newest, *(r[0] for r in rows)])
