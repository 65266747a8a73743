"""Every process of flowd dies with its parent: kill -9 the pool and no worker lives on;
kill -9 the daemon and neither does the pool; a stop sent before the pool has set up its
signal handlers, with SIGINT inherited as ignored (nohup, CI runners), still stops it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, wait_for

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(autouse=True)
def subreaper() -> Iterator[None]:
    """Make this process the subreaper of what the test starts: an orphan is then our
    child, seen by ``children(os.getpid())``, whatever the machine's init does."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    before = set(children(os.getpid()))
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
    for pid in set(children(os.getpid(), zombies=True)) - before:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def children(pid: int, zombies: bool = False) -> list[int]:
    """The live (or also the dead, unreaped) children of ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and (zombies or fields[0] != "Z"):
            found.append(int(entry))
    return found


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def daemon_tree(proc: Any, workers: int) -> tuple[int, list[int]]:
    """(pool pid, worker pids) of a running daemon, once all its workers are up."""
    def found() -> tuple[int, list[int]] | None:
        pools = children(proc.pid)
        if len(pools) != 1:
            return None
        kids = children(pools[0])
        return (pools[0], kids) if len(kids) == workers else None

    tree: tuple[int, list[int]] = wait_for(found, timeout=30, message="the daemon's pool and workers")
    return tree


def test_the_harness_sees_a_process_tree_and_its_end() -> None:
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        assert children(os.getpid()) == [pid] or pid in children(os.getpid())
        assert is_alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not is_alive(pid) and pid not in children(os.getpid())


def test_kill_9_the_pool_and_no_worker_survives(broker: Broker, config_file: Callable[..., Path],
                                                 flowd_proc: Callable[..., Any]) -> None:
    # The OOM killer takes the pool process: its workers go with it, and the daemon
    # stops (so the service manager restarts it whole) instead of serving without workers.
    proc = flowd_proc(config_file(broker=broker, workers=2))
    wait_for(lambda: "ready" in proc.log_text(), timeout=30, message="flowd ready")
    pool, workers = daemon_tree(proc, 2)
    os.kill(pool, signal.SIGKILL)
    wait_for(lambda: not any(is_alive(pid) for pid in workers), timeout=10,
             message=f"workers {workers} to die with their pool")
    assert proc.proc.wait(30) != 0
    assert "worker pool (pid" in proc.log_text() and "has died" in proc.log_text()
    assert [pid for pid in children(os.getpid()) if pid in workers] == []


def test_kill_9_the_daemon_and_nothing_of_it_survives(broker: Broker, config_file: Callable[..., Path],
                                                      flowd_proc: Callable[..., Any]) -> None:
    proc = flowd_proc(config_file(broker=broker, workers=2))
    wait_for(lambda: "ready" in proc.log_text(), timeout=30, message="flowd ready")
    pool, workers = daemon_tree(proc, 2)
    os.kill(proc.pid, signal.SIGKILL)  # the daemon alone, not its process group
    proc.proc.wait(10)
    wait_for(lambda: not any(is_alive(pid) for pid in [pool, *workers]), timeout=10,
             message="the pool and its workers to die with the daemon")
    assert [pid for pid in children(os.getpid()) if pid in [pool, *workers]] == []


def test_a_stop_before_the_pool_is_ready_works_with_sigint_ignored(db: Any) -> None:
    # Started with SIGINT ignored, the pool is told to stop at once, before huey has
    # set its handlers: it stops gracefully, well within the grace, and leaves nothing.
    from flowd.queue import WorkerPool

    mine = set(children(os.getpid()))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = WorkerPool(db.config)
        pool.start()
        pid = pool.pid
        assert pid is not None
        started = time.monotonic()
        pool.stop(grace=5)
        took = time.monotonic() - started
    finally:
        signal.signal(signal.SIGINT, previous)
    assert took < 4, f"the stop took {took:.1f}s: the SIGINT was lost and the pool killed after the grace"
    assert not is_alive(pid)
    wait_for(lambda: set(children(os.getpid())) <= mine, timeout=5, message="no worker left over")
