"""Group commit of submits: one transaction and one sync per batch, PUBACKs only after it."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import wait_for

from flowd import catalog
from flowd.store.models import Flow


def test_submits_that_arrive_together_share_a_commit_and_are_acknowledged_only_after_it(
        broker: Any, db: Any, task_dir: Path, session_client: Any, config_file: Callable[..., Path]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from flowd.config import load_config
    from flowd.mqtt.bridge import MqttBridge

    catalog.save_task("double", "mqtt_steps.Double", task_paths=[str(task_dir)])
    catalog.save_routine("ok", ["double"])
    watcher = session_client(["flow/error"])
    bridge = MqttBridge(load_config(config_file(broker=broker)), db)
    bridge.start()
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sender", protocol=mqtt.MQTTv5)
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    holder = sqlite3.connect(str(db.config.database.url.removeprefix("sqlite:///")), isolation_level=None)
    try:
        wait_for(bridge.is_connected, timeout=10, message="bridge connected")
        # A probe is answered once flowd's subscription is in place (one taken before it is lost).
        wait_for(lambda: watcher.json_on("flow/error") or (sender.publish("flow/submit", b"[]", qos=1) and None),
                 timeout=10, interval=0.3, message="flowd subscribed")
        time.sleep(0.5)
        probes = bridge.intake.messages
        errors_before = len(watcher.json_on("flow/error"))
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock: nothing can be stored
        payloads = [{"routine": "ok", "kwargs": {"x": n}, "request_id": f"r-{n}"} for n in range(40)]
        payloads[7] = {"routine": "nope", "request_id": "r-bad"}
        for payload in payloads:
            sender.publish("flow/submit", json.dumps(payload), qos=1)
        sender.publish("flow/submit", b"{not json", qos=1)
        wait_for(lambda: bridge.intake.pending() + bridge.intake.messages == probes + 41, timeout=10,
                 message="all submits reached flowd")
        time.sleep(0.5)
        assert bridge.intake.acknowledged == probes, "flowd acknowledged a submit before its flow could be stored"
        holder.execute("ROLLBACK")
        wait_for(lambda: bridge.intake.acknowledged == probes + 41, timeout=20,
                 message="flowd acknowledged every submit")
        stored = {f.request_id for f in Flow.select(Flow.request_id)}
        assert stored == {f"r-{n}" for n in range(40) if n != 7}
        # The first submit waited for the lock alone; the 40 behind it came in one or two batches.
        assert bridge.intake.messages == probes + 41
        batches = bridge.intake.batches - probes  # each probe came alone
        assert batches <= 3, batches  # the first submit alone (it waited for the lock), the rest in 1 or 2
        errors = wait_for(lambda: len(watcher.json_on("flow/error")) == errors_before + 2
                          and watcher.json_on("flow/error")[errors_before:], timeout=10, message="two refusals")
        assert "routine 'nope'" in errors[0]["error"] and errors[0]["request_id"] == "r-bad"
        assert "not valid JSON" in errors[1]["error"]
    finally:
        holder.close()
        sender.loop_stop()
        sender.disconnect()
        bridge.stop_intake()
        bridge.stop(drain=2)


class _Events:
    """A handler taking only events, recording them (no database)."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def is_submit(self, topic: str) -> bool:
        return False

    def handle_submits(self, messages: list[Any]) -> None:
        raise AssertionError("no submits here")

    def handle_event(self, topic: str, payload: bytes, retained: bool = False) -> None:
        self.seen.append(payload)


def test_a_message_put_while_the_intake_waits_or_works_is_never_left_waiting() -> None:
    # put() notifies only while the thread waits; a message put at any moment of its
    # loop (waiting, about to wait, busy) is still handled at once, not at the next one.
    import random
    import threading

    from flowd.mqtt.intake import Intake, Received

    handler = _Events()
    intake = Intake(handler, ack=lambda message: None)
    intake.start()
    try:
        sent = 0
        for round_ in range(300):  # lone messages, each with the thread at a random point
            time.sleep(random.random() * 0.0005)
            intake.put(Received("t", str(sent).encode(), None, 0, 0, False, 0))
            sent += 1
            wait_for(lambda: len(handler.seen) == sent, 2, message=f"message {round_}")  # noqa: B023

        def burst() -> None:
            for index in range(5000):
                intake.put(Received("t", b"b%d" % index, None, 0, 0, False, 0))

        producers = [threading.Thread(target=burst) for _ in range(2)]
        for producer in producers:
            producer.start()
        for producer in producers:
            producer.join()
        wait_for(lambda: len(handler.seen) == sent + 10000, 5, message="every message of the bursts")
    finally:
        intake.stop()
