"""Status messages (SPEC 4.4): progress reports sent while the broker is connected, not
records. They never touch the outbox table, follow the routine's ``status`` setting,
coalesce per flow when they back up, and do not survive a daemon restart; results do.

Everything is real: mosquitto on a free port (stopped, or frozen with SIGSTOP, to make
messages back up), ``flowd run`` as a subprocess with its workers, flowctl as a
subprocess, the SQLite file read back from this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, flowd_env, free_port, wait_for

from flowd import api, catalog, store
from flowd.engine.flowmessages import flow_status_payload
from flowd.mqtt.status import (
    BEHIND_WAIT_S,
    STATUS_INFLIGHT,
    Status,
    StatusInbox,
    decode_statuses,
    encode_statuses,
    send_statuses,
    status_payload_text,
)
from flowd.store.models import Flow, FlowState, Outbox, dumps

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that keeps sessions across its restart (as test_outage's does)."""
    port = free_port()
    b = Broker(tmp_path / "broker", port=port, extra_conf=f"listener {port} 127.0.0.1\nallow_anonymous true\n"
               "autosave_interval 1\n")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def routines(db: Any, task_dir: Path) -> None:
    paths = [str(task_dir)]
    catalog.save_task("double", "mqtt_steps.Double", task_paths=paths)
    catalog.save_task("nap", "mqtt_steps.Nap", options={"nap": 0.2}, task_paths=paths)
    catalog.save_routine("triple", ["double", "double", "double"])


def online(watcher: Any, after: int = 0) -> Callable[[], bool]:
    return lambda: any(m["state"] == "online" for m in watcher.json_on("flowd/testnode/status")[after:])


def start(flowd_proc: Any, path: Path, watcher: Any) -> Any:
    seen = len(watcher.json_on("flowd/testnode/status"))
    proc = flowd_proc(path)
    wait_for(online(watcher, seen), timeout=20, message=f"flowd online; log:\n{proc.log_text()}")
    return proc


@contextlib.contextmanager
def frozen(broker: Broker) -> Iterator[None]:
    """The broker stopped (SIGSTOP: its connections stay up, nothing is acknowledged)."""
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


def run_triples(count: int) -> list[int]:
    """Submit ``count`` three-step flows through the API and wait until all are DONE."""
    flows = [api.submit_flow("triple", value=n).id for n in range(count)]
    wait_for(lambda: all(Flow.get_by_id(f).state == FlowState.DONE.value for f in flows), timeout=30,
             message=f"{count} flows DONE")
    return flows


def result_of(watcher: Any, flow_id: int, timeout: float = 30) -> dict[str, Any]:
    found = wait_for(lambda: watcher.json_on(f"flow/{flow_id}/result"), timeout=timeout,
                     message=f"flow/{flow_id}/result")
    return dict(found[0])


def messages_of(watcher: Any, flow_id: int) -> list[tuple[str, dict[str, Any]]]:
    """('status' or 'result', payload) of one flow, in arrival order."""
    return [(topic.rsplit("/", 1)[1], json.loads(payload)) for topic, payload, _, _ in
            watcher.received(f"flow/{flow_id}/+")]


def flowctl(config: Path, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config), *args], capture_output=True,
                          text=True, env=flowd_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if args[0] == "--json" else done.stdout


