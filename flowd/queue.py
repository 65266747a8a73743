"""The huey queue that hands flows to worker processes, and the worker pool.

A queue message is only "run flow N with dispatch token T" (see engine.Flow); the
database holds everything else. Workers do not poll: the SQLite storage blocks on a
Unix datagram socket that every enqueue pokes (``wakeup``), so a new flow is picked
up in well under a millisecond and an idle worker costs nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from huey import Huey
from huey.consumer import Consumer
from huey.storage import SqliteStorage

from flowd.config import Config
from flowd.errors import StoreUnavailable
from flowd.wakeup import WakeSocket, send_wakeup

log = logging.getLogger(__name__)

WAKE_SOCKET_NAME = "wake-queue.sock"
RUN_FLOW_TASK = "flowd.run_flow"
_IDLE_WAIT_S = 10.0  # an idle worker's longest sleep; enqueues and the stop flag wake it at once


class WakeableSqliteStorage(SqliteStorage):  # type: ignore[misc]
    """SqliteHuey storage whose empty-queue wait is a blocking read on a wake socket.

    ``blocking = True`` tells huey's worker loop not to sleep between empty dequeues;
    the wait happens here instead, and ends as soon as an enqueue sends a datagram.
    """

    blocking = True

    def __init__(self, *args: Any, wake_path: str = "", **kwargs: Any):
        self.wake_path = wake_path
        self.wake_socket: WakeSocket | None = None
        self.stop_fd: int | None = None
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

    def dequeue(self) -> bytes | None:
        data: bytes | None = super().dequeue()
        if data is None and self.wake_socket is not None and self.wake_socket.wait(_IDLE_WAIT_S, self.stop_fd):
            data = super().dequeue()
        return data


_huey: Huey | None = None
_run_flow_task: Any = None


def configure_queue(config: Config) -> Huey:
    """Create this process's huey instance for ``config`` and register the flow task."""
    global _huey, _run_flow_task
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
    _huey = huey
    return huey


def get_huey() -> Huey:
    if _huey is None:
        raise RuntimeError("flowd.queue.configure_queue() was not called in this process")
    return _huey


def _run_flow(flow_id: int, token: int) -> None:
    from flowd import runner

    runner.run_flow(flow_id, token)


def enqueue_flow(flow_id: int, token: int, delay: float | None = None) -> None:
    """Ask a worker to run flow ``flow_id`` (after ``delay`` seconds for a retry)."""
    get_huey()
    if delay and delay > 0:
        _run_flow_task.schedule(args=(flow_id, token), delay=delay)
    else:
        _run_flow_task(flow_id, token)


def queue_depth() -> int:
    """Messages waiting in the queue, scheduled retries included."""
    huey = get_huey()
    return int(huey.pending_count()) + int(huey.scheduled_count())


def queued_flow_ids() -> set[tuple[int, int]]:
    """(flow_id, token) of every message waiting in the queue or the schedule."""
    huey = get_huey()
    found: set[tuple[int, int]] = set()
    for task in list(huey.pending()) + list(huey.scheduled()):
        if task.name.endswith(RUN_FLOW_TASK) and len(task.args) == 2:
            found.add((int(task.args[0]), int(task.args[1])))
    return found


def flush_queue() -> None:
    """Drop every queued message (recovery re-queues from the database)."""
    get_huey().storage.flush_all()


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerPool:
    """huey's consumer with process workers, in a process forked from the daemon.

    Fork it before the daemon starts any thread: huey restarts a dead worker by
    forking the pool process, which must then be single-threaded.

    >>> pool = WorkerPool(config); pool.start(); ...; pool.stop(grace=30)
    """

    def __init__(self, config: Config):
        self.config = config
        self.pid: int | None = None

    def start(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent()
                code = _run_pool(self.config)
            except BaseException:
                log.exception("worker pool crashed")
            finally:
                os._exit(code)
        self.pid = pid
        log.info("worker pool started: pid %d, %d process workers", pid, self.config.flowd.workers)

    def is_alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0

    def stop(self, grace: float) -> None:
        """Graceful stop: running steps get ``grace`` seconds, then they are interrupted."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + grace + 5
        while time.monotonic() < deadline:
            if not self.is_alive():
                self.pid = None
                return
            time.sleep(0.05)
        log.warning("worker pool did not stop within %.0fs; killing it", grace + 5)
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.pid = None


class _PoolConsumer(Consumer):  # type: ignore[misc]
    """huey's Consumer minus its SIGHUP "re-exec myself" (the daemon handles SIGHUP)."""

    def _set_signal_handlers(self) -> None:
        self._signal_actions.pop(signal.SIGHUP, None)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        super()._set_signal_handlers()


def _run_pool(config: Config) -> int:
    """Body of the pool process: a huey consumer whose workers wake on the socket."""
    from flowd import models, runner

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    models.reconnect_after_fork()
    huey = configure_queue(config)
    wake = None
    if isinstance(huey.storage, WakeableSqliteStorage):
        wake = WakeSocket(config.state_dir / WAKE_SOCKET_NAME)
        huey.storage.wake_socket = wake
    stop_flag_holder: dict[str, Any] = {}

    @huey.on_startup()  # type: ignore[untyped-decorator]
    def _worker_started() -> None:
        _die_with_parent()
        models.reconnect_after_fork()
        runner.init_worker(config, stop_flag_holder.get("flag"))

    consumer = _PoolConsumer(huey, workers=config.flowd.workers, worker_type="process", periodic=False,
                             check_worker_health=True, health_check_interval=1, scheduler_interval=1,
                             shutdown_timeout=config.flowd.shutdown_grace)
    stop_flag_holder["flag"] = consumer.stop_flag
    if wake is not None:
        huey.storage.stop_fd = consumer.stop_flag._r  # huey's ForkSafeFlag is a pipe: wake on stop
    logging.getLogger("huey").setLevel(logging.WARNING)
    consumer.run()
    if wake is not None:
        wake.close(unlink=False)
    return 0
