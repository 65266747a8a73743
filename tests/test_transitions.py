"""The engine's table of flow transitions, walked on a real SQLite database.

Every move the table allows is made once through the engine's own operations (claim,
finish, fail, wait, event, expiry, cancel, retry), and the states seen before and after
each must be exactly the table; a move it does not list is refused and writes nothing.
The steps are driven from this process, as a worker would (no worker pool: the queue
messages stay in the queue).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from typing import Any

import pytest

from flowd import api, catalog, store
from flowd.states import TRANSITIONS, IllegalTransition, check_transition
from flowd.store.models import FlowState, utcnow, write_transaction

PID = os.getpid()  # the engine never signals its own process: a cancel here interrupts nothing


class Walk:
    """Runs engine operations on flows and records each (state before, state after)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.seen: set[tuple[str, str]] = set()

    def state(self, flow_id: int) -> str:
        return str(api.get_flow(flow_id).state)

    def do(self, flow_id: int, operation: Any) -> Any:
        before = self.state(flow_id)
        value = operation()
        after = self.state(flow_id)
        if before != after or before in ("RUNNING",):
            self.seen.add((before, after))
        return value

    def submit(self, routine: str) -> int:
        return int(api.submit_flow(routine, total=1).id)

    def claim(self, flow_id: int) -> Any:
        token = api.get_flow(flow_id).dispatch_token
        step = self.do(flow_id, lambda: self.engine.claim(flow_id, token, PID))
        assert step is not None, f"flow {flow_id} could not be claimed"
        return step


@pytest.fixture
def walk(db: Any) -> Walk:
    paths = db.config.flowd.task_paths
    catalog.save_task("add", "t.Add", task_paths=paths)
    catalog.save_routine("one", ["add"])
    catalog.save_routine("two", ["add", "add"])
    catalog.save_routine("queued", ["add"], mode="queued")
    return Walk(db)


OUTPUT = {"args": [], "kwargs": {"total": 2}}


def test_every_allowed_transition_is_taken_and_nothing_else(walk: Walk) -> None:
    engine = walk.engine

    # INIT -> RUNNING -> RUNNING (next step) -> DONE
    flow = walk.submit("two")
    step = walk.claim(flow)
    nxt = walk.do(flow, lambda: engine.finish_step(step, OUTPUT, PID))
    walk.do(flow, lambda: engine.finish_step(nxt, OUTPUT, PID))
    assert walk.state(flow) == "DONE"

    # INIT -> CANCELLED -> INIT (retry)
    flow = walk.submit("one")
    walk.do(flow, lambda: engine.cancel(flow))
    walk.do(flow, lambda: engine.retry(flow))

    # RUNNING -> FAILED (no retries left) -> INIT (retry)
    flow = walk.submit("one")
    step = walk.claim(flow)
    walk.do(flow, lambda: engine.fail_step(step, "broken", PID))
    assert walk.state(flow) == "FAILED"
    walk.do(flow, lambda: engine.retry(flow))

    # RUNNING -> CANCELLED
    flow = walk.submit("one")
    walk.claim(flow)
    walk.do(flow, lambda: engine.cancel(flow))

    # RUNNING -> WAITING -> RUNNING (an event, a step left) ... WAITING -> DONE (an event at the last step)
    flow = walk.submit("two")
    step = walk.claim(flow)
    walk.do(flow, lambda: engine.wait_step(step, PID, "test/go", None, None))
    walk.do(flow, lambda: engine.deliver_event("test/go", {"n": 1}))
    step = walk.claim(flow)
    walk.do(flow, lambda: engine.wait_step(step, PID, "test/last", None, None))
    walk.do(flow, lambda: engine.deliver_event("test/last", {"n": 2}))
    assert walk.state(flow) == "DONE"

    # WAITING -> FAILED (the wait timed out), WAITING -> CANCELLED
    flow = walk.submit("one")
    step = walk.claim(flow)
    walk.do(flow, lambda: engine.wait_step(step, PID, "test/never", None, 5))
    walk.do(flow, lambda: engine.expire(utcnow() + dt.timedelta(seconds=10)))
    assert walk.state(flow) == "FAILED"
    flow = walk.submit("one")
    step = walk.claim(flow)
    walk.do(flow, lambda: engine.wait_step(step, PID, "test/never", None, None))
    walk.do(flow, lambda: engine.cancel(flow))

    # INIT -> FAILED: a flow still waiting for admission, past a deadline
    first, second = walk.submit("queued"), walk.submit("queued")
    assert walk.state(second) == "INIT" and not api.get_flow(second).admitted
    with write_transaction():
        store.update_flow(store.get_flow(second), deadline=utcnow() - dt.timedelta(seconds=1))
    walk.do(second, lambda: engine.expire())
    assert walk.state(first) == "INIT"

    allowed = {(str(old), str(new)) for old, news in TRANSITIONS.items() for new in news}
    assert walk.seen == allowed, (f"not taken: {sorted(allowed - walk.seen)}; "
                                  f"outside the table: {sorted(walk.seen - allowed)}")


def test_a_move_outside_the_table_is_refused_and_writes_nothing(walk: Walk) -> None:
    engine = walk.engine
    flow_id = walk.submit("one")
    step = walk.claim(flow_id)
    engine.finish_step(step, OUTPUT, PID)
    done = store.get_flow(flow_id)
    assert done is not None and done.state == "DONE"
    refused = f"flow {flow_id} cannot move from DONE to RUNNING"
    with pytest.raises(IllegalTransition, match=refused), write_transaction():
        store.update_flow(done, state="RUNNING", position=0)
    after = api.get_flow(flow_id)
    assert (after.state, after.position) == ("DONE", 0)

    forbidden = [(old, new) for old, new in itertools.product(FlowState, FlowState) if new not in TRANSITIONS[old]]
    assert len(forbidden) == 36 - sum(len(news) for news in TRANSITIONS.values())
    for old, new in forbidden:
        with pytest.raises(IllegalTransition):
            check_transition(1, str(old), str(new))
