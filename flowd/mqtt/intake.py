"""Messages from the broker, handled in arrival order by one thread, with group commit.

paho calls ``on_message`` once per message on its network thread. Handing each to
the engine there would cost one transaction and one fsync per submit, and hold the
network thread while it waits for the disk. Instead the
bridge queues the message here; this thread takes whatever has arrived, stores a run
of consecutive submits in one transaction (``Engine.submit_many``), makes it durable
once (``models.make_durable``), and only then sends the PUBACKs, in arrival order
(SPEC 4.5). A message alone is handled at once: nothing waits for company, and under
load the batches grow by themselves.

A message that could not be handled is not acknowledged: the broker delivers it again
on the next connection. Neither is one received on an earlier connection, whose
packet id means nothing on the current one.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from flowd.store import integrity
from flowd.store.models import make_durable

log = logging.getLogger(__name__)

MAX_BATCH = 256  # messages per transaction: bounds the time a PUBACK waits behind others


class Received(NamedTuple):
    """One message as paho delivered it, with the connection it came on (a named tuple:
    made once per submit, at a fifth of a frozen dataclass's cost)."""

    topic: str
    payload: bytes
    properties: Any
    mid: int
    qos: int
    retain: bool
    connection: int


class Handler(Protocol):
    """What the intake calls (``flowd.mqtt.bridge.MqttBridge``)."""

    def is_submit(self, topic: str) -> bool: ...

    def handle_submits(self, messages: list[Received]) -> None:
        """Store a run of submits (or refuse them) in one transaction; raises if it could not."""
        ...

    def handle_event(self, topic: str, payload: bytes, retained: bool = False) -> None: ...


class Intake:
    """The thread between paho's network thread and the engine.

    >>> intake = Intake(bridge, ack=bridge.ack); intake.start()
    >>> intake.put(received)         # from on_message
    >>> intake.stop()                # finishes the batch in hand; the rest stays unacknowledged
    """

    def __init__(self, handler: Handler, ack: Callable[[Received], None]):
        self.handler = handler
        self.ack = ack
        self._queue: collections.deque[Received] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._waiting = False  # the thread waits (or is about to) for a message: put() must notify
        self._thread: threading.Thread | None = None
        self.batches = 0   # batches taken (each: its submit runs share a transaction, then one sync)
        self.messages = 0
        self.acknowledged = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flowd-intake", daemon=True)
        self._thread.start()

    def put(self, message: Received) -> None:
        """Queue a message; the lock and the wake-up only when the thread waits for one
        (under load it is busy with the last batch: a submit costs a deque append)."""
        self._queue.append(message)
        if self._waiting:  # read after the append: see _take
            with self._ready:
                self._ready.notify()

    def pending(self) -> int:
        return len(self._queue)

    def stop(self, timeout: float = 10.0) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[Received] | None:
        with self._ready:
            # The flag goes up before the queue is looked at, and put() appends before it
            # reads the flag: either this sees the message or put() sees the flag and
            # waits for the lock, which wait() releases, to notify.
            self._waiting = True
            while not self._queue and not self._stopping:
                self._ready.wait()
            self._waiting = False
            if self._stopping:
                return None
            batch: list[Received] = []
            while self._queue and len(batch) < MAX_BATCH:
                batch.append(self._queue.popleft())
            self.batches += 1
            self.messages += len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            handled = self._handle(batch)
            try:
                if handled:
                    make_durable()  # one fsync for the whole batch, before any PUBACK
            except OSError:
                log.exception("MQTT: could not sync the database; %d message(s) stay unacknowledged",
                              len(handled))
                continue
            for message in handled:
                try:
                    self.ack(message)
                    self.acknowledged += 1
                except Exception:
                    log.exception("MQTT: could not acknowledge message %d on '%s'", message.mid, message.topic)

    def _handle(self, batch: list[Received]) -> list[Received]:
        """Handle in order: each run of submits in one transaction, events one by one;
        returns the messages handled (the others stay unacknowledged)."""
        handled: list[Received] = []
        run: list[Received] = []
        for position, message in enumerate(batch):
            submit = self.handler.is_submit(message.topic)
            if submit:
                run.append(message)
            if run and (not submit or position == len(batch) - 1):
                try:
                    self.handler.handle_submits(run)
                    handled.extend(run)
                except Exception as exc:
                    if not integrity.note_damage(exc, "the MQTT intake"):  # damage: the daemon stops
                        log.exception("MQTT: could not store %d submit(s); the broker sends them again on the "
                                      "next connection", len(run))
                run = []
            if submit:
                continue
            try:
                self.handler.handle_event(message.topic, message.payload, message.retain)
            except Exception as exc:
                if not integrity.note_damage(exc, f"the MQTT intake (a message on '{message.topic}')"):
                    log.exception("MQTT: could not handle a message on '%s'", message.topic)
                continue
            handled.append(message)
        return handled