def test_routine_status_steps_states_off(broker: Broker, config_file: Callable[..., Path], flowd_proc: Any,
                                        session_client: Any, routines: None, tmp_path: Path) -> None:
    # Three routines of three steps, set up with flowctl: "steps" (the default) sends a
    # status at each state change and each finished step (RUNNING at 0, 1, 2, then DONE),
    # "states" only at state changes (RUNNING, DONE), "off" none; every flow's result
    # arrives, after its last status.
    path = config_file(broker=broker)
    flowctl(path, "routine", "add", "by-steps", "double", "double", "double")
    flowctl(path, "--json", "routine", "add", "by-states", "double", "double", "double", "--status", "states")
    (tmp_path / "quiet.toml").write_text('[routines.quiet]\ntasks = ["double", "double", "double"]\n'
                                         'status = "off"\n')
    flowctl(path, "apply", str(tmp_path / "quiet.toml"))
    shown = {r["name"]: r["status"] for r in flowctl(path, "--json", "routine", "list")}
    assert shown == {"by-steps": "steps", "by-states": "states", "quiet": "off", "triple": "steps"}
    assert "states (state changes only)" in flowctl(path, "routine", "show", "by-states")
    watcher = session_client(["flow/#", "flowd/#"])
    start(flowd_proc, path, watcher)

    flows = {name: api.submit_flow(name, value=1).id for name in ("by-steps", "by-states", "quiet")}
    for name, flow_id in flows.items():
        assert result_of(watcher, flow_id)["result"]["kwargs"] == {"value": 8}, name
    seen = {name: [(p["state"], p["position"]) for kind, p in messages_of(watcher, flow_id) if kind == "status"]
            for name, flow_id in flows.items()}
    assert seen == {"by-steps": [("RUNNING", 0), ("RUNNING", 1), ("RUNNING", 2), ("DONE", 2)],
                    "by-states": [("RUNNING", 0), ("DONE", 2)], "quiet": []}
    for flow_id in flows.values():
        assert [kind for kind, _ in messages_of(watcher, flow_id)][-1] == "result"


def test_no_status_row_is_ever_written_to_the_outbox(broker: Broker, config_file: Callable[..., Path],
                                                     flowd_proc: Any, session_client: Any, routines: None) -> None:
    # While 30 flows run, a reader samples the outbox table as fast as it can: it sees
    # results (and the online message), never a flow/<id>/status row. The statuses still
    # reach the watcher, in order, each flow's last one DONE: a burst of 30 flows backs
    # up past the window of status.STATUS_INFLIGHT, so some are coalesced away (SPEC 4.4).
    watcher = session_client(["flow/#", "flowd/#"])
    start(flowd_proc, config_file(broker=broker), watcher)
    seen: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        from flowd.store.models import database

        while not stop.is_set():
            seen.update(row[0] for row in database.obj.execute_sql("SELECT topic FROM outbox").fetchall())

    reader = threading.Thread(target=sample)
    reader.start()
    try:
        flows = [api.submit_flow("triple", value=n).id for n in range(30)]
        for flow_id in flows:
            result_of(watcher, flow_id)
    finally:
        stop.set()
        reader.join(10)
    assert not [topic for topic in seen if topic.endswith("/status") and topic.startswith("flow/")], seen
    assert any(topic.endswith("/result") for topic in seen)
    everyone = [("RUNNING", 0), ("RUNNING", 1), ("RUNNING", 2), ("DONE", 2)]
    sent = 0
    for flow_id in flows:
        seen_of_flow = [(p["state"], p["position"]) for kind, p in messages_of(watcher, flow_id) if kind == "status"]
        assert seen_of_flow and seen_of_flow[-1] == ("DONE", 2), (flow_id, seen_of_flow)
        assert seen_of_flow == sorted(seen_of_flow, key=everyone.index), (flow_id, seen_of_flow)  # in order, none twice
        assert len(set(seen_of_flow)) == len(seen_of_flow), (flow_id, seen_of_flow)
        sent += len(seen_of_flow)
    assert sent > len(flows), sent  # coalesced, not suppressed: more than the DONE of each


def test_statuses_are_not_kept_across_a_restart_results_are(
        broker: Broker, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        routines: None) -> None:
    # The broker is away while three flows run: their results wait in the outbox, their
    # statuses in the daemon's memory. flowd is stopped, the broker comes back, flowd
    # starts again: the three results arrive; the statuses were not records and are gone.
    # A new flow afterwards gets its statuses as usual.
    watcher = session_client(["flow/#", "flowd/#"])
    path = config_file(broker=broker)
    first = start(flowd_proc, path, watcher)
    broker.stop()
    flows = [api.submit_flow("triple", value=n).id for n in range(3)]
    wait_for(lambda: all(Flow.get_by_id(f).state == FlowState.DONE.value for f in flows), timeout=30,
             message="flows DONE without a broker")
    kept = sorted(row.topic for row in Outbox.select() if row.topic.startswith("flow/"))
    assert kept == sorted(f"flow/{f}/result" for f in flows)
    assert first.terminate() == 0
    broker.start()
    start(flowd_proc, path, watcher)
    for n, flow_id in enumerate(flows):
        assert result_of(watcher, flow_id)["result"]["kwargs"] == {"value": n * 8}
    later = api.submit_flow("triple", value=1).id
    result_of(watcher, later)
    assert [p["state"] for kind, p in messages_of(watcher, later) if kind == "status"][-1] == "DONE"
    for flow_id in flows:
        assert [kind for kind, _ in messages_of(watcher, flow_id)] == ["result"]


