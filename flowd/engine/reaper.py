"""Periodic checks the daemon runs about once a second.

- waits and whole-flow deadlines that have passed (``Engine.expire``);
- steps past their hard timeout whose worker did not stop them: the worker process is
  killed (the daemon starts another) and the attempt fails as timed out;
- attempts whose worker died (killed, crashed): recorded as interrupted and re-queued;
  only this node's: a process id means nothing on another machine;
- flows of other nodes whose lease has expired (several nodes, SPEC 10): taken over;
- flows whose queue message was lost (a crash between commit and enqueue);
- pruning of ended flows past ``retention``, once an hour.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from collections.abc import Callable

from flowd import api, store
from flowd.api import is_process_alive
from flowd.config import Config
from flowd.engine.engine import Engine
from flowd.engine.lease import is_shared_database
from flowd.engine.transitions import time_limit
from flowd.queue import queue
from flowd.store import nodes
from flowd.store.models import utcnow, write_transaction

log = logging.getLogger(__name__)

KILL_GRACE_S = 2.0
LOST_MESSAGE_AGE_S = 30.0
ORPHAN_CHECK_EVERY_S = 30.0
PRUNE_EVERY_S = 3600.0


class Reaper:
    """Keeps time-based promises that no worker is there to keep."""

    def __init__(self, config: Config, engine: Engine):
        self.config = config
        self.engine = engine
        self._next_orphan_check = time.monotonic() + ORPHAN_CHECK_EVERY_S
        self._next_prune = time.monotonic() + 60.0
        self.shared = is_shared_database(config)
        # Called with (node id, MQTT client id) of a node whose lease expired, once across
        # the nodes: the daemon's bridge ends that node's broker session.
        self.on_session_taken: Callable[[str, str], None] | None = None

    def run_once(self, now: dt.datetime | None = None) -> None:
        now = now or utcnow()
        if self.shared:
            self.take_over_expired(now)
        self.engine.expire(now)
        self.stop_overdue_steps(now)
        if time.monotonic() >= self._next_orphan_check:
            self._next_orphan_check = time.monotonic() + ORPHAN_CHECK_EVERY_S
            self.requeue_lost(now)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
            removed = api.prune(self.config.flowd.retention, now)
            if removed:
                log.info("pruned %d flow(s) that ended more than %.0f days ago", removed,
                         self.config.flowd.retention / 86400)

    def stop_overdue_steps(self, now: dt.datetime) -> int:
        """Kill workers stuck past their step's timeout; fail attempts of dead workers."""
        touched = 0
        alive: dict[int, bool] = {}  # per worker, not per attempt: a few workers hold every running step
        for attempt in store.running_attempts(self.engine.node_id):
            pid = attempt.worker_pid or 0
            limit = time_limit(attempt.timeout, attempt.deadline, attempt.started_at)
            if pid not in alive:
                alive[pid] = is_process_alive(pid)
            if not alive[pid]:
                touched += self.engine.fail_attempt(attempt.flow_id, attempt.id,
                                                    f"interrupted: worker process {pid} died", None,
                                                    interrupted=True, now=now)
            elif limit is not None and (now - attempt.started_at).total_seconds() > limit + KILL_GRACE_S:
                log.warning("flow %d step %d (%s): still running %.0fs past its %.0fs timeout; killing worker %d",
                            attempt.flow_id, attempt.position + 1, attempt.task,
                            (now - attempt.started_at).total_seconds() - limit, limit, pid,
                            extra={"FLOW_ID": attempt.flow_id, "ROUTINE": attempt.routine, "TASK": attempt.task})
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                touched += self.engine.fail_attempt(attempt.flow_id, attempt.id,
                                                    f"timed out after {limit:g}s (the worker was stopped)", None,
                                                    now=now)
        return touched

    def take_over_expired(self, now: dt.datetime) -> int:
        """Take over the flows of every other node whose lease has expired; returns how many."""
        taken = 0
        for node_id in nodes.expired_nodes(self.config.flowd.node_id):
            flow_ids = self.engine.take_over(node_id, now)
            if flow_ids:
                shown = ", ".join(str(i) for i in flow_ids[:20]) + (" ..." if len(flow_ids) > 20 else "")
                log.warning("node %s: its lease expired; node %s took over its %d running flow(s): %s", node_id,
                            self.config.flowd.node_id, len(flow_ids), shown)
                taken += len(flow_ids)
            if self.on_session_taken is not None:
                with write_transaction():
                    client_id = nodes.claim_session(node_id, self.config.flowd.node_id)
                if client_id is not None:
                    self.on_session_taken(node_id, client_id)
        if taken:
            # Messages the dead node's workers had taken from the queue but not claimed yet
            # are gone with it: do not wait LOST_MESSAGE_AGE_S for them.
            self.requeue_lost(now, age=self.config.flowd.lease)
        return taken

    def requeue_lost(self, now: dt.datetime, age: float = LOST_MESSAGE_AGE_S) -> int:
        """Queue again admitted flows that nobody holds and no queue message names
        (unchanged for ``age`` seconds: a message is sent just after its commit)."""
        candidates = store.unheld_flows(now - dt.timedelta(seconds=age))
        if not candidates:
            return 0
        queued = queue.queued_flow_ids()
        requeued = 0
        for flow in candidates:
            if (flow.id, flow.dispatch_token) not in queued and self.engine.requeue(flow.id, flow.dispatch_token, now):
                log.warning("flow %d: its queue message was lost; queued again", flow.id)
                requeued += 1
        return requeued
