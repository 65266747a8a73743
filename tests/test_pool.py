"""The worker processes (forked by the daemon, no pool process) and the daemon-side retry
timer, on a real SQLite file; test_orphans.py kills them."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Broker, wait_for

from flowd import api, catalog
from flowd.config import load_config
from flowd.queue import queue
from flowd.store.models import utcnow


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def done(flow_id: int) -> Any:
    flow = wait_for(lambda: (f := api.get_flow(flow_id)).state in ("DONE", "FAILED", "CANCELLED") and f, 20,
                    message=f"flow {flow_id} to end")
    assert flow.state == "DONE", flow.error
    return flow


def test_the_workers_are_children_of_the_process_that_started_them(worker_pool: Any) -> None:
    # No pool process and no huey scheduler process: the workers are forked here.
    assert len(worker_pool.pids) == worker_pool.config.flowd.workers
    assert sorted(children(os.getpid())) == sorted(worker_pool.pids)
    assert all(children(worker) == [] for worker in worker_pool.pids)


def test_workers_start_with_the_parents_objects_frozen(db: Any, worker_pool: Any) -> None:
    # What the daemon and the pool built before forking stays out of the collector's
    # reach in every worker, so a collection there copies none of the shared pages.
    paths = db.config.flowd.task_paths
    Path(paths[0], "task_gcinfo.py").write_text(
        "import gc\nfrom flowd.task import Task\n\n\nclass Frozen(Task):\n"
        "    def perform(self, **kwargs):\n        return {'frozen': gc.get_freeze_count()}\n")
    catalog.save_task("frozen", "gcinfo.Frozen", task_paths=paths)
    catalog.save_routine("frozen-r", ["frozen"])
    flow = done(api.submit_flow("frozen-r").id)
    assert flow.result["kwargs"]["frozen"] > 10_000


def retry_waiting(db: Any, delay: float, now: dt.datetime) -> tuple[int, int]:
    """A flow whose first attempt failed at ``now`` and that waits ``delay`` s for its retry."""
    paths = db.config.flowd.task_paths
    catalog.save_task("flaky", "t.Fail", task_paths=paths, retries=1, retry_delay=delay)
    catalog.save_routine("flaky-r", ["flaky"])
    flow = api.submit_flow("flaky-r")
    step = db.claim(flow.id, api.get_flow(flow.id).dispatch_token, pid=999_999, now=now)
    assert step is not None
    db.fail_step(step, "boom", 999_999, now=now)
    flow = api.get_flow(flow.id)
    assert flow.next_attempt_at == now + dt.timedelta(seconds=delay)
    queue.flush_queue()  # the submit's message, now stale
    return flow.id, flow.dispatch_token


def test_retry_timer_queues_a_retry_once_when_it_falls_due(db: Any) -> None:
    now = utcnow()
    flow_id, token = retry_waiting(db, 5.0, now)
    timer = queue.RetryTimer(db.config, db.due_retries)
    assert queue.queued_flow_ids() == set()  # not a message before it is due
    assert 4.8 < timer.run_once(now + dt.timedelta(seconds=0.1)) <= 4.9
    assert queue.queued_flow_ids() == set()
    assert timer.run_once(now + dt.timedelta(seconds=5)) == 60.0  # nothing else to wait for
    assert queue.queued_flow_ids() == {(flow_id, token)}
    timer.run_once(now + dt.timedelta(seconds=5.5))  # still due (no worker took it): not sent twice
    assert queue.queue_depth() == 1


def test_retry_timer_skips_a_flow_cancelled_while_it_waited(db: Any) -> None:
    now = utcnow()
    flow_id, _ = retry_waiting(db, 5.0, now)
    db.cancel(flow_id)
    assert db.due_retries(now + dt.timedelta(seconds=10)) == ([], None)


def test_a_retry_runs_on_time(db: Any, worker_pool: Any, tmp_path: Path) -> None:
    # One failure, then the retry: it starts within a few tens of milliseconds of its time.
    paths = db.config.flowd.task_paths
    counter = tmp_path / "count"
    catalog.save_task("flaky", "t.FailTimes", task_paths=paths, retries=1, retry_delay=0.5,
                      options={"counter": str(counter), "times": 1})
    catalog.save_routine("flaky-r", ["flaky"])
    flow = done(api.submit_flow("flaky-r").id)
    first, second = api.flow_trace(flow.id)
    late = (second.started_at - first.finished_at).total_seconds() - 0.5
    assert 0 <= late < 0.25, late


def test_the_daemon_on_sqlite(broker: Broker, config_file: Callable[..., Path], flowd_proc: Callable[..., Any],
                              tmp_path: Path) -> None:
    # flowd run on SQLite: the daemon and its two workers, nothing else; no
    # process loaded the Postgres or Redis driver, nor (without TLS) ssl, nor the schema
    # migrator (the schema is current), yet a task can import and use them; a retry runs
    # on time (the daemon's retry timer).
    path = config_file(broker, workers=2)
    engine = api.configure(load_config(path), create=True)
    paths = engine.config.flowd.task_paths
    Path(paths[0], "task_drivers.py").write_text(
        "import sys\nfrom flowd.task import Task\n\n\nclass Drivers(Task):\n"
        "    def perform(self, **kwargs):\n"
        "        loaded = sorted(n for n in ('psycopg2', 'psycopg', 'redis', 'playhouse.migrate')\n"
        "                        if n in sys.modules)\n"
        "        deferred = sorted(n for n in ('ssl', 'urllib.request') if type(sys.modules[n]).__name__ != 'module')\n"
        "        import psycopg2, redis, ssl, urllib.request  # noqa: F401\n"
        "        return {'loaded_before': loaded, 'deferred_before': deferred,\n"
        "                'url': urllib.request.pathname2url('/a b'), 'tls': ssl.PROTOCOL_TLS_CLIENT.name}\n")
    catalog.save_task("drivers", "drivers.Drivers", task_paths=paths)
    catalog.save_routine("drivers-r", ["drivers"])
    counter = tmp_path / "count"
    catalog.save_task("flaky", "t.FailTimes", task_paths=paths, retries=1, retry_delay=0.5,
                      options={"counter": str(counter), "times": 1})
    catalog.save_routine("flaky-r", ["flaky"])
    daemon = flowd_proc(path)
    wait_for(lambda: "ready" in daemon.log_text(), 30, message="flowd ready")

    # paho's TLS and proxy modules wait for a first use (flowd.service.imports.defer_import), then work.
    seen = done(api.submit_flow("drivers-r").id).result["kwargs"]
    assert {k: seen[k] for k in ("loaded_before", "deferred_before", "url", "tls")} == {
        "loaded_before": [], "deferred_before": ["ssl", "urllib.request"], "url": "/a%20b",
        "tls": "PROTOCOL_TLS_CLIENT"}
    assert "/_ssl." not in Path(f"/proc/{daemon.pid}/maps").read_text(), "the daemon loaded ssl without TLS"
    first, second = api.flow_trace(done(api.submit_flow("flaky-r").id).id)
    assert 0 <= (second.started_at - first.finished_at).total_seconds() - 0.5 < 0.25

    workers = children(daemon.pid)
    assert len(workers) == 2 and all(children(worker) == [] for worker in workers)
    assert daemon.terminate() == 0


def test_a_retry_pending_at_a_kill_9_runs_at_its_time_after_restart(
        broker: Broker, config_file: Callable[..., Path], flowd_proc: Callable[..., Any], tmp_path: Path) -> None:
    # The first attempt fails and the retry is due in 3 s; flowd is killed -9 meanwhile
    # and started again: the retry runs once, at its time, not before (the timer reads
    # the due time from the database at start; no queue message carried it).
    path = config_file(broker, workers=2)
    engine = api.configure(load_config(path), create=True)
    counter = tmp_path / "count"
    catalog.save_task("flaky", "t.FailTimes", task_paths=engine.config.flowd.task_paths, retries=1, retry_delay=3,
                      options={"counter": str(counter), "times": 1})
    catalog.save_routine("flaky-r", ["flaky"])
    daemon = flowd_proc(path)
    flow_id = api.submit_flow("flaky-r").id
    due = wait_for(lambda: api.get_flow(flow_id).next_attempt_at, 30, message="the retry to be set")
    daemon.kill9()
    daemon = flowd_proc(path)
    flow = done(flow_id)
    assert counter.read_text().splitlines() == ["attempt:1", "attempt:2"]
    late = (api.flow_trace(flow.id)[1].started_at - due).total_seconds()
    assert 0 <= late < 0.5, late
    assert daemon.terminate() == 0

