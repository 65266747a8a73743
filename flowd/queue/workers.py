"""The daemon's worker processes: huey's worker loop, forked by the daemon itself.

The daemon forks its workers before it starts any thread, so they share every page it
had then (modules, configuration) and no pool process sits between them: a process of
its own costs its private pages and keeps the original of every page the others write
(issue 12 measured 2.6 MiB for huey's consumer in a pool process). The daemon's loop
calls :meth:`WorkerPool.replace_dead` every second. A dead worker (killed by the reaper
for a step past its hard timeout, crashed) is replaced by a *fresh interpreter*: by then
the daemon runs threads, and a forked copy of a threaded process can inherit a lock
that another thread held at that instant (SQLite's allocator mutex, for one) and hang
for ever. The new worker gets the daemon's configuration, the stop flag and the
queue's wake socket as inherited file descriptors.

Every worker dies with the daemon (``PR_SET_PDEATHSIG``), so a kill -9 of the daemon
leaves none behind. A stop is graceful first: the stop flag ends each worker's loop once
its message is done, running steps get ``grace`` seconds, then SIGTERM interrupts them
(the attempt is recorded as interrupted), and 5 s later SIGKILL ends whatever is left.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flowd.config import Config
from flowd.service import libc
from flowd.service.wakeup import WakeSocket

if TYPE_CHECKING:
    from flowd.queue import queue

# flowd.queue.queue (huey, peewee) is imported inside the functions: a replacement worker must
# first read its configuration to know which drivers to leave out (imports.import_for).

log = logging.getLogger(__name__)

INTERRUPT_WAIT_S = 5.0  # after SIGTERM, before SIGKILL
QUICK_DEATH_S = 10.0  # a worker that dies younger than this is replaced after a pause...
MAX_RESTART_PAUSE_S = 60.0  # ...that doubles up to this
_REPLACEMENT_CODE = "from flowd.queue.workers import main; raise SystemExit(main())"


class StopFlag:
    """Set once by the daemon, seen by every worker: a pipe whose read end becomes
    readable (huey's ForkSafeFlag, whose ends can also be handed to a new interpreter).
    A worker's idle wait selects on :attr:`fd`, so setting the flag wakes it at once."""

    def __init__(self, read_fd: int | None = None):
        if read_fd is None:
            self.fd, self._write_fd = os.pipe()
        else:
            self.fd, self._write_fd = read_fd, -1

    def set(self) -> None:
        if self._write_fd >= 0 and not self.is_set():
            os.write(self._write_fd, b"x")

    def is_set(self) -> bool:
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def reader(self) -> StopFlag:
        """This flag as a worker holds it: the read end only, so the daemon's death
        (its write end closing) sets it too."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
        return StopFlag(self.fd)

    def close(self) -> None:
        for fd in (self.fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._write_fd = -1


@dataclass
class _Worker:
    pid: int
    started: float = field(default_factory=time.monotonic)
    spawned: subprocess.Popen[bytes] | None = None  # a replacement (fresh interpreter)

    def exit_status(self) -> int | None:
        """The wait status once the process has ended (reaped here), else None."""
        if self.spawned is not None:
            code = self.spawned.poll()
            return None if code is None else (-code if code < 0 else code << 8)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        return status if pid else None


class WorkerPool:
    """``workers`` processes running flows, and the RetryTimer thread that queues retries.

    Start it before the daemon starts any thread (it forks). ``due`` lists the retries
    (default: ``Engine.due_retries`` on this process's database).

    >>> pool = WorkerPool(config); pool.start(); ...; pool.replace_dead(); ...; pool.stop(grace=30)
    """

    def __init__(self, config: Config, due: queue.DueRetries | None = None):
        self.config = config
        self.due = due
        self.retries: queue.RetryTimer | None = None
        self.workers: list[_Worker | None] = []
        self.stop_flag: StopFlag | None = None
        self.wake: WakeSocket | None = None
        self._pause: list[float] = []  # per worker slot: the pause before its next replacement
        self._not_before: list[float] = []

    @property
    def pids(self) -> list[int]:
        """The pids of the workers running now."""
        return [w.pid for w in self.workers if w is not None]

    def start(self) -> None:
        from flowd.queue import queue

        self.stop_flag = StopFlag()
        if self.config.queue.backend == "sqlite":
            self.wake = WakeSocket(self.config.state_dir / queue.WAKE_SOCKET_NAME)
        from flowd.engine import batch, runner  # noqa: F401 - imported once, shared by the forked workers

        sys.stdout.flush()
        sys.stderr.flush()
        freeze_for_fork()
        self.workers = [_Worker(self._fork()) for _ in range(self.config.flowd.workers)]
        self._pause = [0.0] * len(self.workers)
        self._not_before = [0.0] * len(self.workers)
        if self.due is None:
            from flowd.engine.engine import Engine

            self.due = Engine(self.config, enqueue=queue.enqueue_flow).due_retries
        self.retries = queue.RetryTimer(self.config, self.due)
        self.retries.start()
        log.info("worker pool started: %d process workers (pids %s)", len(self.workers),
                 ", ".join(map(str, self.pids)))

    def replace_dead(self) -> int:
        """Reap the workers that ended and start one in the place of each; how many.

        A worker that dies young (it cannot start: the database is gone, a broken
        installation) is replaced after a pause that doubles up to a minute, not every second.
        """
        replaced = 0
        now = time.monotonic()
        for index, worker in enumerate(self.workers):
            if worker is None:
                if now < self._not_before[index]:
                    continue
            else:
                status = worker.exit_status()
                if status is None:
                    continue
                lived = now - worker.started
                self._pause[index] = 0.0 if lived >= QUICK_DEATH_S else min(max(2 * self._pause[index], 1.0),
                                                                            MAX_RESTART_PAUSE_S)
                self._not_before[index] = now + self._pause[index]
                log.warning("worker %d (pid %d) %s after %.0fs; starting another%s", index + 1, worker.pid,
                            _describe(status), lived,
                            f" in {self._pause[index]:.0f}s" if self._pause[index] else "")
                self.workers[index] = None
                if self._pause[index]:
                    continue
            try:
                self.workers[index] = self._spawn()
            except OSError as exc:
                log.error("cannot start a worker: %s; trying again in a second", exc)
                continue
            replaced += 1
        return replaced

    def stop(self, grace: float) -> None:
        """Graceful stop: running steps get ``grace`` seconds, then they are interrupted."""
        if self.retries is not None:
            self.retries.stop()
            self.retries = None
        if self.stop_flag is None:
            return
        self.stop_flag.set()
        if not self._wait_all(grace):
            log.warning("%d worker(s) still running steps after %.0fs; interrupting them", len(self.pids), grace)
            self._signal_all(signal.SIGTERM)
            if not self._wait_all(INTERRUPT_WAIT_S):
                log.warning("worker(s) %s did not stop within %.0fs; killing them", self.pids, INTERRUPT_WAIT_S)
                self._signal_all(signal.SIGKILL)
                self._wait_all(INTERRUPT_WAIT_S)
        self.workers = []
        self.stop_flag.close()
        self.stop_flag = None
        if self.wake is not None:
            self.wake.close(unlink=False)
            self.wake = None

    # ------------------------------------------------------------------ internals
    def _wait_all(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            self.workers = [w for w in self.workers if w is not None and w.exit_status() is None]
            if not self.workers:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _signal_all(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _fork(self) -> int:
        assert self.stop_flag is not None
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if die_with_parent(parent):
                    from flowd.store.models import reconnect_after_fork

                    reconnect_after_fork()  # SQLite handles are per process
                    code = serve(self.config, self.stop_flag.reader(), self.wake)
            except BaseException:
                log.exception("worker crashed")
            finally:
                os._exit(code)
        return pid

    def _spawn(self) -> _Worker:
        """A replacement worker: a new interpreter (safe to start from a threaded process)."""
        assert self.stop_flag is not None
        config_r, config_w = os.pipe()
        try:
            fds = [config_r, self.stop_flag.fd] + ([self.wake.fileno()] if self.wake is not None else [])
            proc = subprocess.Popen([sys.executable, "-c", _REPLACEMENT_CODE, str(os.getpid()), *map(str, fds)],
                                    pass_fds=fds, stdin=subprocess.DEVNULL)
            os.write(config_w, pickle.dumps(self.config))  # a few KiB: within a pipe's buffer
        finally:
            os.close(config_r)
            os.close(config_w)
        return _Worker(proc.pid, spawned=proc)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def die_with_parent(parent: int) -> bool:
    """Ask the kernel to SIGKILL this process when ``parent`` dies; False when it is gone
    already (then nobody would ever stop this process)."""
    libc.die_with_parent_signal()
    return os.getppid() == parent


def freeze_for_fork() -> None:
    """Before a fork: put every object alive now out of the collector's reach.

    A collection writes to the header of each object it examines, which copies every
    page a forked child shares with its parent; frozen objects are never examined.
    What exists before the fork (modules, configuration) lives as long as the process.
    """
    gc.collect()
    gc.freeze()


def _ignore_daemon_signals() -> None:
    """SIGHUP (reload) and SIGINT (a terminal's Ctrl-C, sent to the whole group) are the
    daemon's business; it stops its workers through the stop flag."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def serve(config: Config, stop: StopFlag, wake: WakeSocket | None) -> int:
    """A worker's life: huey's worker loop on this process's huey instance until ``stop``."""
    from huey.consumer import ProcessEnvironment, Worker

    from flowd.engine import runner
    from flowd.queue import queue

    _ignore_daemon_signals()
    huey = queue.configure_queue(config)
    if isinstance(huey.storage, queue.WakeableSqliteStorage):
        huey.storage.wake_socket = wake
        huey.storage.stop_fd = stop.fd
        huey.storage.heap_trimmer = libc.HeapTrimmer()
    logging.getLogger("huey").setLevel(logging.WARNING)
    worker = Worker(huey, stop, default_delay=0.1, max_delay=10.0, backoff=1.15)
    # huey's own set-up of a process worker: SIGINT (a terminal's Ctrl-C) and SIGHUP are
    # the daemon's; SIGTERM interrupts a running task (KeyboardInterrupt), or is ignored.
    ProcessEnvironment().init_child(worker)
    runner.init_worker(config, stop, enqueue=queue.enqueue_flow, enqueue_many=queue.enqueue_flows,
                       take_waiting=queue.take_waiting_flows)
    libc.trim_heap()  # what the start-up freed
    try:
        while not stop.is_set():
            worker.loop()
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """A replacement worker's entry (``python -c``): daemon pid, then the inherited
    descriptors of the configuration pipe, the stop flag and the wake socket."""
    from flowd.service.imports import import_for
    from flowd.service.logs import setup_logging

    libc.use_one_malloc_arena()
    _ignore_daemon_signals()
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    parent, config_fd, stop_fd = args[:3]
    if not die_with_parent(parent):
        return 1
    with os.fdopen(config_fd, "rb") as pipe:
        config: Config = pickle.load(pipe)
    import_for(config)
    setup_logging(config)
    from flowd.queue.queue import WAKE_SOCKET_NAME
    from flowd.store.migrations import init_database

    init_database(config.database)
    wake = WakeSocket.adopt(config.state_dir / WAKE_SOCKET_NAME, args[3]) if len(args) > 3 else None
    return serve(config, StopFlag(stop_fd), wake)