def test_a_frozen_broker_leaves_at_most_the_latest_status_per_flow(
        broker: Broker, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        routines: None) -> None:
    # The broker is frozen (SIGSTOP: the connection stays up, nothing is acknowledged)
    # while 40 three-step flows run. flowd hands over its window of statuses, then keeps
    # only the latest status of each flow; results are not held back. Once the broker
    # thaws, each flow shows at most one status beyond that window (its DONE), then its
    # result; far fewer statuses than transitions arrive.
    watcher = session_client(["flow/#", "flowd/#"])
    start(flowd_proc, config_file(broker=broker), watcher)
    with frozen(broker):
        flows = run_triples(40)
    for flow_id in flows:
        result_of(watcher, flow_id)
    statuses = [(topic, json.loads(payload)) for topic, payload, _, _ in watcher.received("flow/+/status")]
    assert len(statuses) < 4 * len(flows) - 40, len(statuses)
    beyond_window = statuses[STATUS_INFLIGHT:]
    for flow_id in flows:
        late = [p["state"] for _, p in beyond_window if p["flow_id"] == flow_id]
        assert late in ([], ["DONE"]), (flow_id, late)
        kinds = [(kind, p["state"]) for kind, p in messages_of(watcher, flow_id)]
        assert kinds[-2:] == [("status", "DONE"), ("result", "DONE")], (flow_id, kinds)


def test_status_messages_on_the_wire_and_without_a_daemon(tmp_path: Path) -> None:
    # The socket format carries any JSON text; with nobody listening a send is dropped at
    # once; a listening inbox receives what is sent, in order, and keeps only each flow's
    # latest while it is told the statuses back up.
    statuses = [Status(n, "RUNNING", f"flow/{n}/status",
                       json.dumps({"n": n, "text": "ü\u2028\\n\x00" * 20}, ensure_ascii=False))
                for n in range(1, 400)]
    messages = encode_statuses(statuses)
    assert len(messages) > 1 and [s for m in messages for s in decode_statuses(m)] == statuses
    assert send_statuses(tmp_path, statuses[:1]) is False

    inbox = StatusInbox(tmp_path / "status.sock")
    inbox.start()
    try:
        assert send_statuses(tmp_path, statuses[:3]) is True
        wait_for(lambda: inbox.received == 3, message="three statuses received")
        assert inbox.take(10) == statuses[:3]
        inbox.set_backed_up(True)
        again = [Status(1, state, "flow/1/status", "{}") for state in ("RUNNING", "WAITING", "DONE")]
        assert send_statuses(tmp_path, again) is True
        wait_for(lambda: inbox.received == 6, message="three more received")
        # Behind, the flow's latest waits BEHIND_WAIT_S for a newer one, then goes alone.
        assert inbox.take(10) == []
        assert inbox.take(10, now=time.monotonic() + BEHIND_WAIT_S) == again[-1:]
        # Caught up (nothing pending, not backed up), a status goes at once again.
        inbox.set_backed_up(False)
        assert send_statuses(tmp_path, statuses[3:4]) is True
        wait_for(lambda: inbox.received == 7, message="one more received")
        assert inbox.take(10) == statuses[3:4]
    finally:
        inbox.stop()
    assert not (tmp_path / "status.sock").exists()


