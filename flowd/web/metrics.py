"""``/metrics``: the Prometheus families of SPEC 11.

The counters and the histogram take what :class:`flowd.web.changes.Changes` read from
the database since the previous scrape (its baseline is taken when the daemon starts,
before this module is imported); they count what started and ended since the daemon
started, as Prometheus expects of a counter (pruning old flows never lowers them). The
gauges are read at each scrape.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from flowd import api
from flowd.web.changes import Changes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Steps on a device range from a few milliseconds (a reading) to minutes (a download).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


class Metrics:
    """The registry; each scrape adds what ``changes`` read since the previous one.

    >>> metrics = Metrics(changes)  # changes: the Changes taken at start (None: from now on)
    >>> text = metrics.render()      # Prometheus text format
    """

    def __init__(self, changes: Changes | None = None) -> None:
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
        self._changes = changes if changes is not None else Changes()
        self._children: dict[tuple[str, ...], Any] = {}

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
        counted = self._changes.read()
        for routine in counted.started:
            self._child(self.started, routine).inc()
        for routine, state in counted.ended:
            self._child(self.ended, routine, state).inc()
        for routine, task, took in counted.took:
            self._child(self.step_duration, routine, task).observe(took)
