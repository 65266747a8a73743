"""The huey queue that hands flows to worker processes (:mod:`flowd.queue.workers`).

A queue message is only "run flows N... with dispatch tokens T..." (see engine.Flow):
one flow, or the flows admitted together in one transaction; the database holds
everything else. Workers do not poll: the SQLite storage blocks on a
Unix datagram socket that every enqueue pokes (``wakeup``), so a new flow is picked
up in well under a millisecond and an idle worker costs nothing.

A retry is not a message until it is due: the flow's ``next_attempt_at`` is the
schedule, and the daemon's ``RetryTimer`` queues it on time. huey's own schedule
needs a scheduler process of its own and is checked once a second.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huey import Huey
from huey.storage import SqliteStorage

from flowd.config import Config
from flowd.errors import StoreUnavailable
from flowd.service.libc import HeapTrimmer
from flowd.service.wakeup import WakeSocket, send_wakeup
from flowd.store.models import utcnow

log = logging.getLogger(__name__)

WAKE_SOCKET_NAME = "wake-queue.sock"
RETRY_SOCKET_NAME = "wake-retry.sock"
RUN_FLOW_TASK = "flowd.run_flow"
RUN_FLOWS_TASK = "flowd.run_flows"
MAX_FLOWS_PER_RUN = 64  # a worker merges waiting messages into the one it took, up to this many flows
_IDLE_WAIT_S = 10.0  # an idle worker's longest sleep; enqueues and the stop flag wake it at once
_RETRY_RECHECK_S = 60.0  # the retry timer reads the database at least this often


class WakeableSqliteStorage(SqliteStorage):  # type: ignore[misc]
    """SqliteHuey storage whose empty-queue wait is a blocking read on a wake socket.

    ``blocking = True`` tells huey's worker loop not to sleep between empty dequeues;
    the wait happens here instead, and ends as soon as an enqueue sends a datagram.
    A worker going idle after a busy spell first hands its free heap back (``heap_trimmer``).
    """

    blocking = True

    def __init__(self, *args: Any, wake_path: str = "", **kwargs: Any):
        self.wake_path = wake_path
        self.wake_socket: WakeSocket | None = None
        self.stop_fd: int | None = None
        self.heap_trimmer: HeapTrimmer | None = None
        super().__init__(*args, **kwargs)

    def _create_connection(self) -> Any:
        # WAL + NORMAL: a power cut may lose the last messages (recovery queues every
        # admitted flow again from flowd's tables at start) but never corrupts the file.
        # huey's fsync=False would mean synchronous = OFF, whose checkpoints can.
        conn = super()._create_connection()
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def enqueue(self, data: bytes, priority: float | None = None) -> None:
        super().enqueue(data, priority)
        send_wakeup(self.wake_path)

    def dequeue_waiting(self) -> bytes | None:
        """A message already in the queue, or None at once (never waits)."""
        data: bytes | None = super().dequeue()
        return data

    def dequeue(self) -> bytes | None:
        data: bytes | None = super().dequeue()
        if data is None and self.wake_socket is not None:
            if self.heap_trimmer is not None:
                self.heap_trimmer.idle_point(known_idle=True)
            if self.wake_socket.wait(_IDLE_WAIT_S, self.stop_fd):
                data = super().dequeue()
        return data


_huey: Huey | None = None
_run_flow_task: Any = None
_run_flows_task: Any = None
_retry_wake_path = ""


def configure_queue(config: Config) -> Huey:
    """Create this process's huey instance for ``config`` and register the flow task."""
    global _huey, _run_flow_task, _run_flows_task, _retry_wake_path
    q = config.queue
    if q.backend == "redis":
        from huey import RedisHuey
        from huey.exceptions import ConfigurationError

        try:
            huey: Huey = RedisHuey(q.name, url=q.url, results=False, blocking=True, read_timeout=1)
        except ConfigurationError as exc:
            raise StoreUnavailable(f"the Redis queue cannot be used: {exc}") from exc
    else:
        Path(q.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        old_umask = os.umask(0o077)
        try:
            huey = Huey(q.name, results=False, storage_class=WakeableSqliteStorage, filename=q.path,
                        timeout=15, wake_path=str(config.state_dir / WAKE_SOCKET_NAME))
            huey.storage.conn  # noqa: B018 - create the file now, with this umask
        finally:
            os.umask(old_umask)
    _run_flow_task = huey.task(name=RUN_FLOW_TASK)(_run_flow)
    _run_flows_task = huey.task(name=RUN_FLOWS_TASK)(_run_flows)
    _huey = huey
    _retry_wake_path = str(config.state_dir / RETRY_SOCKET_NAME)
    return huey


def get_huey() -> Huey:
    if _huey is None:
        raise RuntimeError("flowd.queue.queue.configure_queue() was not called in this process")
    return _huey


def _run_flow(flow_id: int, token: int) -> None:
    from flowd.engine import batch  # in a worker only: the daemon never runs a step

    batch.run_flows(_take_waiting([(flow_id, token)]))


def _run_flows(pairs: list[list[int]]) -> None:
    from flowd.engine import batch

    batch.run_flows(_take_waiting([(int(flow_id), int(token)) for flow_id, token in pairs]))


def _flows_of(task: Any) -> list[tuple[int, int]] | None:
    if task.name.endswith(RUN_FLOW_TASK) and len(task.args) == 2:
        return [(int(task.args[0]), int(task.args[1]))]
    if task.name.endswith(RUN_FLOWS_TASK) and len(task.args) == 1:
        return [(int(flow_id), int(token)) for flow_id, token in task.args[0]]
    return None


def _take_waiting(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Add the flows of messages already waiting (never wait for more): under load the
    batches a worker commits together grow by themselves."""
    return pairs + take_waiting_flows(MAX_FLOWS_PER_RUN - len(pairs))


def take_waiting_flows(limit: int) -> list[tuple[int, int]]:
    """(flow id, token) of queue messages already waiting, taken off the queue, about
    ``limit`` flows at most (a message is never split); never waits. A worker between
    two rounds of its batch adds them to it (:mod:`flowd.engine.batch`). If the worker dies
    before it claims them, the daemon's reaper queues them again (lost messages)."""
    huey = get_huey()
    storage = huey.storage
    pairs: list[tuple[int, int]] = []
    if not isinstance(storage, WakeableSqliteStorage):
        return pairs
    while len(pairs) < limit:
        data = storage.dequeue_waiting()
        if data is None:
            break
        task = huey.deserialize_task(data)
        more = _flows_of(task)
        if more is None or not huey.ready_to_run(task):
            if task.eta:  # not due yet: into the schedule, as huey's consumer does
                huey.add_schedule(task)
            else:
                storage.enqueue(data)
            break
        pairs.extend(more)
    return pairs


def enqueue_flow(flow_id: int, token: int, delay: float | None = None) -> None:
    """Ask a worker to run flow ``flow_id``; with ``delay`` (a retry, already committed as
    the flow's ``next_attempt_at``), the daemon's RetryTimer queues it when it is due."""
    get_huey()
    if delay and delay > 0:
        send_wakeup(_retry_wake_path)  # re-read the next due time; no daemon: recovery queues it at start
    else:
        _run_flow_task(flow_id, token)


def enqueue_flows(pairs: list[tuple[int, int]]) -> None:
    """Ask one worker to run several flows together (one queue message)."""
    get_huey()
    if len(pairs) == 1:
        _run_flow_task(*pairs[0])
    elif pairs:
        _run_flows_task([[flow_id, token] for flow_id, token in pairs])


def queue_depth() -> int:
    """Messages waiting in the queue (retries not yet due wait in the database)."""
    huey = get_huey()
    return int(huey.pending_count()) + int(huey.scheduled_count())


def queued_flow_ids() -> set[tuple[int, int]]:
    """(flow_id, token) of every message waiting in the queue (or in huey's schedule,
    which flowd no longer fills)."""
    huey = get_huey()
    found: set[tuple[int, int]] = set()
    for task in list(huey.pending()) + list(huey.scheduled()):
        found.update(_flows_of(task) or ())
    return found


def flush_queue() -> None:
    """Drop every queued message (recovery re-queues from the database)."""
    get_huey().storage.flush_all()


DueRetries = Callable[[dt.datetime], tuple[list[tuple[int, int]], dt.datetime | None]]


class RetryTimer:
    """Queues each flow whose retry falls due, on time, from a thread of the daemon.

    ``due(now)`` lists the flows due and the next due time (``Engine.due_retries``).
    The database is the schedule: whoever commits a retry sends a datagram to
    ``wake-retry.sock`` (``enqueue_flow``), and the timer reads the next due time
    again, so a retry is queued within milliseconds of its time. A message that was
    sent once is not sent again while the flow stays due (a busy pool); the reaper
    still queues a flow whose message was lost.

    >>> timer = RetryTimer(config, engine.due_retries); timer.start(); ...; timer.stop()
    """

    def __init__(self, config: Config, due: DueRetries):
        self.config = config
        self.due = due
        self._sent: set[tuple[int, int]] = set()
        self._wake: WakeSocket | None = None
        self._stopping = threading.Event()
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._wake = WakeSocket(self.config.state_dir / RETRY_SOCKET_NAME)
        self._thread = threading.Thread(target=self._run, name="flowd-retries", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._stop_w.send(b"!")
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        self._stop_r.close()
        self._stop_w.close()

    def run_once(self, now: dt.datetime | None = None) -> float:
        """Queue the retries due at ``now`` (once each); seconds until the next one."""
        now = now or utcnow()
        due, later = self.due(now)
        for flow_id, token in due:
            if (flow_id, token) not in self._sent:
                enqueue_flow(flow_id, token)
        self._sent = set(due)
        if later is None:
            return _RETRY_RECHECK_S
        return min(max((later - now).total_seconds(), 0.0), _RETRY_RECHECK_S)

    def _run(self) -> None:
        from flowd.store import models

        assert self._wake is not None
        failing = False
        try:
            while not self._stopping.is_set():
                try:
                    wait = self.run_once()
                    failing = False
                except Exception:
                    if not failing:
                        log.exception("retry timer: cannot read the flows waiting for a retry; trying again")
                    failing, wait = True, 1.0
                self._wake.wait(wait, self._stop_r.fileno())
        finally:
            models.database.close()
