"""Waiting for a flow to end, from any process: ``api.wait_flow``, ``flowctl flow wait``
and ``submit --wait``.

The database is the truth, the broker the doorbell: the waiter subscribes to the
flow's ``flow/<id>/status`` and ``flow/<id>/result`` (published by whichever node runs
it, after the state behind them is on disk) and reads the flow once each time one
arrives, and once more when the subscription is in place (an end before it is not
missed). A slow check of the database (every 5 s) covers what the broker cannot tell:
a routine with ``status = "off"``, a daemon on another broker.

While the broker cannot be reached, the doorbell is the SQLite file itself: every
commit changes the size or time of its write-ahead log, so the waiter looks at those
(a ``stat``, no query, no lock) five times a second and reads the flow only after a
change. On PostgreSQL it reads once a second.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowd import catalog, store
from flowd.config import Config
from flowd.errors import FlowWaitTimeout, NotFoundError
from flowd.store import Row

CHECK_EVERY_S = 5.0          # with the broker: the slow check of the database
CHECK_OFFLINE_EVERY_S = 1.0  # without it, when there is no SQLite file to watch
FILE_CHECK_EVERY_S = 0.2     # without it: how often the SQLite file's stamp is looked at


@dataclass(frozen=True)
class Progress:
    """Where a flow is: its row, the task of its current step, that step's latest attempt."""

    flow: Row
    task: str
    attempt: int
    attempt_state: str | None
    retries: int


def read_progress(flow_id: int, retries: dict[str, int] | None = None) -> Progress:
    """The flow and its current step's latest attempt; NotFoundError for an unknown id."""
    flow = store.get_flow(flow_id)
    if flow is None:
        raise NotFoundError("flow", flow_id, "list flows with 'flowctl flows'")
    attempt, attempt_state = store.latest_attempt(flow_id, flow.position)
    task_name = flow.steps[flow.position] if flow.position < len(flow.steps) else "?"
    known = retries if retries is not None else {}
    if task_name not in known:
        task = catalog.find_task(task_name)
        known[task_name] = task.retries if task else 0
    return Progress(flow, task_name, attempt, attempt_state, known[task_name])


class FlowWaiter:
    """Follows one flow until it ends.

    >>> with FlowWaiter(config, 12) as waiter:
    ...     flow = waiter.wait(timeout=30, on_progress=print)
    """

    def __init__(self, config: Config, flow_id: int, *, listen: bool = True):
        self.config = config
        self.flow_id = flow_id
        self._woken = threading.Event()
        self._listener: Any = None
        self._was_listening = False
        self._files = _database_files(config)
        self._stamp: tuple[Any, ...] | None = None
        if listen:
            from flowd.mqtt.listener import Listener

            topics = [config.topic(f"flow/{flow_id}/status"), config.topic(f"flow/{flow_id}/result")]
            self._listener = Listener(config, topics, self._on_message)

    def __enter__(self) -> FlowWaiter:
        if self._listener is not None:
            self._listener.start()  # not waited for: the file's stamp serves until it is subscribed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._listener is not None:
            self._listener.close()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self._woken.set()

    @property
    def is_listening(self) -> bool:
        return self._listener is not None and bool(self._listener.is_subscribed())

    def wait(self, timeout: float | None = None, on_progress: Callable[[Progress], None] | None = None,
             on_tick: Callable[[Progress], None] | None = None, tick: float = 1.0) -> Row:
        """The flow once it has ended; FlowWaitTimeout after ``timeout`` s (the flow goes on).

        ``on_progress`` is called at the start and each time the flow was read again
        (a message came, the file changed, or the slow check); ``on_tick`` every ``tick`` s in between,
        with the progress last read (to redraw an elapsed time), without reading.
        """
        started = time.monotonic()
        retries: dict[str, int] = {}
        last_read = 0.0
        progress = None
        while True:
            now = time.monotonic()
            listening = self.is_listening
            subscribed_now = listening and not self._was_listening
            self._was_listening = listening
            interval = CHECK_EVERY_S if listening or self._files else CHECK_OFFLINE_EVERY_S
            stamp = self._stamp if listening else self._file_stamp()
            changed = not listening and stamp != self._stamp
            if progress is None or self._woken.is_set() or subscribed_now or changed or now - last_read >= interval:
                self._woken.clear()
                self._stamp = stamp  # taken before the read: a commit after it shows next time
                last_read = now
                progress = read_progress(self.flow_id, retries)
                if on_progress is not None:
                    on_progress(progress)
                if progress.flow.is_ended:
                    return progress.flow
            elif on_tick is not None:
                on_tick(progress)
            pause = interval - (time.monotonic() - last_read)
            if not listening:
                pause = min(pause, FILE_CHECK_EVERY_S if self._files else CHECK_OFFLINE_EVERY_S)
            if on_tick is not None:
                pause = min(pause, tick)
            if timeout is not None:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    raise FlowWaitTimeout(self.flow_id, timeout, progress.flow.state, progress.flow)
                pause = min(pause, left)
            self._woken.wait(max(pause, 0.0))

    def _file_stamp(self) -> tuple[Any, ...] | None:
        if not self._files:
            return None
        stamp: list[Any] = []
        for path in self._files:
            try:
                info = os.stat(path)
                stamp.append((info.st_size, info.st_mtime_ns, info.st_ino))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)


def _database_files(config: Config) -> tuple[str, ...]:
    """The SQLite database and its write-ahead log, whose stamps change at every commit."""
    from flowd.store.models import sqlite_path

    path = sqlite_path(config.database.url)
    return (str(path), f"{path}-wal") if path is not None else ()