def test_a_status_payload_written_out_directly_is_the_text_dumps_gives() -> None:
    # Workers write a running flow's status text without building the dict; any flow
    # (odd characters, no request id, past its last step, waiting, failed) gets dumps' text.
    base = {"id": 7, "uid": "0f8e", "routine": "rü \"q\"\\\n\x01 ", "request_id": None,
            "state": "RUNNING", "position": 1, "steps": ["a", "b\t😀", "c"], "trigger": "mqtt",
            "wait_topic": None, "wait_match": None, "error": None}
    cases = [{}, {"request_id": "req-é\"1"}, {"position": 3}, {"position": 0, "state": "INIT"},
             {"steps": []}, {"state": "DONE", "position": 2}, {"error": ""},
             {"state": "FAILED", "error": "boom \u0000\n"}, {"state": "WAITING", "wait_topic": "t/1",
                                                             "wait_match": {"k": [1, None]}}, {"state": "WAITING"}]
    for changes in cases:
        flow = store.Row({**base, **changes})
        for child_id in (None, 12):
            assert status_payload_text(flow, child_id) == dumps(flow_status_payload(flow, child_id)), changes
    assert json.loads(status_payload_text(store.Row(base)))["task"] == "b\t😀"


def test_a_result_waits_for_its_flows_last_status_and_nothing_follows_it(
        broker: Broker, db: Any, session_client: Any, config_file: Callable[..., Path]) -> None:
    # The daemon's publisher with a real bridge. Flows 7 and 8 reported RUNNING; their
    # results are committed before their final statuses arrive (as when a worker has
    # committed the end and not sent the status yet). The publisher holds flow 7's
    # result until its DONE status is there and sends it after it. Flow 8's final status
    # never comes: its result goes anyway, within HOLD_S, and a status of flow 8 that
    # turns up after its result is dropped.
    from flowd.config import load_config
    from flowd.mqtt import outbox
    from flowd.mqtt.bridge import MqttBridge
    from flowd.store.models import write_transaction

    def status(flow_id: int, state: str) -> Status:
        return Status(flow_id, state, f"flow/{flow_id}/status", json.dumps({"flow_id": flow_id, "state": state}))

    config = load_config(config_file(broker=broker))
    watcher = session_client(["flow/#"])
    bridge = MqttBridge(config, db)
    bridge.start()
    try:
        wait_for(bridge.is_connected, timeout=10, message="bridge connected")
        assert send_statuses(config.state_dir, [status(7, "RUNNING"), status(8, "RUNNING")])
        wait_for(lambda: len(watcher.json_on("flow/+/status")) == 2, message="the RUNNING statuses")
        with write_transaction():
            outbox.add_message("flow/7/result", {"flow_id": 7, "state": "DONE"})
            outbox.add_message("flow/8/result", {"flow_id": 8, "state": "DONE"})
        outbox.notify(config.state_dir)
        wait_for(lambda: bridge.publisher._held, message="the results held for their statuses")
        assert not watcher.json_on("flow/+/result")
        assert send_statuses(config.state_dir, [status(7, "DONE")])
        wait_for(lambda: len(watcher.json_on("flow/+/result")) == 2, message="both results")
        assert [(t.rsplit("/", 1)[1], json.loads(p)["state"]) for t, p, _, _ in watcher.received("flow/7/+")] == [
            ("status", "RUNNING"), ("status", "DONE"), ("result", "DONE")]
        assert send_statuses(config.state_dir, [status(8, "DONE"), status(9, "RUNNING")])
        wait_for(lambda: watcher.json_on("flow/9/status"), message="the status after the late one")
        assert [json.loads(p)["state"] for _, p, _, _ in watcher.received("flow/8/status")] == ["RUNNING"]
        wait_for(bridge.publisher.is_empty, message="everything acknowledged")
    finally:
        bridge.stop_intake()
        bridge.stop(drain=2)


def test_a_routine_status_outside_steps_states_off_is_refused(db: Any) -> None:
    from flowd.errors import InputError

    with pytest.raises(InputError, match=r"routine 'r': status 'verbose' is not one of steps, states, off"):
        catalog.save_routine("r", ["double"], status="verbose")


