"""Every process of flowd dies with its parent: kill -9 the daemon and no worker lives on,
neither one forked at the start nor one started later in place of a dead one; a stop
sent right after the start, with SIGINT inherited as ignored (nohup, CI runners), still
stops every worker at once."""

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


def daemon_workers(proc: Any, workers: int) -> list[int]:
    """The worker pids of a running daemon (its children), once all of them are up."""
    def found() -> list[int] | None:
        kids = children(proc.pid)
        return kids if len(kids) == workers else None

    pids: list[int] = wait_for(found, timeout=30, message="the daemon's workers")
    return pids


def long_step(engine_config: Any) -> None:
    from flowd import catalog

    catalog.save_task("nap", "t.Sleep", task_paths=engine_config.flowd.task_paths, options={"seconds": 60})
    catalog.save_routine("nap-r", ["nap"])


def running(flow_id: int) -> None:
    from flowd import api

    wait_for(lambda: api.get_flow(flow_id).state == "RUNNING", timeout=20, message=f"flow {flow_id} to run")


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


def test_kill_9_the_daemon_and_nothing_of_it_survives(broker: Broker, config_file: Callable[..., Path],
                                                      flowd_proc: Callable[..., Any]) -> None:
    # Only the daemon's own process is killed (not its process group), while one worker
    # runs a long step and the other waits: the kernel ends both (PR_SET_PDEATHSIG).
    from flowd import api
    from flowd.config import load_config

    path = config_file(broker=broker, workers=2)
    long_step(api.configure(load_config(path), create=True).config)
    proc = flowd_proc(path)
    wait_for(lambda: "ready" in proc.log_text(), timeout=30, message="flowd ready")
    workers = daemon_workers(proc, 2)
    running(api.submit_flow("nap-r").id)
    os.kill(proc.pid, signal.SIGKILL)  # the daemon alone, not its process group
    proc.proc.wait(10)
    wait_for(lambda: not any(is_alive(pid) for pid in workers), timeout=10,
             message=f"the workers {workers} to die with the daemon")
    assert [pid for pid in children(os.getpid()) if pid in workers] == []


def test_killed_workers_are_replaced_and_the_new_ones_die_with_the_daemon(
        broker: Broker, config_file: Callable[..., Path], flowd_proc: Callable[..., Any]) -> None:
    # kill -9 both workers (the OOM killer, the reaper's kill of a stuck step): the daemon
    # starts two others within seconds, flows run on them, and they end with the daemon,
    # even one in the middle of a step.
    from flowd import api, catalog
    from flowd.config import load_config

    path = config_file(broker=broker, workers=2)
    config = api.configure(load_config(path), create=True).config
    long_step(config)
    catalog.save_task("add", "t.Add", task_paths=config.flowd.task_paths)
    catalog.save_routine("add-r", ["add"])
    proc = flowd_proc(path)
    wait_for(lambda: "ready" in proc.log_text(), timeout=30, message="flowd ready")
    first = daemon_workers(proc, 2)
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    replaced = wait_for(lambda: len(c := [p for p in children(proc.pid) if p not in first]) == 2 and c,
                        timeout=10, message="two new workers")
    assert proc.proc.poll() is None
    assert all(f"(pid {pid}) was killed by SIGKILL" in proc.log_text() for pid in first)
    flows = [api.submit_flow("add-r", n=i).id for i in range(4)]
    ended = [wait_for(lambda f=f: (r := api.get_flow(f)).state in ("DONE", "FAILED") and r, timeout=20,
                      message=f"flow {f} to end") for f in flows]
    assert [flow.result["kwargs"]["total"] for flow in ended] == [0, 1, 2, 3]
    ran_on = {step.worker_pid for flow_id in flows for step in api.flow_trace(flow_id)}
    assert ran_on <= set(replaced), ran_on
    running(api.submit_flow("nap-r").id)
    os.kill(proc.pid, signal.SIGKILL)
    proc.proc.wait(10)
    wait_for(lambda: not any(is_alive(pid) for pid in replaced), timeout=10,
             message=f"the new workers {replaced} to die with the daemon")
    assert [pid for pid in children(os.getpid()) if pid in replaced] == []


def test_a_stop_right_after_the_start_works_with_sigint_ignored(db: Any) -> None:
    # Started with SIGINT ignored, the pool is told to stop at once, before its workers
    # have set anything up: they stop gracefully, well within the grace, and leave nothing.
    from flowd.queue.workers import WorkerPool

    mine = set(children(os.getpid()))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = WorkerPool(db.config)
        pool.start()
        pids = pool.pids
        assert len(pids) == db.config.flowd.workers
        started = time.monotonic()
        pool.stop(grace=5)
        took = time.monotonic() - started
    finally:
        signal.signal(signal.SIGINT, previous)
    assert took < 4, f"the stop took {took:.1f}s: the workers missed it and were killed after the grace"
    assert not any(is_alive(pid) for pid in pids)
    wait_for(lambda: set(children(os.getpid())) <= mine, timeout=5, message="no worker left over")
