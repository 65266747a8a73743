"""Several flows per queue message: breadth-first rounds, group commit, slow steps released."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from conftest import wait_for

from flowd import api, catalog
from flowd.engine.batch import _watchdog, run_batch
from flowd.engine.engine import Engine, Submission
from flowd.engine.runner import WorkerRuntime
from flowd.loader import ScriptLoader
from flowd.store import models
from flowd.store.models import Flow, TaskResult

ENDED = ("DONE", "FAILED", "CANCELLED")


def three_steps(paths: tuple[str, ...], middle: str = "t.Nothing", **options: Any) -> None:
    catalog.save_task("first", "t.Tuple", task_paths=paths)
    catalog.save_task("middle", middle, task_paths=paths, options=options)
    catalog.save_task("last", "t.Results", task_paths=paths)
    catalog.save_routine("three", ["first", "middle", "last"], max=1000)


def test_a_burst_runs_in_a_few_transactions_not_one_per_step(db: Any) -> None:
    # 60 flows admitted in one transaction travel as one message per worker; each worker
    # claims its flows in one transaction and commits each round of steps in one more:
    # 2 x (1 + 3) transactions for 180 steps, where one flow per message needed 240.
    paths = db.config.flowd.task_paths
    three_steps(paths)
    messages: list[list[tuple[int, int]]] = []
    engine = Engine(db.config, enqueue=lambda *a: messages.append([(a[0], a[1])]), enqueue_many=messages.append)
    outcomes = engine.submit_many([Submission("three", [i], {"n": i}) for i in range(60)])
    assert len(messages) == db.config.flowd.workers == 2
    assert sorted(pair for message in messages for pair in message) == sorted(
        (row.id, row.dispatch_token) for row, _ in outcomes)  # type: ignore[misc]
    rt = WorkerRuntime(db.config, engine, ScriptLoader(paths))
    before = models.write_transactions
    for message in messages:
        run_batch(rt, message, os.getpid())
    used = models.write_transactions - before
    assert used <= 2 * (1 + 3), used
    flows = list(Flow.select())
    assert [f.state for f in flows] == ["DONE"] * 60
    assert all(f.result["kwargs"]["position"] == 2 for f in flows)
    steps = [(r.position, r.attempt, r.state) for r in TaskResult.select().order_by(TaskResult.id)]
    assert len(steps) == 180 and {s[2] for s in steps} == {"DONE"}
    # The trace keeps each step's own run: started when perform() began, in order.
    for flow in flows:
        trace = api.flow_trace(flow.id)
        assert all(a.finished_at <= b.started_at for a, b in itertools.pairwise(trace))


def test_a_stale_or_repeated_message_runs_nothing_twice(db: Any) -> None:
    paths = db.config.flowd.task_paths
    three_steps(paths)
    messages: list[list[tuple[int, int]]] = []
    engine = Engine(db.config, enqueue=lambda *a: messages.append([(a[0], a[1])]), enqueue_many=messages.append)
    engine.submit_many([Submission("three") for _ in range(4)])
    rt = WorkerRuntime(db.config, engine, ScriptLoader(paths))
    for message in messages + messages:
        run_batch(rt, message, os.getpid())
    assert TaskResult.select().count() == 12
    assert [f.state for f in Flow.select()] == ["DONE"] * 4


def _fast_rate(engine: Engine, groups: int, size: int, timeout: float) -> float:
    """Submit ``groups`` groups of ``size`` fast flows, one group whenever the last one
    has ended; fast flows ended per second."""
    start = time.monotonic()
    for _ in range(groups):
        outcomes = engine.submit_many([Submission("fast") for _ in range(size)])
        ids = [row.id for row, _ in outcomes]  # type: ignore[misc]
        wait_for(lambda ids=ids: Flow.select().where(Flow.id.in_(ids), Flow.state.in_(ENDED)).count() == len(ids),
                 timeout, 0.005, "a group of fast flows to end")
    return groups * size / (time.monotonic() - start)


def test_a_slow_step_holds_nobody_hostage(db: Any, worker_pool: Any) -> None:
    # workers = 2. A flow whose step sleeps 10 s arrives in the same message as fast
    # flows; the worker that runs it hands the others back to the queue, and the other
    # worker keeps fast flows completing at no less than about half the unloaded rate.
    paths = db.config.flowd.task_paths
    catalog.save_task("quick", "t.Nothing", task_paths=paths)
    catalog.save_task("slow", "t.Sleep", task_paths=paths, options={"seconds": 10})
    catalog.save_routine("fast", ["quick", "quick", "quick"], max=1000)
    catalog.save_routine("slow", ["slow"])
    _fast_rate(db, 3, 10, 20)  # warm up both workers
    unloaded = _fast_rate(db, 15, 10, 20)
    outcomes = db.submit_many([Submission("slow")] + [Submission("fast") for _ in range(9)])
    slow_id = outcomes[0][0].id  # type: ignore[index]
    wait_for(lambda: TaskResult.select().where(TaskResult.flow == slow_id, TaskResult.state == "RUNNING").exists(),
             10, message="the slow step to start")
    loaded = _fast_rate(db, 15, 10, 20)
    assert api.get_flow(slow_id).state == "RUNNING", "the slow step ended before the measurement did"
    print(f"fast flows per second: unloaded {unloaded:.0f}, with a 10 s step running {loaded:.0f}")
    assert loaded >= 0.4 * unloaded, (loaded, unloaded)
    # Its batch's fast flows were not kept waiting for the slow step either.
    fast_ids = [row.id for row, _ in outcomes[1:]]  # type: ignore[misc]
    assert Flow.select().where(Flow.id.in_(fast_ids), Flow.state == "DONE").count() == 9


def test_messages_with_several_flows_are_seen_by_the_lost_message_check(db: Any) -> None:
    # The reaper re-queues an admitted flow only when no queue message names it: a
    # message that carries several flows names each of them. A worker that takes one
    # message merges those already waiting (never waits for more). A retry that is not
    # due is no message at all: the retry timer queues it from Flow.next_attempt_at.
    from flowd.queue import queue

    queue.flush_queue()
    queue.enqueue_flows([(1, 5), (2, 6)])
    queue.enqueue_flow(3, 7)
    queue.enqueue_flow(4, 8, delay=60)
    assert queue.queued_flow_ids() == {(1, 5), (2, 6), (3, 7)}
    assert queue.queue_depth() == 2
    assert sorted(queue._take_waiting([(9, 1)])) == [(1, 5), (2, 6), (3, 7), (9, 1)]
    assert queue.queued_flow_ids() == set()
    queue.flush_queue()


def test_claimed_steps_never_look_overdue_before_they_start(db: Any) -> None:
    # 120 flows in one message, each step 20 ms: the last step of a round starts ~2.4 s
    # after the round was claimed. The reaper kills a worker whose attempt has run past
    # its task's timeout (+ grace) by started_at; an attempt that is only claimed must
    # not look as if it had been running since the claim.
    import threading

    paths = db.config.flowd.task_paths
    catalog.save_task("nap", "t.Sleep", task_paths=paths, options={"seconds": 0.02}, timeout=1)
    catalog.save_routine("naps", ["nap"], max=1000)
    messages: list[list[tuple[int, int]]] = []
    engine = Engine(db.config, enqueue=lambda *a: messages.append([(a[0], a[1])]), enqueue_many=messages.append)
    engine.submit_many([Submission("naps") for _ in range(120)])
    pending = [[pair for message in messages for pair in message]]
    messages.clear()
    oldest: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = models.utcnow()
            ages = [(now - r.started_at).total_seconds() for r in TaskResult.select().where(
                TaskResult.state == "RUNNING")]
            oldest.append(max(ages, default=0.0))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rt = WorkerRuntime(db.config, engine, ScriptLoader(paths))
    try:
        while pending:
            for message in pending:
                run_batch(rt, message, os.getpid())
            # The watchdog may still be handing flows back: wait for it, and take its
            # messages by popping (it appends from its own thread).
            _watchdog(rt).settle()
            pending = [messages.pop(0) for _ in range(len(messages))]
    finally:
        stop.set()
        sampler.join()
    assert [f.state for f in Flow.select()] == ["DONE"] * 120
    assert len(oldest) > 20 and max(oldest) < 1.0, max(oldest)


def test_a_long_queue_is_not_read_again_at_every_flows_end(db: Any) -> None:
    # 200 flows of a routine with 2 slots: each end admits at most the free slots, and
    # reads no more waiting flows than that (it read the whole queue: quadratic in a burst).
    paths = db.config.flowd.task_paths
    catalog.save_task("one", "t.Nothing", task_paths=paths)
    catalog.save_routine("narrow", ["one"], max=2)
    messages: list[list[tuple[int, int]]] = []
    engine = Engine(db.config, enqueue=lambda *a: messages.append([(a[0], a[1])]), enqueue_many=messages.append)
    engine.submit_many([Submission("narrow") for _ in range(200)])
    pending_limits: list[int] = []

    def trace(sql: str) -> None:
        if "FROM flow WHERE routine" in sql and "ORDER BY id LIMIT" in sql:  # store.pending_flows
            pending_limits.append(int(sql.rsplit("LIMIT", 1)[1].split()[0]))

    models.database.obj.connection().set_trace_callback(trace)
    rt = WorkerRuntime(db.config, engine, ScriptLoader(paths))
    try:
        while messages:
            run_batch(rt, messages.pop(0), os.getpid())
    finally:
        models.database.obj.connection().set_trace_callback(None)
    assert [f.state for f in Flow.select()] == ["DONE"] * 200
    assert pending_limits and max(pending_limits) <= 3, sorted(set(pending_limits))


def test_a_round_loads_a_reference_once_and_the_next_round_sees_the_changed_file(tmp_path: Any) -> None:
    script = tmp_path / "task_roundy.py"
    script.write_text("from flowd.task import Task\n\nclass A(Task):\n    n = 1\n")
    loader = ScriptLoader([str(tmp_path)])
    loader.new_round()
    first = loader.load("roundy.A")
    script.write_text("from flowd.task import Task\n\nclass A(Task):\n    n = 22\n")  # another size: another stamp
    assert loader.load("roundy.A") is first  # the round looked at the file once
    loader.new_round()
    second = loader.load("roundy.A")
    assert second is not first and (first.n, second.n) == (1, 22)  # type: ignore[attr-defined]
    loader.end_rounds()
    script.write_text("from flowd.task import Task\n\nclass A(Task):\n    n = 333\n")
    assert loader.load("roundy.A").n == 333  # type: ignore[attr-defined]


def test_a_submitted_flow_is_stored_as_the_row_it_returns(db: Any) -> None:
    # Every column goes in the INSERT, the unset ones as NULL: reading the row back
    # gives the flow the submit returned, column for column.
    from flowd import store

    three_steps(db.config.flowd.task_paths)
    engine = Engine(db.config, enqueue=lambda *a: None, enqueue_many=lambda pairs: None)
    outcomes = engine.submit_many([Submission("three"), Submission("three", [1], {"n": {}}, "req-1", "reply/x", "0a")])
    for outcome in outcomes:
        flow, created = outcome  # type: ignore[misc]
        stored = store.get_flow(flow.id)
        assert created and stored is not None and vars(stored) == vars(flow)
    first = store.get_flow(outcomes[0][0].id)  # type: ignore[index]
    assert first is not None and first.request_id is None and first.reply_to is None and first.args == []
    assert first.kwargs == {} and first.result is None and first.node_id is None and first.parent_id is None
