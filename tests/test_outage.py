"""Store and forward (SPEC 4.4): broker outages, daemon stops and kill -9.

The watcher is a test client with a persistent session on the broker, so it misses
nothing flowd publishes around a broker restart. mosquitto runs with persistence, as a
real broker would, so sessions and queued QoS 1 messages survive its restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, free_port, wait_for

from flowd import api, catalog
from flowd.store.models import Flow, FlowState, Outbox, database, get_meta


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """This module's broker must really persist sessions across its restart, and save
    them often (conftest's broker runs as root so it can write its database here)."""
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
    catalog.save_task("nap", "mqtt_steps.Nap", task_paths=paths)
    catalog.save_routine("napper", ["nap", "double"])
    catalog.save_routine("triple", ["double", "double", "double"])


def online(watcher: Any, after: int = 0) -> Callable[[], bool]:
    return lambda: any(m["state"] == "online" for m in watcher.json_on("flowd/testnode/status")[after:])


def results(watcher: Any) -> dict[int, dict[str, Any]]:
    return {m["flow_id"]: m for m in watcher.json_on("flow/+/result")}


def assert_in_order_per_flow(watcher: Any) -> None:
    """Per flow: statuses advance, DONE status, then the one result. A status after it can
    only answer a submit the broker delivered again (it lost our PUBACK when it stopped)."""
    by_flow: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for topic, payload in zip([m[0] for m in watcher.received("flow/+/+")], watcher.json_on("flow/+/+"),
                              strict=True):
        by_flow.setdefault(payload["flow_id"], []).append((topic.rsplit("/", 1)[1], payload))
    for flow_id, messages in by_flow.items():
        kinds = [kind for kind, _ in messages]
        assert kinds.count("result") == 1, (flow_id, kinds)
        end = kinds.index("result")
        positions = [p["position"] for kind, p in messages[:end] if p["state"] == "RUNNING"]
        assert positions == sorted(positions), (flow_id, positions)
        assert messages[end - 1][1]["state"] == "DONE"
        assert all(kind == "status" and p["state"] == "DONE" for kind, p in messages[end + 1:]), (flow_id, kinds)


def test_broker_outage_mid_run_every_result_arrives_in_order(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None) -> None:
    # Six flows are under way when the broker goes down. flowd keeps running them and
    # keeps their messages in the outbox; when the broker is back (same port) the
    # outbox drains in order and every result arrives; then the outbox is empty.
    watcher = session_client(["flow/#", "flowd/#"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(online(watcher), timeout=20, message="flowd online")
    for n in range(6):
        watcher.publish("flow/submit", {"routine": "napper", "kwargs": {"nap": 1.0, "value": n},
                                        "request_id": f"out-{n}"})
    wait_for(lambda: Flow.select().count() == 6 and Flow.select().where(Flow.state == "RUNNING").count(),
             timeout=20, message="six flows stored, one running")
    broker.stop()
    wait_for(lambda: Flow.select().where(Flow.state == FlowState.DONE.value).count() == 6, timeout=40,
             message=f"all flows DONE without a broker; log:\n{proc.log_text()[-2000:]}")
    assert Outbox.select().count() > 0  # kept for the broker
    assert proc.proc.poll() is None
    broker.start()
    got = wait_for(lambda: (lambda r: r if len(r) == 6 else None)(results(watcher)), timeout=60,
                   message=f"six results after the outage; log:\n{proc.log_text()[-2000:]}")
    assert sorted(r["request_id"] for r in got.values()) == [f"out-{n}" for n in range(6)]
    assert all(r["state"] == "DONE" for r in got.values())
    assert_in_order_per_flow(watcher)
    wait_for(lambda: Outbox.select().count() == 0, timeout=20, message="outbox empty")
    log = proc.log_text()
    assert log.count("lost the connection to the broker") == 1
    assert log.count("MQTT: connected to") == 2


def test_submits_sent_while_flowd_was_stopped_run_when_it_returns(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None) -> None:
    # flowd has a persistent session: QoS 1 submits published while it is stopped wait
    # in the broker and run when it starts again.
    watcher = session_client(["flow/#", "flowd/#"])
    path = config_file(broker=broker)
    first = flowd_proc(path)
    wait_for(online(watcher), timeout=20, message="flowd online")
    assert first.terminate() == 0
    for n in range(3):
        watcher.publish("flow/submit", {"routine": "triple", "kwargs": {"value": n}, "request_id": f"late-{n}"})
    seen = len(watcher.json_on("flowd/testnode/status"))
    flowd_proc(path)
    wait_for(online(watcher, seen), timeout=20, message="flowd online again")
    got = wait_for(lambda: (lambda r: r if len(r) == 3 else None)(results(watcher)), timeout=30,
                   message="three results")
    assert sorted(r["result"]["kwargs"]["value"] for r in got.values()) == [0, 8, 16]
    assert Flow.select().count() == 3


def test_kill_9_mid_flow_finishes_after_restart(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None,
        tmp_path: Path) -> None:
    # kill -9 of the whole daemon (pool and workers too) while a step runs: after the
    # restart the flow resumes at that step, ends DONE, and its result is published.
    watcher = session_client(["flow/#", "flowd/#"])
    path = config_file(broker=broker)
    proc = flowd_proc(path)
    wait_for(online(watcher), timeout=20, message="flowd online")
    marker = tmp_path / "nap-started.txt"
    watcher.publish("flow/submit", {"routine": "napper", "kwargs": {"nap": 3, "marker": str(marker), "value": 1},
                                    "request_id": "crash-1"})
    wait_for(marker.exists, timeout=20, message="the step started")
    proc.kill9()
    assert Flow.get(Flow.request_id == "crash-1").state == FlowState.RUNNING.value
    seen = len(watcher.json_on("flowd/testnode/status"))
    flowd_proc(path)
    wait_for(online(watcher, seen), timeout=20, message="flowd online again")
    result = wait_for(lambda: next(iter(results(watcher).values()), None), timeout=30, message="result")
    assert result["request_id"] == "crash-1" and result["state"] == "DONE"
    assert result["result"]["kwargs"]["value"] == 2
    assert len(marker.read_text().splitlines()) == 2  # the interrupted step ran again, once
    assert Flow.select().count() == 1


def test_kill_9_after_receiving_a_submit_before_storing_it_loses_nothing(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None) -> None:
    # flowd acknowledges a submit only after the flow is committed. Here the database is
    # held locked so the submit cannot be stored; flowd is killed while it waits. The
    # broker still holds the unacknowledged message and delivers it to the next flowd.
    watcher = session_client(["flow/#", "flowd/#"])
    path = config_file(broker=broker, flowd={"log_level": "debug"})
    proc = flowd_proc(path)
    wait_for(online(watcher), timeout=20, message="flowd online")
    db = database.obj
    db.execute_sql("BEGIN IMMEDIATE")
    try:
        watcher.publish("flow/submit", {"routine": "triple", "kwargs": {"value": 1}, "request_id": "held"})
        wait_for(lambda: "on 'flow/submit'" in proc.log_text(), timeout=10, message="flowd received the submit")
        proc.kill9()
    finally:
        db.execute_sql("ROLLBACK")
    assert Flow.select().count() == 0
    seen = len(watcher.json_on("flowd/testnode/status"))
    again = flowd_proc(path)
    wait_for(online(watcher, seen), timeout=20, message="flowd online again")
    result = wait_for(lambda: next(iter(results(watcher).values()), None), timeout=30,
                      message=f"result of the redelivered submit; log:\n{again.log_text()[-2000:]}")
    assert result["request_id"] == "held" and result["result"]["kwargs"] == {"value": 8}
    assert Flow.select().count() == 1


def test_broker_down_at_start_flows_still_run_and_publish_later(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None) -> None:
    # The broker is down when flowd starts: flowd starts anyway, runs flows submitted
    # through the API (as flowctl does), says once why it cannot connect, and publishes
    # when the broker appears: every result (kept in the outbox) and, for each flow, only
    # its latest status (statuses are kept in memory, coalesced, while the broker is away).
    watcher = session_client(["flow/#", "flowd/#"])
    broker.stop()
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: " ready: node 'testnode'" in proc.log_text(), timeout=20, message="flowd ready")
    flows = [api.submit_flow("triple", value=n, request_id=f"offline-{n}") for n in range(3)]
    wait_for(lambda: all(api.get_flow(f.id).state == FlowState.DONE.value for f in flows), timeout=30,
             message="flows DONE with no broker")
    assert sorted(row.topic for row in Outbox.select()) == sorted(f"flow/{f.id}/result" for f in flows)
    reasons = [line for line in proc.log_text().splitlines() if "refused the connection" in line]
    assert len(reasons) == 1 and "WARNING" in reasons[0]
    broker.start()
    got = wait_for(lambda: (lambda r: r if len(r) == 3 else None)(results(watcher)), timeout=60,
                   message="three results once the broker is up")
    assert sorted(r["request_id"] for r in got.values()) == ["offline-0", "offline-1", "offline-2"]
    assert_in_order_per_flow(watcher)
    for flow in flows:
        assert [s["state"] for s in watcher.json_on(f"flow/{flow.id}/status")] == ["DONE"]
    wait_for(lambda: Outbox.select().count() == 0, timeout=20, message="outbox empty")


def test_outbox_cap_drops_the_oldest_counts_and_logs_them(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None) -> None:
    # mqtt.outbox_max = 6 with the broker away: after 8 flows (a result each; statuses
    # are not stored) the oldest are dropped, counted (Meta outbox_dropped) and logged;
    # the newest 6 are delivered when the broker returns, in order.
    watcher = session_client(["flow/#", "flowd/#"])
    broker.stop()
    proc = flowd_proc(config_file(broker=broker, mqtt={"outbox_max": 6}))
    wait_for(lambda: " ready: node 'testnode'" in proc.log_text(), timeout=20, message="flowd ready")
    flows = [api.submit_flow("triple", value=n) for n in range(8)]
    wait_for(lambda: all(api.get_flow(f.id).state == FlowState.DONE.value for f in flows), timeout=30,
             message="flows DONE")
    wait_for(lambda: "dropped the" in proc.log_text() and Outbox.select().count() <= 6, timeout=20,
             message="the cap enforced")
    dropped = int(get_meta("outbox_dropped", "0") or 0)
    assert dropped >= 8 - 6
    kept = [(row.topic, row.payload) for row in Outbox.select().order_by(Outbox.id)]
    assert kept[-1][0] in {f"flow/{f.id}/result" for f in flows}  # the newest survive
    broker.start()
    wait_for(lambda: Outbox.select().count() == 0, timeout=60, message="outbox drained")
    delivered = [(topic, payload.decode()) for topic, payload, _, _ in watcher.received("flow/+/result")]
    assert delivered == kept


def test_publisher_sends_rows_whose_ids_sqlite_reuses(broker: Any, db: Any, session_client: Any,
                                                      config_file: Callable[..., Path]) -> None:
    # SQLite gives a new row max(id) + 1, so once the outbox is drained the next message
    # gets id 1 again. The publisher must still send it (no high-water mark on ids).
    from flowd.config import load_config
    from flowd.mqtt import outbox
    from flowd.mqtt.bridge import MqttBridge
    from flowd.store.models import write_transaction

    config = load_config(config_file(broker=broker))
    watcher = session_client(["app/#"])
    bridge = MqttBridge(config, db)
    bridge.start()
    try:
        wait_for(bridge.is_connected, timeout=10, message="bridge connected")
        for round_no in range(3):
            with write_transaction():
                for n in range(3):
                    outbox.add_message(f"app/round{round_no}", {"n": n})
            ids = [row.id for row in Outbox.select().where(Outbox.topic == f"app/round{round_no}")]
            assert ids[0] <= 3  # reused ids after the first round
            outbox.notify(config.state_dir)
            # Well inside the publisher's 5 s gap sweep, which would otherwise hide a miss.
            wait_for(lambda r=round_no: len(watcher.json_on(f"app/round{r}")) == 3, timeout=4,
                     message=f"round {round_no} delivered")
            wait_for(lambda: bridge.publisher.is_empty(), timeout=10, message="outbox drained")
        assert [m["n"] for m in watcher.json_on("app/#")] == [0, 1, 2] * 3
    finally:
        bridge.stop_intake()
        bridge.stop(drain=2)