def test_decode_statuses_refuses_what_it_cannot_read() -> None:
    status = Status(7, "DONE", "flow/7/status", '{"routine":"é\u2028"}')
    good = encode_statuses([status, status])[0]
    assert decode_statuses(good) == [status, status]
    for bad in (good + b"\x00x", good.replace(b"DONE", b"\xffONE"), b"x\x00a\x00b\x00c"):
        with pytest.raises(ValueError):
            decode_statuses(bad)


def test_statuses_backed_up_keep_one_per_flow_until_they_can_go_again(tmp_path: Path) -> None:
    inbox = StatusInbox(tmp_path / "status.sock")  # not started: put() and take() only
    first = [Status(1, "RUNNING", "flow/1/status", str(n)) for n in range(3)]
    inbox.put([*first, Status(2, "RUNNING", "flow/2/status", "a")])
    inbox.set_backed_up(True)
    later = [Status(1, "RUNNING", "flow/1/status", str(n)) for n in range(3, 5)]
    inbox.put(later)
    inbox.set_backed_up(True)  # still backed up: nothing more to coalesce
    assert inbox.take(10) == []  # behind: each waits BEHIND_WAIT_S for a newer one of its flow
    # Then in the order their latest came.
    assert inbox.take(10, now=time.monotonic() + BEHIND_WAIT_S) == [Status(2, "RUNNING", "flow/2/status", "a"),
                                                                   Status(1, "RUNNING", "flow/1/status", "4")]
    inbox.set_backed_up(False)  # and nothing pending: caught up
    inbox.put(first)
    assert inbox.take(10) == first


def test_behind_a_slow_flows_status_still_goes_while_its_step_runs(
        broker: Broker, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, task_dir: Path,
        routines: None) -> None:
    # The broker is frozen while 150 flows run, so statuses back up; then it thaws with a
    # flow whose second step sleeps 4 s just started. Behind, each flow's latest status
    # waits BEHIND_WAIT_S for a newer one; the slow flow has none coming for 4 s, so its
    # step-1 status must go out long before the step ends, not at the publisher's idle
    # timeout or with the result.
    catalog.save_task("long-nap", "mqtt_steps.Nap", options={"nap": 4}, task_paths=[str(task_dir)])
    catalog.save_routine("slow-middle", ["double", "long-nap", "double"])
    watcher = session_client(["flow/#", "flowd/#"])
    start(flowd_proc, config_file(broker=broker), watcher)
    with frozen(broker):
        fast = run_triples(150)
        slow = api.submit_flow("slow-middle").id
        wait_for(lambda: Flow.get_by_id(slow).position == 1, timeout=10, message="the slow step to start")
    thawed = time.monotonic()
    for flow_id in fast:
        result_of(watcher, flow_id)
    step_one = wait_for(lambda: [p for kind, p in messages_of(watcher, slow)
                                 if kind == "status" and p["position"] == 1],
                        timeout=10, message="the slow flow's status after step 1")
    seen_after = time.monotonic() - thawed
    assert step_one[0]["state"] == "RUNNING"
    assert not watcher.json_on(f"flow/{slow}/result") and seen_after < 2.5, seen_after  # its step still runs
    assert [kind for kind, _ in messages_of(watcher, slow)][-1] == "status"
    assert result_of(watcher, slow)["state"] == "DONE"


def test_behind_ends_once_caught_up_however_the_last_status_went(tmp_path: Path) -> None:
    # Behind, a flow's status waits for a newer one. Once the publisher can send again and
    # the last pending status went with its flow's result, the inbox is caught up: a lone
    # flow's statuses go at once and each of them, not coalesced to its latest.
    inbox = StatusInbox(tmp_path / "status.sock")  # not started: put() and take() only
    inbox.set_backed_up(True)
    inbox.put([Status(1, "RUNNING", "flow/1/status", "a")])
    inbox.set_backed_up(False)  # room again, but one status still pending: still behind
    assert inbox.take(10) == []
    assert inbox.take_before_result(1) == [Status(1, "RUNNING", "flow/1/status", "a")]
    alone = [Status(2, "RUNNING", "flow/2/status", "b"), Status(2, "DONE", "flow/2/status", "c")]
    inbox.put(alone)
    assert inbox.take(10) == alone
