"""Steps that wait for the world (SPEC 2.1, ``Wait``), with the real daemon and broker.

Everything is real: mosquitto on a free port, ``flowd run`` as a subprocess with its
huey workers, the SQLite file read back from this process. A test client (the
"device") publishes the events and watches ``flow/#``. Tasks and routines are written
with flowd.catalog before the daemon starts; scripts are in tests/task_scripts/task_w.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, FlowdProcess, wait_for

from flowd import api, catalog
from flowd.config import Config, load_config
from flowd.engine.engine import Engine, payload_matches
from flowd.queue import queue
from flowd.store.models import Flow, Routine, TaskResult, utcnow

Run = Callable[..., subprocess.CompletedProcess[str]]


class Site:
    """One test's world: broker, config, the database opened here, a watcher on ``flow/#``."""

    def __init__(self, broker: Broker, config_path: Path, watcher: Any, start_proc: Callable[..., FlowdProcess]):
        self.broker = broker
        self.config_path = config_path
        self.watcher = watcher
        self._start_proc = start_proc
        self.engine = api.configure(load_config(config_path), create=True)
        self.paths = self.engine.config.flowd.task_paths
        self.proc: FlowdProcess | None = None

    def task(self, name: str, script: str, **kwargs: Any) -> None:
        catalog.save_task(name, script, task_paths=self.paths, **kwargs)

    def routine(self, name: str, tasks: list[str], **kwargs: Any) -> None:
        catalog.save_routine(name, tasks, **kwargs)

    def start(self) -> FlowdProcess:
        """Start flowd and wait for its retained ``online`` (it has subscribed by then)."""
        before = len(self.watcher.json_on("flowd/testnode/status"))
        self.proc = self._start_proc(self.config_path)
        proc = self.proc
        wait_for(lambda: [m for m in self.watcher.json_on("flowd/testnode/status")[before:]
                          if m["state"] == "online"], timeout=30, message=f"flowd online; log:\n{proc.log_text()}")
        return proc

    def log(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def statuses(self, flow_id: int) -> list[dict[str, Any]]:
        return list(self.watcher.json_on(f"flow/{flow_id}/status"))

    def waiting_statuses(self, flow_id: int, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until ``count`` WAITING statuses of the flow went out; returns them."""
        return list(wait_for(lambda: (lambda found: found if len(found) >= count else None)(
            [s for s in self.statuses(flow_id) if s["state"] == "WAITING"]), timeout=timeout,
            message=f"{count} WAITING status(es) of flow {flow_id}; log:\n{self.log()}"))

    def result(self, flow_id: int, timeout: float = 30) -> dict[str, Any]:
        """The ``flow/<id>/result`` message (waits for it)."""
        found = wait_for(lambda: self.watcher.json_on(f"flow/{flow_id}/result"), timeout=timeout,
                         message=f"flow/{flow_id}/result; log:\n{self.log()}")
        assert len(found) == 1, f"flow {flow_id} published {len(found)} results"
        return dict(found[0])

    def barrier(self) -> None:
        """Wait until the watcher holds everything flowd published so far: flowd sends its
        outbox in order on one connection, so a new flow's result comes after all of it."""
        if "barrier" not in {r.name for r in Routine.select(Routine.name)}:
            self.task("barrier-mark", "w.Mark", options={"label": "barrier"})
            self.routine("barrier", ["barrier-mark"])
        self.result(api.submit_flow("barrier").id)

    @staticmethod
    def flow(flow_id: int) -> Flow:
        return Flow.get_by_id(flow_id)

    def wait_state(self, flow_id: int, state: str, timeout: float = 30) -> Flow:
        return wait_for(lambda: (lambda f: f if f.state == state else None)(self.flow(flow_id)), timeout=timeout,
                        message=f"flow {flow_id} {state}; log:\n{self.log()}")

    @staticmethod
    def attempts(flow_id: int) -> list[tuple[int, int, str]]:
        """(position, attempt, state) of every attempt of the flow, in order."""
        return [(r.position, r.attempt, r.state) for r in TaskResult.select().where(TaskResult.flow == flow_id)
                .order_by(TaskResult.position, TaskResult.attempt)]

    @staticmethod
    def outputs(flow_id: int) -> list[Any]:
        return [r.output for r in TaskResult.select().where((TaskResult.flow == flow_id) & (TaskResult.state == "DONE"))
                .order_by(TaskResult.position)]


@pytest.fixture
def site(request: pytest.FixtureRequest, broker: Broker, config_file: Callable[..., Path], session_client: Any,
         flowd_proc: Callable[..., FlowdProcess]) -> Iterator[Site]:
    """Parametrise indirectly with config sections, e.g. ``{"mqtt": {"protocol": "3.1.1"}}``."""
    watcher = session_client(["flow/#", "flowd/#"])
    sections = dict(getattr(request, "param", {}))
    yield Site(broker, config_file(broker, workers=2, **sections), watcher, flowd_proc)
    api.reset()


def show(flowctl: Run, site: Site, flow_id: int) -> tuple[str, dict[str, Any]]:
    """``flowctl flow show`` as text and as --json."""
    text = flowctl("flow", "show", str(flow_id), config=site.config_path)
    assert text.returncode == 0, text.stderr
    data = flowctl("--json", "flow", "show", str(flow_id), config=site.config_path)
    assert data.returncode == 0, data.stderr
    return text.stdout, json.loads(data.stdout)


def test_wait_resumes_on_a_matching_message_only_and_results_stay_whole(site: Site) -> None:
    # Steps a and b mark their output; step 3 waits on site/+/door for {"open": true,
    # "floor": 2}; step 4 reports self.results. While it waits: a retained matching
    # message from before (old news), other topics, a payload missing a key, a wrong
    # value, "2" for 2, a JSON array and non-JSON text change nothing. A second flow of
    # the same routine waits for {"sentinel": 1}: once the sentinel resumed it, flowd has
    # handled every earlier message on that topic, and the first flow must still wait.
    # Then a matching message (with an extra key) resumes it at step 4, with every
    # earlier output, the wait's own included with its event, in self.results.
    site.task("mark-a", "w.Mark", options={"label": "a"})
    site.task("mark-b", "w.Mark", options={"label": "b"})
    site.task("await-door", "w.Await", options={"topic": "site/+/door", "match": {"open": True, "floor": 2}})
    site.task("seen", "w.Seen")
    site.routine("door", ["mark-a", "mark-b", "await-door", "seen"])
    site.watcher.publish("site/hall/door", {"open": True, "floor": 2, "old": True}, retain=True)
    site.start()

    flow_id = api.submit_flow("door", "x", n=1).id
    sentinel = api.submit_flow("door", "y", match={"sentinel": 1}).id
    status = site.waiting_statuses(flow_id)[0]
    assert status["waiting_for"] == {"topic": "site/+/door", "match": {"open": True, "floor": 2}}
    assert (status["position"], status["steps"], status["task"]) == (2, 4, "await-door")
    assert site.waiting_statuses(sentinel)[0]["waiting_for"]["match"] == {"sentinel": 1}
    waiting = site.flow(flow_id)
    assert (waiting.state, waiting.wait_topic, waiting.worker_pid) == ("WAITING", "site/+/door", None)

    for topic, payload in [("site/hall/window", {"open": True, "floor": 2}),
                           ("site/a/b/door", {"open": True, "floor": 2}),
                           ("site/hall/door", {"open": True}),
                           ("site/hall/door", {"open": False, "floor": 2}),
                           ("site/hall/door", {"open": True, "floor": "2"}),
                           ("site/hall/door", [{"open": True, "floor": 2}]),
                           ("site/hall/door", b"open floor 2"),
                           ("site/hall/door", {"sentinel": 1})]:
        site.watcher.publish(topic, payload)
    assert site.result(sentinel)["state"] == "DONE"
    assert site.flow(flow_id).state == "WAITING"
    assert site.attempts(flow_id) == [(0, 1, "DONE"), (1, 1, "DONE"), (2, 1, "RUNNING")]

    site.watcher.publish("site/kitchen/door", {"open": True, "floor": 2, "by": "cat"})
    result = site.result(flow_id)
    assert result["state"] == "DONE", result
    event = {"open": True, "floor": 2, "by": "cat"}
    step_a = {"args": ["x", "a"], "kwargs": {"n": 1, "marks": ["a"]}}
    step_b = {"args": ["x", "a", "b"], "kwargs": {"n": 1, "marks": ["a", "b"]}}
    step_wait = {"args": ["x", "a", "b"], "kwargs": {"n": 1, "marks": ["a", "b"], "event": event}}
    assert result["result"] == {"args": ["x", "a", "b"], "kwargs": {
        "seen_kwargs": step_wait["kwargs"], "results": [step_a, step_b, step_wait], "position": 3, "attempt": 1}}
    # Every step ran once; the database holds the same outputs.
    assert site.attempts(flow_id) == [(0, 1, "DONE"), (1, 1, "DONE"), (2, 1, "DONE"), (3, 1, "DONE")]
    assert site.outputs(flow_id)[:3] == [step_a, step_b, step_wait]
    states = [(s["state"], s["position"]) for s in site.statuses(flow_id)]
    assert states[-3:] == [("WAITING", 2), ("RUNNING", 3), ("DONE", 3)]
    assert "waiting_for" not in site.statuses(flow_id)[-1]
    assert Flow.get_by_id(flow_id).wait_topic is None
    # The sentinel saw its own event only.
    assert site.outputs(sentinel)[2]["kwargs"]["event"] == {"sentinel": 1}


def test_one_message_resumes_two_waiting_flows(site: Site, flowctl: Run) -> None:
    # Flow "gate" waits on gate/+/state for {"state": "open"} as its only step; flow
    # "gate-any" waits on gate/# for anything, with a timeout. flowctl flow show names
    # what each waits for. One message on gate/north/state resumes both.
    site.task("await-gate", "w.Await", options={"topic": "gate/+/state", "match": {"state": "open"}})
    site.task("await-any", "w.Await", options={"topic": "gate/#", "wait_timeout": 600})
    site.task("mark-a", "w.Mark", options={"label": "a"})
    site.routine("gate", ["await-gate"])
    site.routine("gate-any", ["mark-a", "await-any"])
    site.start()
    first = api.submit_flow("gate").id
    second = api.submit_flow("gate-any").id
    site.waiting_statuses(first)
    assert site.waiting_statuses(second)[0]["waiting_for"] == {"topic": "gate/#", "match": None}

    text, data = show(flowctl, site, first)
    assert f"flow {first}  gate  WAITING  step 1/1" in text
    assert "waiting    for a message on 'gate/+/state' matching {\"state\":\"open\"}" in text
    assert data["waiting_for"] == {"topic": "gate/+/state", "match": {"state": "open"}, "until": None}
    text, data = show(flowctl, site, second)
    assert "waiting    for a message on 'gate/#' until " in text
    assert data["state"] == "WAITING" and data["waiting_for"]["topic"] == "gate/#"
    assert data["waiting_for"]["until"] is not None
    listed = json.loads(flowctl("--json", "flows", "--state", "WAITING", config=site.config_path).stdout)
    assert sorted(f["id"] for f in listed) == sorted([first, second])

    site.watcher.publish("gate/north/state", {"state": "open", "by": "remote"})
    event = {"state": "open", "by": "remote"}
    assert site.result(first)["result"] == {"args": [], "kwargs": {"event": event}}
    assert site.result(second)["result"] == {"args": ["a"], "kwargs": {"marks": ["a"], "event": event}}
    text, data = show(flowctl, site, first)
    assert data["state"] == "DONE" and data["waiting_for"] is None and "waiting    for" not in text


def test_wait_timeout_fails_the_step_and_retries_wait_again(site: Site, tmp_path: Path) -> None:
    # "late" waits 1 s for late/x, retries once: both waits time out, the flow ends FAILED
    # saying what it waited for. "again" times out once, retries (0.2 s later), waits again
    # (a second WAITING status; 120 s this time), and the message resumes the retry.
    counter = tmp_path / "attempts"
    site.task("await-late", "w.Await", retries=1, retry_delay=0.2,
              options={"topic": "late/x", "match": {"ok": True}, "wait_timeout": 1, "counter": str(counter)})
    site.task("await-again", "w.Await", retries=2, retry_delay=0.2,
              options={"topic": "again/x", "wait_timeout": 1, "later_timeout": 120, "counter": str(counter)})
    site.task("seen", "w.Seen")
    site.routine("late", ["await-late", "seen"])
    site.routine("again", ["await-again", "seen"])
    site.start()

    late = api.submit_flow("late").id
    result = site.result(late)
    assert result["state"] == "FAILED"
    assert "timed out waiting for a message on 'late/x' matching {'ok': True}" in result["error"]
    assert "step 1/2 (await-late)" in result["error"]
    assert site.attempts(late) == [(0, 1, "FAILED"), (0, 2, "FAILED")]
    assert len([s for s in site.statuses(late) if s["state"] == "WAITING"]) == 2
    errors = [r.error for r in TaskResult.select().where(TaskResult.flow == late)]
    assert all("timed out waiting" in e for e in errors)
    assert counter.read_text().splitlines() == [f"{late}:1", f"{late}:2"]

    again = api.submit_flow("again").id
    first_wait, second_wait = site.waiting_statuses(again, count=2)
    assert first_wait["waiting_for"] == second_wait["waiting_for"] == {"topic": "again/x", "match": None}
    assert site.flow(again).wait_until is not None
    site.watcher.publish("again/x", {"n": 7})
    assert site.result(again)["state"] == "DONE"
    assert site.attempts(again) == [(0, 1, "FAILED"), (0, 2, "DONE"), (1, 1, "DONE")]
    failed = TaskResult.get((TaskResult.flow == again) & (TaskResult.attempt == 1))
    assert "timed out waiting for a message on 'again/x'" in failed.error
    assert site.outputs(again)[0] == {"args": [], "kwargs": {"event": {"n": 7}}}
    assert [line for line in counter.read_text().splitlines() if line.startswith(f"{again}:")] == [
        f"{again}:1", f"{again}:2"]
    # A message after the end changes nothing.
    site.watcher.publish("late/x", {"ok": True})
    assert site.flow(late).state == "FAILED"


@pytest.mark.parametrize(("site", "stop"), [({}, "kill9"), ({"mqtt": {"protocol": "3.1.1"}}, "kill9"),
                                           ({}, "sigterm")], indirect=["site"],
                         ids=["mqtt5-kill9", "mqtt311-kill9", "mqtt5-sigterm"])
def test_wait_survives_kill_9_and_sees_a_message_sent_while_flowd_was_down(site: Site, stop: str) -> None:
    # The exact sequence that needs the persistent session: the flow goes WAITING, and
    # its WAITING status goes out (the bridge subscribed the wait topic just before it);
    # flowd is killed with SIGKILL (or stopped with SIGTERM); the device publishes the
    # event while flowd is down, retained as IoT devices often do; flowd starts again and
    # the broker hands over the event kept in its session: the flow resumes with it, with
    # self.results whole (rebuilt from the database). A second flow waits on another
    # topic; it is answered only after the restart. A third one's 2 s wait runs out while
    # flowd is down: it fails at the restart, saying so.
    site.task("mark-a", "w.Mark", options={"label": "a"})
    site.task("await-valve", "w.Await", options={"topic": "plant/+/valve", "match": {"open": True}})
    site.task("await-pump", "w.Await", options={"topic": "plant/pump"})
    site.task("await-brief", "w.Await", options={"topic": "plant/brief", "wait_timeout": 2})
    site.task("seen", "w.Seen")
    site.routine("valve", ["mark-a", "await-valve", "seen"])
    site.routine("pump", ["await-pump", "seen"])
    site.routine("brief", ["await-brief"])
    proc = site.start()
    valve = api.submit_flow("valve", n=3).id
    pump = api.submit_flow("pump").id
    brief = api.submit_flow("brief").id
    for flow_id in (valve, pump, brief):
        site.waiting_statuses(flow_id)
    if stop == "kill9":
        proc.kill9()
    else:
        assert proc.terminate() == 0

    site.watcher.publish("plant/v1/valve", {"open": False, "while": "down"})
    site.watcher.publish("plant/v1/valve", {"open": True, "while": "down"}, retain=True)
    assert site.flow(valve).state == "WAITING"
    until = site.flow(brief).wait_until
    wait_for(lambda: utcnow() > until, timeout=10, interval=0.1, message="the brief wait to run out")

    site.start()
    brief_result = site.result(brief)
    assert brief_result["state"] == "FAILED"
    assert "timed out waiting for a message on 'plant/brief'" in brief_result["error"]
    result = site.result(valve)
    assert result["state"] == "DONE", result
    event = {"open": True, "while": "down"}
    step_a = {"args": ["a"], "kwargs": {"n": 3, "marks": ["a"]}}
    step_wait = {"args": ["a"], "kwargs": {"n": 3, "marks": ["a"], "event": event}}
    assert result["result"]["kwargs"]["results"] == [step_a, step_wait]
    assert result["result"]["kwargs"]["seen_kwargs"] == step_wait["kwargs"]
    assert site.attempts(valve) == [(0, 1, "DONE"), (1, 1, "DONE"), (2, 1, "DONE")]

    assert site.flow(pump).state == "WAITING"
    site.watcher.publish("plant/pump", {"rpm": 1200})
    assert site.result(pump)["result"]["kwargs"]["results"] == [{"args": [], "kwargs": {"event": {"rpm": 1200}}}]


def test_wait_subscribed_again_when_the_broker_forgot_the_session(site: Site, tmp_path: Path) -> None:
    # The broker restarts without its stored sessions (its persistence file removed):
    # flowd reconnects to a fresh session and must subscribe the waiting flow's topic from
    # the database again, or the answer would never reach it.
    site.task("await-bell", "w.Await", options={"topic": "house/bell"})
    site.routine("bell", ["await-bell"])
    site.start()
    flow_id = api.submit_flow("bell").id
    site.waiting_statuses(flow_id)
    before = len([m for m in site.watcher.json_on("flowd/testnode/status") if m["state"] == "online"])
    site.broker.stop()
    for stored in site.broker.folder.glob("*.db"):
        stored.unlink()
    site.broker.start()
    # flowd's retained "online" comes again once it reconnected and subscribed.
    wait_for(lambda: len([m for m in site.watcher.json_on("flowd/testnode/status") if m["state"] == "online"])
             > before, timeout=40, message=f"flowd online again; log:\n{site.log()}")
    # The broker really forgot: flowd's second connection found no session either.
    assert site.log().count("session present: no") == 2, site.log()
    site.watcher.publish("house/bell", {"ring": 1})
    assert site.result(flow_id)["result"] == {"args": [], "kwargs": {"event": {"ring": 1}}}


def test_bad_waits_fail_the_step_with_a_clear_error(site: Site) -> None:
    # A Wait flowd cannot subscribe or time: an invalid filter, a match that is not an
    # object, a timeout that is not a positive number. Each fails its step with one
    # sentence naming the step and what is wrong; nothing waits, the daemon goes on.
    site.task("await", "w.Await", options={"topic": "ok/topic"})
    site.routine("bad-wait", ["await"])
    site.start()
    cases = [({"topic": "bad/#/x"}, "returned Wait with an invalid topic 'bad/#/x'"),
             ({"topic": "a+b"}, "returned Wait with an invalid topic 'a+b'"),
             ({"match": "open"}, "returned Wait(match=...) that is not a dict"),
             ({"wait_timeout": -1}, "returned Wait(timeout=-1); use a positive number of seconds"),
             ({"wait_timeout": "soon"}, "returned Wait(timeout='soon'); use a positive number of seconds")]
    ids = [api.submit_flow("bad-wait", **kwargs).id for kwargs, _ in cases]
    for flow_id, (_, sentence) in zip(ids, cases, strict=True):
        result = site.result(flow_id)
        assert result["state"] == "FAILED"
        assert result["error"].startswith("step 1/1 (await) failed: ") and sentence in result["error"], result["error"]
    assert not [s for flow_id in ids for s in site.statuses(flow_id) if s["state"] == "WAITING"]
    assert site.proc is not None and site.proc.proc is not None and site.proc.proc.poll() is None
    assert "Traceback" not in site.log()


def test_match_does_not_take_1_for_true() -> None:
    # JSON true and 1 are different values; a door sensor sending {"open": 1} is not
    # the {"open": true} the flow waits for (nor 0 for false, nor 1.0 for true).
    assert payload_matches({"open": True}, {"open": True, "x": 1})
    assert not payload_matches({"open": True}, {"open": 1})
    assert not payload_matches({"open": False}, {"open": 0})
    assert not payload_matches({"level": 1}, {"level": True})


class PausingEngine(Engine):
    """An engine whose ``waiting_topics()`` pauses after its read in one named thread, so
    a test can let the database change between that read and what the caller does next
    (the daemon's loop refreshing the wait topics while a worker parks a flow)."""

    def __init__(self, config: Config):
        super().__init__(config, enqueue=queue.enqueue_flow)
        self.pause_in = ""
        self.has_read = threading.Event()
        self.go_on = threading.Event()

    def waiting_topics(self) -> set[str]:
        topics = super().waiting_topics()
        if threading.current_thread().name == self.pause_in:
            self.has_read.set()
            self.go_on.wait(10)
        return topics


def park_waiting(engine: Engine, routine: str, topic: str) -> int:
    """Submit a flow and park it WAITING on ``topic``, as a worker would."""
    row, _ = engine.submit(routine)
    step = engine.claim(row.id, Flow.get_by_id(row.id).dispatch_token, os.getpid())
    assert step is not None and engine.wait_step(step, os.getpid(), topic, None, None)
    return int(row.id)


def test_wait_topic_stays_subscribed_when_two_refreshes_overlap(
        broker: Broker, config_file: Callable[..., Path], mqtt_client: Any) -> None:
    # The bridge refreshes its wait subscriptions from two threads: the daemon's loop
    # (every 2 s) and the outbox publisher (just before a WAITING status goes out). Flow A
    # waited on x/door and was answered, so nobody waits there now. The loop's refresh
    # reads "nobody waits on x/door"; before it acts, flow B parks on x/door and the
    # publisher's refresh runs for it; then the loop's refresh goes on. x/door must still
    # be subscribed: the device answers B as soon as it sees B's WAITING status.
    from flowd.mqtt.bridge import MqttBridge

    config = load_config(config_file(broker))
    api.configure(config, create=True)
    catalog.save_task("await", "w.Await", options={"topic": "x/door"}, task_paths=config.flowd.task_paths)
    catalog.save_routine("door", ["await"])
    engine = PausingEngine(config)
    device = mqtt_client()
    bridge = MqttBridge(config, engine)
    bridge.start()
    try:
        wait_for(bridge.is_connected, timeout=10, message="bridge connected")
        first = park_waiting(engine, "door", "x/door")
        bridge.refresh_wait_topics()
        wait_for(lambda: device.publish("x/door", {"n": 1}) or Flow.get_by_id(first).state == "DONE", timeout=10,
                 interval=0.2, message="flow A resumed (x/door subscribed)")

        engine.pause_in = "loop"
        loop = threading.Thread(target=bridge.refresh_wait_topics, name="loop")
        loop.start()
        assert engine.has_read.wait(10)
        second = park_waiting(engine, "door", "x/door")
        publisher = threading.Thread(target=bridge.refresh_wait_topics, name="publisher")
        publisher.start()
        publisher.join(2.0)  # returns at once, or waits here while the loop holds the lock
        engine.go_on.set()
        loop.join(10)
        publisher.join(10)

        # Subscribing is asynchronous: the last SUBACK may still be on its way, so the device
        # repeats itself (no refresh runs on its own here: unsubscribed would stay so).
        wait_for(lambda: device.publish("x/door", {"n": 2}) or Flow.get_by_id(second).state == "DONE", timeout=5,
                 interval=0.2, message="flow B resumed")
    finally:
        bridge.stop_intake()
        bridge.stop(drain=1)
        api.reset()


def test_a_flow_can_wait_for_another_flows_result(site: Site, flowctl: Run) -> None:
    # flowd's own messages are MQTT messages like any other: a flow may wait on
    # flow/+/result for a DONE result of routine "job". Its own WAITING status (also
    # under flow/) does not resume it; the job's result does, carried in as the event.
    # Then the same wait times out (1 s, on a routine nobody runs), and `flowctl flow
    # retry` puts the flow back to waiting, where a message resumes it.
    site.task("await-job", "w.Await", options={"topic": "flow/+/result", "match": {"routine": "job",
                                                                                  "state": "DONE"}})
    site.task("mark-a", "w.Mark", options={"label": "a"})
    site.task("await-short", "w.Await", options={"topic": "late/y", "wait_timeout": 1})
    site.routine("watch-job", ["await-job"])
    site.routine("job", ["mark-a"])
    site.routine("short", ["await-short"])
    site.start()
    watcher = api.submit_flow("watch-job").id
    site.waiting_statuses(watcher)
    job = api.submit_flow("job", 7).id
    result = site.result(watcher)
    assert result["state"] == "DONE"
    event = result["result"]["kwargs"]["event"]
    assert (event["flow_id"], event["routine"], event["state"]) == (job, "job", "DONE")
    assert event["result"] == {"args": [7, "a"], "kwargs": {"marks": ["a"]}}

    short = api.submit_flow("short").id
    assert site.result(short)["state"] == "FAILED"
    retried = flowctl("flow", "retry", str(short), config=site.config_path)
    assert retried.returncode == 0, retried.stderr
    # The retry's wait has 1 s as well: answer each WAITING status until one takes.
    seen = 0
    def answered() -> bool:
        nonlocal seen
        waits = [s for s in site.statuses(short) if s["state"] == "WAITING"]
        if len(waits) > seen:
            seen = len(waits)
            site.watcher.publish("late/y", {"retry": True})
        return site.flow(short).state == "DONE"
    wait_for(answered, timeout=30, interval=0.05, message=f"the retried flow resumed; log:\n{site.log()}")
    assert site.outputs(short)[0] == {"args": [], "kwargs": {"event": {"retry": True}}}
    # One result per ending; the second goes out just after the state is committed.
    wait_for(lambda: len(site.watcher.json_on(f"flow/{short}/result")) == 2, timeout=10,
             message="the second result of the retried flow")


@pytest.mark.parametrize("site", [{"flowd": {"workers": 1}}], indirect=True, ids=["one-worker"])
def test_waiting_flows_hold_no_worker(site: Site) -> None:
    # With a single worker, three flows park WAITING on one topic; other work still runs
    # meanwhile (a waiting flow holds no worker), and one message resumes all three.
    site.task("await-bus", "w.Await", options={"topic": "bus/stop"})
    site.task("mark-a", "w.Mark", options={"label": "a"})
    site.routine("rider", ["await-bus", "mark-a"])
    site.routine("job", ["mark-a", "mark-a"])
    site.start()
    riders = [api.submit_flow("rider", n).id for n in range(3)]
    for flow_id in riders:
        site.waiting_statuses(flow_id)
    assert all(site.flow(flow_id).worker_pid is None for flow_id in riders)
    assert site.result(api.submit_flow("job").id)["state"] == "DONE"
    assert all(site.flow(flow_id).state == "WAITING" for flow_id in riders)
    site.watcher.publish("bus/stop", {"line": 7})
    for n, flow_id in enumerate(riders):
        assert site.result(flow_id)["result"] == {"args": [n, "a"], "kwargs": {"event": {"line": 7}, "marks": ["a"]}}
