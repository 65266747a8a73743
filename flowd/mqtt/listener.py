"""A short-lived MQTT subscriber for flowctl and the API (``flowctl nodes``, ``flow
wait``, ``api.wait_flow``).

The client comes from :func:`flowd.mqtt.bridge.new_client` (paho is set up there):
the node's broker settings, a clean session, no Last Will, no session kept on the
broker for a process that is about to exit.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from flowd.config import Config
from flowd.mqtt.bridge import describe_connect_error, new_client

log = logging.getLogger(__name__)


class Listener:
    """Subscribes ``topics`` and calls ``on_message(topic, payload, retained)`` for each
    message, on paho's network thread.

    >>> listener = Listener(config, ["flowd/+/status"], on_message=lambda topic, payload, retained: ...)
    >>> listener.start(); listener.wait_subscribed(3.0); ...; listener.close()
    """

    def __init__(self, config: Config, topics: list[str], on_message: Callable[[str, bytes, bool], None]):
        m = config.mqtt
        self.topics = topics
        self.on_message = on_message
        self.problem: str | None = None  # why the last connection attempt failed, for the user
        self._subscribed = threading.Event()
        self._host, self._port, self._keepalive = m.host, m.port, m.keepalive
        self.client = new_client(config, f"flowctl-{uuid.uuid4().hex[:12]}", v5=m.protocol == "5", persistent=False)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *args: self._subscribed.clear()

    def start(self) -> None:
        """Connect in the background (a broker that is away is retried)."""
        self.client.connect_async(self._host, self._port, self._keepalive)
        self.client.loop_start()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def is_subscribed(self) -> bool:
        return self._subscribed.is_set()

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.problem = f"the broker at {self._host}:{self._port} refused the connection: {reason}"
            return
        self.problem = None
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        exc = self.client.last_error
        self.problem = describe_connect_error(exc, self._host, self._port)[1] if exc else \
            f"cannot connect to the broker at {self._host}:{self._port}"

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self.on_message(message.topic, bytes(message.payload), bool(message.retain))
        except Exception:
            log.exception("MQTT: error handling a message on %r", message.topic)
