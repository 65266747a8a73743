"""Flows that start flows (SPEC 2.1, ``SubFlow``), with the real daemon and broker.

A step returns ``SubFlow(routine, *args, **kwargs)``: the child runs as its own flow
(trigger ``flow``, linked to its parent), the parent is WAITING until it ends, then
continues with the child's result, or fails its step (retries apply) if the child
failed or was cancelled. Scripts are in tests/task_scripts/task_w.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, FlowdProcess, wait_for
from test_waits import Site, show

from flowd import api
from flowd.engine.engine import MAX_SUBFLOW_DEPTH
from flowd.store.models import Flow, TaskResult

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def site(broker: Broker, config_file: Callable[..., Path], session_client: Any,
         flowd_proc: Callable[..., FlowdProcess]) -> Iterator[Site]:
    watcher = session_client(["flow/#", "flowd/#"])
    yield Site(broker, config_file(broker, workers=2), watcher, flowd_proc)
    api.reset()


def children(flow_id: int) -> list[Flow]:
    return list(Flow.select().where(Flow.parent == flow_id).order_by(Flow.id))


def only_child(flow_id: int) -> Flow:
    found = wait_for(lambda: children(flow_id), timeout=30, message=f"a sub-flow of flow {flow_id}")
    assert len(found) == 1, f"flow {flow_id} has {len(found)} sub-flows"
    return found[0]


def test_chain_of_three_passes_results_up_and_shows_its_links(site: Site, flowctl: Run) -> None:
    # top = [mark top, SubFlow(mid), mark after]; mid = [SubFlow(leaf), mark mid];
    # leaf = [mark leaf, wait for chain/+/go]. While the leaf waits, all three are
    # WAITING and flowctl flow show names each link and what the leaf waits for. The
    # event resumes the leaf; each result becomes its parent's next input, so the top
    # result carries every mark in order and the event.
    site.task("mark-top", "w.Mark", options={"label": "top"})
    site.task("mark-after", "w.Mark", options={"label": "after"})
    site.task("mark-mid", "w.Mark", options={"label": "mid"})
    site.task("mark-leaf", "w.Mark", options={"label": "leaf"})
    site.task("spawn-mid", "w.Spawn", options={"child": "mid"})
    site.task("spawn-leaf", "w.Spawn", options={"child": "leaf"})
    site.task("await-go", "w.Await", options={"topic": "chain/+/go", "match": {"go": True}})
    site.routine("top", ["mark-top", "spawn-mid", "mark-after"])
    site.routine("mid", ["spawn-leaf", "mark-mid"])
    site.routine("leaf", ["mark-leaf", "await-go"])
    site.start()

    top = api.submit_flow("top", "x", n=1).id
    mid = only_child(top).id
    leaf = only_child(mid).id
    site.waiting_statuses(leaf)
    site.wait_state(mid, "WAITING")
    site.wait_state(top, "WAITING")
    assert [(f.id, f.depth, f.trigger, f.parent_id) for f in map(site.flow, (top, mid, leaf))] == [
        (top, 0, "api", None), (mid, 1, "flow", top), (leaf, 2, "flow", mid)]
    # The child starts with the spawning step's input.
    assert (site.flow(mid).args, site.flow(mid).kwargs) == (["x", "top"], {"n": 1, "marks": ["top"]})
    assert site.waiting_statuses(top)[0]["task"] == "spawn-mid"

    text, data = show(flowctl, site, top)
    assert f"child      flow {mid} (mid, WAITING)" in text and "parent     flow" not in text
    assert data["children"] == [{"id": mid, "routine": "mid", "state": "WAITING"}] and data["parent"] is None
    text, data = show(flowctl, site, mid)
    assert f"parent     flow {top} (flowctl flow show {top})" in text
    assert f"child      flow {leaf} (leaf, WAITING)" in text
    assert (data["parent"], data["trigger"], [c["id"] for c in data["children"]]) == (top, "flow", [leaf])
    text, data = show(flowctl, site, leaf)
    assert f"parent     flow {mid}" in text and "child      flow" not in text
    assert "waiting    for a message on 'chain/+/go' matching {\"go\":true}" in text
    assert data["waiting_for"] == {"topic": "chain/+/go", "match": {"go": True}, "until": None}

    site.watcher.publish("chain/1/go", {"go": True, "who": "test"})
    event = {"go": True, "who": "test"}
    leaf_result = {"args": ["x", "top", "leaf"], "kwargs": {"n": 1, "marks": ["top", "leaf"], "event": event}}
    assert site.result(leaf)["result"] == leaf_result
    mid_result = {"args": ["x", "top", "leaf", "mid"], "kwargs": {"n": 1, "marks": ["top", "leaf", "mid"],
                                                                   "event": event}}
    assert site.result(mid)["result"] == mid_result
    result = site.result(top)
    assert result["state"] == "DONE", result
    assert result["result"] == {"args": ["x", "top", "leaf", "mid", "after"],
                                "kwargs": {"n": 1, "marks": ["top", "leaf", "mid", "after"], "event": event}}
    # A parent's spawning step records its child's result as its output; nothing ran twice.
    assert site.outputs(top)[1] == mid_result and site.outputs(mid)[0] == leaf_result
    assert site.attempts(top) == [(0, 1, "DONE"), (1, 1, "DONE"), (2, 1, "DONE")]
    assert site.result(leaf)["trigger"] == "flow"
    text, data = show(flowctl, site, top)
    assert f"child      flow {mid} (mid, DONE)" in text


def test_failing_child_fails_the_parent_step_and_retries_apply(site: Site, tmp_path: Path) -> None:
    # "doomed" spawns "boom", whose step raises: the parent step fails naming the sub-flow
    # and its error, and the parent ends FAILED (no retries). "stubborn" spawns "flaky"
    # with one retry: the first child fails, the retry starts a second child, which
    # passes, and the parent ends DONE with its result. A SubFlow of an unknown routine
    # fails the step with a clear error and starts nothing.
    counter = tmp_path / "runs"
    site.task("explode", "w.Explode")
    site.task("fail-first", "w.FailFirst", options={"counter": str(counter)})
    site.task("spawn-boom", "w.Spawn", options={"child": "boom"})
    site.task("spawn-flaky", "w.Spawn", retries=1, retry_delay=0.2, options={"child": "flaky"})
    site.task("spawn-nowhere", "w.Spawn", options={"child": "no-such-routine"})
    site.task("seen", "w.Seen")
    site.routine("boom", ["explode"])
    site.routine("flaky", ["fail-first"])
    site.routine("doomed", ["spawn-boom", "seen"])
    site.routine("stubborn", ["spawn-flaky", "seen"])
    site.routine("lost", ["spawn-nowhere"])
    site.start()

    doomed = api.submit_flow("doomed", v=1).id
    result = site.result(doomed)
    child = only_child(doomed)
    assert result["state"] == "FAILED"
    assert (f"step 1/2 (spawn-boom) failed: sub-flow {child.id} (boom) ended FAILED" in result["error"]
            and "child exploded on purpose" in result["error"]), result["error"]
    assert site.flow(child.id).state == "FAILED"
    assert site.attempts(doomed) == [(0, 1, "FAILED")]

    stubborn = api.submit_flow("stubborn", v=2).id
    result = site.result(stubborn)
    assert result["state"] == "DONE", result
    first, second = children(stubborn)
    assert (site.flow(first.id).state, site.flow(second.id).state) == ("FAILED", "DONE")
    assert "first run fails on purpose" in site.flow(first.id).error
    assert site.attempts(stubborn) == [(0, 1, "FAILED"), (0, 2, "DONE"), (1, 1, "DONE")]
    assert result["result"]["kwargs"]["seen_kwargs"] == {"v": 2, "runs": 2}

    lost = api.submit_flow("lost").id
    result = site.result(lost)
    assert result["state"] == "FAILED"
    assert "routine 'no-such-routine' does not exist" in result["error"]
    assert children(lost) == []


def test_cancel_reaches_every_descendant_and_a_cancelled_child_fails_its_parent(
        site: Site, flowctl: Run, tmp_path: Path) -> None:
    # top -> mid -> leaf, whose step sleeps on a worker. flowctl flow cancel on top
    # cancels mid and leaf too (the leaf's worker is interrupted and free for new work),
    # each saying why; none of them resumes its parent. Then on a second chain the leaf
    # alone is cancelled: its parent's step fails (no retries), and so does the top.
    marker = tmp_path / "started"
    site.task("linger", "w.Linger", options={"marker": str(marker), "seconds": 300})
    site.task("spawn-cmid", "w.Spawn", options={"child": "c-mid"})
    site.task("spawn-cleaf", "w.Spawn", options={"child": "c-leaf"})
    site.task("mark-a", "w.Mark", options={"label": "a"})
    site.routine("c-top", ["spawn-cmid", "mark-a"])
    site.routine("c-mid", ["spawn-cleaf", "mark-a"])
    site.routine("c-leaf", ["linger"])
    site.routine("quick", ["mark-a", "mark-a"])
    site.start()

    top = api.submit_flow("c-top").id
    mid = only_child(top).id
    leaf = only_child(mid).id
    wait_for(lambda: marker.exists() and str(leaf) in marker.read_text().split(), timeout=30,
             message="the leaf's step running")
    cancelled = flowctl("flow", "cancel", str(top), config=site.config_path)
    assert cancelled.returncode == 0, cancelled.stderr
    for flow_id in (top, mid, leaf):
        assert site.result(flow_id)["state"] == "CANCELLED"
    assert site.flow(mid).error == f"parent flow {top} was cancelled"
    assert site.flow(leaf).error == f"parent flow {mid} was cancelled"
    assert site.attempts(leaf) == [(0, 1, "CANCELLED")]
    assert site.attempts(top) == [(0, 1, "CANCELLED")]
    # Both workers are free again: two flows at once finish.
    quick = [api.submit_flow("quick").id for _ in range(2)]
    for flow_id in quick:
        assert site.result(flow_id)["state"] == "DONE"
    assert "Traceback" not in site.log()

    top = api.submit_flow("c-top").id
    mid = only_child(top).id
    leaf = only_child(mid).id
    wait_for(lambda: str(leaf) in marker.read_text().split(), timeout=30, message="the second leaf running")
    assert flowctl("flow", "cancel", str(leaf), config=site.config_path).returncode == 0
    assert site.result(leaf)["state"] == "CANCELLED"
    mid_result = site.result(mid)
    assert mid_result["state"] == "FAILED"
    assert f"sub-flow {leaf} (c-leaf) ended CANCELLED" in mid_result["error"]
    top_result = site.result(top)
    assert top_result["state"] == "FAILED" and f"sub-flow {mid} (c-mid) ended FAILED" in top_result["error"]


def test_a_routine_that_starts_itself_stops_at_the_depth_limit(site: Site, flowctl: Run) -> None:
    # "ouroboros" is one step that starts "ouroboros": flows nest until the next one
    # would be deeper than MAX_SUBFLOW_DEPTH; that step fails with a sentence saying so,
    # and every flow of the chain fails in turn. No flow is started past the limit.
    site.task("spawn-self", "w.Spawn", options={"child": "ouroboros"})
    site.routine("ouroboros", ["spawn-self"], max=MAX_SUBFLOW_DEPTH + 5)
    site.start()
    root = api.submit_flow("ouroboros").id
    result = site.result(root, timeout=60)
    assert result["state"] == "FAILED"
    chain = list(Flow.select().where(Flow.routine == "ouroboros").order_by(Flow.depth))
    assert [f.depth for f in chain] == list(range(MAX_SUBFLOW_DEPTH + 1))
    assert all(f.state == "FAILED" for f in chain)
    deepest = chain[-1]
    assert (f"sub-flow depth limit reached: flow {deepest.id} would start a flow {MAX_SUBFLOW_DEPTH + 1} levels "
            f"deep (the limit is {MAX_SUBFLOW_DEPTH}); does routine 'ouroboros' start itself?") in deepest.error
    assert "depth limit reached" in result["error"]
    assert TaskResult.select().where(TaskResult.flow == deepest.id).count() == 1
    text, _ = show(flowctl, site, deepest.id)
    assert "depth limit reached" in text and "Traceback" not in text

    # A cycle through two routines (ping starts pong, pong starts ping) stops the same way.
    site.task("spawn-pong", "w.Spawn", options={"child": "pong"})
    site.task("spawn-ping", "w.Spawn", options={"child": "ping"})
    site.routine("ping", ["spawn-pong"])
    site.routine("pong", ["spawn-ping"])
    root = api.submit_flow("ping").id
    assert site.result(root, timeout=60)["state"] == "FAILED"
    chain = list(Flow.select().where(Flow.routine.in_(("ping", "pong"))).order_by(Flow.depth))
    assert [(f.depth, f.routine) for f in chain] == [(d, ("ping", "pong")[d % 2]) for d in range(MAX_SUBFLOW_DEPTH + 1)]
    assert "sub-flow depth limit reached" in chain[-1].error


def test_parent_timing_out_while_its_child_runs_cancels_the_child(site: Site) -> None:
    # "impatient" (routine timeout 2 s) starts "slow", which waits for a message that never
    # comes. The parent ends FAILED at its deadline; its child must not live on as an
    # orphan nobody waits for.
    site.task("spawn-slow", "w.Spawn", options={"child": "slow"})
    site.task("await-never", "w.Await", options={"topic": "never/comes"})
    site.routine("impatient", ["spawn-slow"], timeout=2)
    site.routine("slow", ["await-never"])
    site.start()
    parent = api.submit_flow("impatient").id
    child = only_child(parent).id
    result = site.result(parent)
    assert result["state"] == "FAILED" and "flow timed out" in result["error"]
    assert site.result(child, timeout=10)["state"] == "CANCELLED"
    assert site.flow(child).error == f"parent flow {parent} ended FAILED"
    assert site.attempts(child) == [(0, 1, "CANCELLED")]


def test_queued_routine_starting_itself_does_not_wait_forever(site: Site) -> None:
    # "selfq" runs in mode queued and its step starts "selfq": the child can only start
    # when its parent ended, and the parent waits for the child. flowd must refuse the
    # child with a clear error (the parent's step then fails) rather than hang both.
    site.task("spawn-selfq", "w.Spawn", options={"child": "selfq"})
    site.routine("selfq", ["spawn-selfq"], mode="queued")
    site.start()
    root = api.submit_flow("selfq").id
    result = site.result(root, timeout=15)
    assert result["state"] == "FAILED"
    assert (f"flow {root} cannot start routine 'selfq' as a sub-flow: it runs in mode queued and flow {root}, "
            "an ancestor, holds it") in result["error"], result["error"]
    assert children(root) == []
    # Parallel with every slot taken by the flow's own chain is the same dead end.
    site.task("spawn-selfp", "w.Spawn", options={"child": "selfp"})
    site.routine("selfp", ["spawn-selfp"], max=1)
    root = api.submit_flow("selfp").id
    result = site.result(root, timeout=15)
    assert result["state"] == "FAILED" and "parallel slots are taken" in result["error"], result["error"]


def test_parent_and_child_survive_kill_9_while_the_child_runs(site: Site, tmp_path: Path) -> None:
    # The parent waits on its child; the child's step is running when every flowd process
    # is killed with SIGKILL. After the restart the child's step runs again (interrupted,
    # no retry used), the child ends DONE and the parent resumes with its result. The
    # parent's spawning step is not run again: there is still exactly one child.
    marker = tmp_path / "started"
    site.task("linger", "w.Linger", options={"marker": str(marker), "seconds": 1.5})
    site.task("spawn-k", "w.Spawn", options={"child": "k-child"})
    site.task("seen", "w.Seen")
    site.routine("k-parent", ["spawn-k", "seen"])
    site.routine("k-child", ["linger"])
    proc = site.start()
    parent = api.submit_flow("k-parent", v=5).id
    child = only_child(parent).id
    wait_for(lambda: marker.exists(), timeout=30, message="the child's step running")
    proc.kill9()
    assert (site.flow(parent).state, site.flow(child).state) == ("WAITING", "RUNNING")

    site.start()
    result = site.result(parent)
    assert result["state"] == "DONE", result
    assert result["result"]["kwargs"]["results"] == [{"args": [], "kwargs": {"v": 5}}]
    assert [c.id for c in children(parent)] == [child]
    assert site.attempts(child) == [(0, 1, "FAILED"), (0, 2, "DONE")]
    assert "interrupted" in TaskResult.get((TaskResult.flow == child) & (TaskResult.attempt == 1)).error
    assert site.attempts(parent) == [(0, 1, "DONE"), (1, 1, "DONE")]


def test_child_refused_by_its_routine_mode_fails_the_parent_step(site: Site, tmp_path: Path) -> None:
    # "solo" runs in mode single and one solo flow is running: a sub-flow of "solo" is
    # refused at once (CANCELLED, saying why), and the parent's step fails with that reason.
    marker = tmp_path / "started"
    site.task("linger", "w.Linger", options={"marker": str(marker), "seconds": 300})
    site.task("spawn-solo", "w.Spawn", options={"child": "solo"})
    site.routine("solo", ["linger"], mode="single")
    site.routine("wants-solo", ["spawn-solo"])
    site.start()
    busy = api.submit_flow("solo").id
    wait_for(lambda: marker.exists(), timeout=30, message="the solo flow running")
    parent = api.submit_flow("wants-solo").id
    result = site.result(parent)
    child = only_child(parent)
    assert site.result(child.id)["state"] == "CANCELLED"
    reason = f"routine 'solo' runs in mode single and flow {busy} is still running"
    assert site.flow(child.id).error == reason
    assert result["state"] == "FAILED"
    assert result["error"] == f"step 1/1 (spawn-solo) failed: sub-flow {child.id} (solo) ended CANCELLED: {reason}"
    api.cancel_flow(busy)


def test_waiting_status_of_a_parent_names_its_child(site: Site) -> None:
    # A device watching flow/<id>/status sees WAITING: it should see on what, for a
    # sub-flow as for a message (SPEC 4.2 status, issue 8).
    site.task("spawn-leaf", "w.Spawn", options={"child": "leaf"})
    site.task("await-go", "w.Await", options={"topic": "chain/go"})
    site.routine("parent", ["spawn-leaf"])
    site.routine("leaf", ["await-go"])
    site.start()
    parent = api.submit_flow("parent").id
    child = only_child(parent).id
    status = site.waiting_statuses(parent)[0]
    assert status["waiting_for"] == {"flow": child}
    assert (status["position"], status["task"]) == (0, "spawn-leaf")



def test_restart_routine_starting_itself_ends_cleanly(site: Site) -> None:
    # "selfr" runs in mode restart and its step starts "selfr": the child's start would
    # cancel the running flow of the routine, its own parent. However flowd settles it,
    # every flow ends once, publishes one result, and no status goes out after its
    # result (a device must never see WAITING after CANCELLED).
    site.task("spawn-selfr", "w.Spawn", options={"child": "selfr"})
    site.routine("selfr", ["spawn-selfr"], mode="restart")
    site.start()
    root = api.submit_flow("selfr").id
    result = site.result(root)
    assert result["state"] == "FAILED"
    assert "it runs in mode restart: starting it would cancel flow" in result["error"], result["error"]
    wait_for(lambda: Flow.select().where(Flow.state.in_(("INIT", "RUNNING", "WAITING"))).count() == 0,
             timeout=10, message="no flow left active")
    site.barrier()
    for flow in Flow.select().where(Flow.routine == "selfr"):
        final = site.result(flow.id)["state"]
        assert final == flow.state
        assert [s["state"] for s in site.statuses(flow.id)][-1] == final
