"""``flowd run`` over MQTT: submits in, status/result/replies out, retained online/offline.

Everything is real: mosquitto on a free port, ``flowd run`` as a subprocess with its
huey workers, the SQLite file read back from this process. Tasks and routines are
written with flowd.catalog before the daemon starts.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_for

from flowd import catalog
from flowd.store.models import Flow, Outbox


@pytest.fixture
def routines(db: Any, task_dir: Path, tmp_path: Path) -> Path:
    """'triple' doubles a value three times; 'napper' sleeps; 'local' may not start over MQTT."""
    paths = [str(task_dir)]
    catalog.save_task("double", "mqtt_steps.Double", task_paths=paths)
    catalog.save_task("nap", "mqtt_steps.Nap", options={"nap": 0.3}, task_paths=paths)
    catalog.save_task("wait-door", "t.WaitFor", options={"topic": "sensors/+/door", "match": {"open": True}},
                      task_paths=paths)
    catalog.save_routine("triple", ["double", "double", "double"])
    catalog.save_routine("napper", ["nap"])
    catalog.save_routine("local", ["double"], mqtt=False)
    catalog.save_routine("door", ["wait-door", "double"])
    return tmp_path


def start_daemon(broker: Any, config_file: Callable[..., Path], flowd_proc: Any, watcher: Any,
                 **sections: Any) -> Any:
    """Start flowd and wait until its retained ``online`` status arrives (it subscribed first)."""
    proc = flowd_proc(config_file(broker=broker, **sections))
    before = len(watcher.json_on("flowd/testnode/status"))
    wait_for(lambda: [m for m in watcher.json_on("flowd/testnode/status")[before:] if m["state"] == "online"],
             timeout=20, message=f"flowd online; log:\n{proc.log_text()}")
    return proc


def results(watcher: Any) -> dict[int, dict[str, Any]]:
    return {m["flow_id"]: m for m in watcher.json_on("flow/+/result")}


def test_submit_publishes_each_step_then_the_result(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                                    session_client: Any, routines: Path) -> None:
    # A device submits "triple" with value 1; it sees flow/<id>/status for every step
    # (RUNNING at positions 0, 1, 2, then DONE) and one flow/<id>/result with value 8.
    watcher = session_client(["flow/#", "flowd/#"])
    start_daemon(broker, config_file, flowd_proc, watcher)
    watcher.publish("flow/submit", {"routine": "triple", "args": ["a"], "kwargs": {"value": 1},
                                    "request_id": "r-1"})
    result = wait_for(lambda: next(iter(results(watcher).values()), None), timeout=20, message="a result")
    assert result["state"] == "DONE"
    assert result["request_id"] == "r-1"
    assert result["routine"] == "triple"
    assert result["result"] == {"args": ["a"], "kwargs": {"value": 8}}
    assert result["started_at"].endswith("Z") and result["finished_at"] >= result["started_at"]
    flow_id = result["flow_id"]
    statuses = watcher.json_on(f"flow/{flow_id}/status")
    assert [s["position"] for s in statuses if s["state"] == "RUNNING"] == [0, 1, 2]
    assert statuses[-1]["state"] == "DONE"
    assert all(s["steps"] == 3 and s["uid"] == result["uid"] and s["request_id"] == "r-1" for s in statuses)
    assert [s["task"] for s in statuses if s["state"] == "RUNNING"] == ["double", "double", "double"]
    # Delivered means acknowledged means deleted.
    wait_for(lambda: Outbox.select().count() == 0, message="outbox empty after PUBACKs")
    assert Flow.get_by_id(flow_id).trigger == "mqtt"


def test_reply_to_gets_accepted_then_result(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                            session_client: Any, routines: Path) -> None:
    # reply_to in the payload: INIT ("accepted") first, then the same result as flow/<id>/result.
    watcher = session_client(["flow/#", "flowd/#", "app/#"])
    start_daemon(broker, config_file, flowd_proc, watcher)
    watcher.publish("flowd/testnode/submit", {"routine": "triple", "kwargs": {"value": 2}, "reply_to": "app/r/7"})
    replies = wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(watcher.json_on("app/r/7")), timeout=20,
                       message="accepted + result on reply_to")
    assert replies[0]["state"] == "INIT"
    assert replies[1]["state"] == "DONE" and replies[1]["result"]["kwargs"] == {"value": 16}
    assert replies[1] == results(watcher)[replies[1]["flow_id"]]


def test_mqtt5_response_topic_and_correlation_data(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                                   session_client: Any, routines: Path) -> None:
    # MQTT 5 request/response: no reply_to in the payload, the Response Topic property
    # instead; every answer carries the request's Correlation Data back.
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    watcher = session_client(["flow/#", "flowd/#", "rr/#"])
    start_daemon(broker, config_file, flowd_proc, watcher)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "rr/answer"
    props.CorrelationData = b"\x00\x01corr"
    watcher.publish("flow/submit", {"routine": "triple", "kwargs": {"value": 3}}, properties=props)
    answers = wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(watcher.received("rr/answer")), timeout=20,
                       message="two answers on the response topic")
    assert [json.loads(p)["state"] for _, p, _, _ in answers] == ["INIT", "DONE"]
    assert all(getattr(props, "CorrelationData", None) == b"\x00\x01corr" for _, _, props, _ in answers)

    # A refusal answers there too, with the correlation data.
    props.CorrelationData = b"bad-one"
    watcher.publish("flow/submit", {"routine": "no-such-routine"}, properties=props)
    refusal = wait_for(lambda: watcher.received("rr/answer")[2:], timeout=10, message="refusal on response topic")
    assert "no-such-routine" in json.loads(refusal[0][1])["error"]
    assert refusal[0][2].CorrelationData == b"bad-one"


def test_repeated_request_id_starts_no_second_flow(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                                   session_client: Any, routines: Path) -> None:
    # The same request_id twice: one flow; the second submit is answered with that flow's
    # current status on its reply_to.
    watcher = session_client(["flow/#", "flowd/#", "app/#"])
    start_daemon(broker, config_file, flowd_proc, watcher)
    watcher.publish("flow/submit", {"routine": "triple", "request_id": "once", "kwargs": {"value": 1}})
    first = wait_for(lambda: next(iter(results(watcher).values()), None), timeout=20, message="first result")
    watcher.publish("flow/submit", {"routine": "triple", "request_id": "once", "reply_to": "app/again"})
    again = wait_for(lambda: watcher.json_on("app/again"), timeout=10, message="answer to the repeat")
    assert len(again) == 1
    assert again[0]["flow_id"] == first["flow_id"] and again[0]["state"] == "DONE"
    # Without reply_to the answer goes to flow/<id>/status.
    before = len(watcher.json_on(f"flow/{first['flow_id']}/status"))
    watcher.publish("flow/submit", {"routine": "napper", "request_id": "once"})
    wait_for(lambda: len(watcher.json_on(f"flow/{first['flow_id']}/status")) > before, timeout=10,
             message="status answer for a repeat without reply_to")
    assert Flow.select().count() == 1


def test_routine_with_mqtt_false_is_refused(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                            session_client: Any, routines: Path) -> None:
    watcher = session_client(["flow/#", "flowd/#", "app/#"])
    proc = start_daemon(broker, config_file, flowd_proc, watcher)
    watcher.publish("flow/submit", {"routine": "local", "request_id": "r-local", "reply_to": "app/local"})
    error = wait_for(lambda: watcher.json_on("flow/error"), timeout=10, message="flow/error")
    assert error == [{"error": "routine 'local' may not be started over MQTT (mqtt = false)",
                      "request_id": "r-local", "topic": "flow/submit"}]
    assert wait_for(lambda: watcher.json_on("app/local"), message="refusal on reply_to") == error
    assert Flow.select().count() == 0
    assert proc.proc.poll() is None


def test_wait_step_resumes_on_a_matching_message(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                                 session_client: Any, routines: Path) -> None:
    # Step 1 waits for sensors/+/door with {"open": true}. flowd subscribes that filter
    # when the flow starts waiting; a non-matching message changes nothing, a matching
    # one resumes the flow with the message as kwargs["event"].
    watcher = session_client(["flow/#", "flowd/#"])
    start_daemon(broker, config_file, flowd_proc, watcher)
    watcher.publish("flow/submit", {"routine": "door", "kwargs": {"value": 5}})
    wait_for(lambda: [s for s in watcher.json_on("flow/+/status") if s["state"] == "WAITING"], timeout=20,
             message="flow WAITING")
    watcher.publish("sensors/hall/door", {"open": False})
    watcher.publish("sensors/hall/door", b"\xff not json")
    watcher.publish("sensors/hall/door", {"open": True, "by": "cat"})
    result = wait_for(lambda: next(iter(results(watcher).values()), None), timeout=20, message="result")
    assert result["state"] == "DONE"
    assert result["result"]["kwargs"]["value"] == 10
    assert result["result"]["kwargs"]["event"] == {"open": True, "by": "cat"}


def test_online_retained_offline_on_sigterm_and_as_last_will(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, mqtt_client: Any,
        routines: Path) -> None:
    # Retained flowd/<node>/status: online while running; offline after SIGTERM (published,
    # since a clean disconnect sends no will) and offline after kill -9 (the Last Will).
    watcher = session_client(["flowd/#"])
    proc = start_daemon(broker, config_file, flowd_proc, watcher)
    online = [m for m in watcher.json_on("flowd/testnode/status") if m["state"] == "online"][-1]
    assert online["version"] and online["since"].endswith("Z")
    assert proc.terminate() == 0
    late = mqtt_client()
    late.subscribe("flowd/testnode/status")
    assert wait_for(lambda: late.json_on("flowd/testnode/status"))[-1]["state"] == "offline"
    assert "flowd stopped" in proc.log_text()

    proc = start_daemon(broker, config_file, flowd_proc, watcher)
    proc.kill9()
    wait_for(lambda: watcher.json_on("flowd/testnode/status")[-1]["state"] == "offline", timeout=10,
             message="Last Will after kill -9")
    newcomer = session_client(["flowd/#"], client_id="newcomer")
    retained = wait_for(lambda: newcomer.received("flowd/testnode/status"), message="retained status")
    assert retained[-1][3] is True and json.loads(retained[-1][1])["state"] == "offline"


def test_mqtt_3_1_1_end_to_end(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                               session_client: Any, routines: Path) -> None:
    watcher = session_client(["flow/#", "flowd/#"])
    proc = start_daemon(broker, config_file, flowd_proc, watcher, mqtt={"protocol": "3.1.1"})
    watcher.publish("flow/submit", {"routine": "triple", "kwargs": {"value": 4}})
    result = wait_for(lambda: next(iter(results(watcher).values()), None), timeout=20, message="result")
    assert result["result"]["kwargs"] == {"value": 32}
    assert "MQTT 3.1.1" in proc.log_text()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0


def test_shared_subscription_splits_submits_between_members(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, mqtt_client: Any,
        routines: Path) -> None:
    # With [mqtt] shared_group flowd takes the common topic as $share/<group>/flow/submit:
    # another member of the group gets its share and flowd runs only the rest, once each.
    watcher = session_client(["flow/#", "flowd/#"])
    start_daemon(broker, config_file, flowd_proc, watcher, mqtt={"shared_group": "edge"})
    other = mqtt_client()
    other.subscribe("$share/edge/flow/submit")
    for n in range(10):
        watcher.publish("flow/submit", {"routine": "triple", "kwargs": {"value": n}})
    wait_for(lambda: len(results(watcher)) + len(other.messages) == 10, timeout=30,
             message="every submit handled by exactly one member")
    assert 0 < len(other.messages) < 10
    assert Flow.select().count() == len(results(watcher)) == 10 - len(other.messages)


class MqttThreeOneOneFront:
    """Makes the real mosquitto look like a broker that predates MQTT 5: a CONNECT for
    protocol level 5 gets the 3.1.1 refusal "unacceptable protocol version" (as old
    brokers answer it), anything else is passed through to mosquitto byte for byte."""

    def __init__(self, broker: Any):
        self.broker = broker
        self.port = free_port()
        self.refused = 0
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _read_packet(sock: socket.socket) -> bytes:
        head = sock.recv(1)
        length, shift, raw = 0, 0, b""
        while True:
            byte = sock.recv(1)
            raw += byte
            length += (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = b""
        while len(body) < length:
            body += sock.recv(length - len(body))
        return head + raw + body

    def _serve(self, client: socket.socket) -> None:
        with client:
            try:
                connect = self._read_packet(client)
                level = connect[connect.index(b"MQTT") + 4]
                if level == 5:
                    self.refused += 1
                    client.sendall(b"\x20\x02\x00\x01")
                    return
                with socket.create_connection((self.broker.host, self.broker.port)) as upstream:
                    upstream.sendall(connect)
                    pair = {client: upstream, upstream: client}
                    while True:
                        readable, _, _ = select.select(list(pair), [], [], 1.0)
                        for sock in readable:
                            data = sock.recv(65536)
                            if not data:
                                return
                            pair[sock].sendall(data)
            except (OSError, IndexError, ValueError):
                return

    def close(self) -> None:
        self.server.close()


def test_falls_back_to_mqtt_3_1_1_when_the_broker_refuses_mqtt_5(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        routines: Path) -> None:
    # An older broker answers an MQTT 5 CONNECT with "unacceptable protocol version":
    # flowd says so once, switches to 3.1.1 and serves as usual.
    front = MqttThreeOneOneFront(broker)
    try:
        watcher = session_client(["flow/#", "flowd/#"])
        path = config_file(broker=broker, mqtt={"port": front.port})
        proc = flowd_proc(path)
        wait_for(lambda: watcher.json_on("flowd/testnode/status"), timeout=20,
                 message=f"online through the front; log:\n{proc.log_text()}")
        watcher.publish("flow/submit", {"routine": "triple", "kwargs": {"value": 1}})
        result = wait_for(lambda: next(iter(results(watcher).values()), None), timeout=20, message="result")
        assert result["result"]["kwargs"] == {"value": 8}
        assert front.refused == 1
        assert proc.log_text().count("does not speak MQTT 5; using MQTT 3.1.1") == 1
    finally:
        front.close()
