"""Store and forward: everything flowd publishes is a row here first (SPEC 4.4),
except status messages, which are progress reports (:mod:`flowd.mqtt.status`).

``add_message`` is called inside the transaction that changes state, so a message
exists if and only if the change it reports was committed. The daemon's
:class:`OutboxPublisher` sends rows in id order and deletes each only after the
broker's PUBACK, so a message survives a broker outage and a daemon crash (it is sent
again at the next start: at-least-once). The same thread sends the statuses the
:class:`~flowd.mqtt.status.StatusInbox` holds, ahead of the rows it reads in a pass, and a
flow's last status ahead of its result.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from flowd import store
from flowd.config import Config
from flowd.engine.lease import is_shared_database
from flowd.errors import InputError
from flowd.mqtt.payloads import has_surrogate, shown
from flowd.mqtt.status import HOLD_S, SOCKET_NAME, STATUS_INFLIGHT, Status, StatusInbox
from flowd.service.wakeup import WakeSocket, drain, send_wakeup
from flowd.store import integrity
from flowd.store.models import dumps, get_meta, make_durable, set_meta, utcnow, write_transaction

log = logging.getLogger(__name__)

WAKE_SOCKET_NAME = "wake-outbox.sock"
MAX_HANDED = 256          # rows handed to the MQTT client and not yet deleted (= its in-flight window)
# The MQTT client's window: rows, statuses, and statuses sent just before their results.
MAX_IN_FLIGHT = MAX_HANDED + STATUS_INFLIGHT + MAX_HANDED
READ_BATCH = 200          # rows read per query
DELETE_BATCH = 100        # delete acknowledged rows once this many are waiting...
DELETE_AFTER_S = 0.5      # ...or once the oldest has waited this long
CAP_CHECK_EVERY_S = 5.0
IDLE_WAIT_S = 5.0         # longest idle sleep: new rows, (re)connects and stop wake it at once
NOT_NOW, NEVER = 0, -1     # what _send returns instead of a mid: the client is busy or away; refused for good


def add_message(topic: str, payload: Any, *, qos: int = 1, retain: bool = False,
                correlation_data: str | None = None, node_id: str | None = None) -> None:
    """Queue a message; call inside the caller's transaction, then :func:`notify` after commit.
    ``node_id``: the node whose publisher sends it (several nodes on one database).

    Raises InputError for text UTF-8 cannot carry (a lone surrogate): it could be
    neither stored nor sent, and would block the outbox behind it."""
    text = payload if isinstance(payload, str) else dumps(payload)
    if has_surrogate(text) or has_surrogate(topic):
        raise InputError(f"cannot queue a message for {shown(topic)}: its topic or payload holds a lone surrogate "
                         "(\\ud800-\\udfff), which is not UTF-8 text")
    store.insert_message(topic, text, qos, retain, correlation_data, utcnow(), node_id)


def notify(state_dir: str | Path) -> None:
    """Wake the daemon's publisher (no-op when the daemon is not running)."""
    send_wakeup(os.path.join(state_dir, WAKE_SOCKET_NAME))


class Sender(Protocol):
    """The MQTT side the publisher hands rows to (``flowd.mqtt.bridge.MqttBridge``)."""

    def is_connected(self) -> bool: ...

    def send(self, topic: str, payload: bytes, qos: int, retain: bool, correlation_data: bytes | None) -> int | None:
        """Hand one message to the client: its mid, or None when it cannot take it now.
        Raises ValueError for a message no broker will ever take (bad topic, too big)."""
        ...


def _correlation_bytes(value: str | None) -> bytes | None:
    if not value:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return value.encode("utf-8")


class OutboxPublisher:
    """Thread that moves Outbox rows to the broker and deletes them once acknowledged,
    and sends the status messages of :attr:`statuses` (never stored, never retried).

    Rows are handed to the client in id order while it is connected, at most
    ``MAX_HANDED`` at a time. On a reconnect the bridge takes back what paho still
    holds (``drop_out_messages``) and this thread hands it over again from the oldest,
    so the order on the wire stays the order of the rows.
    A row is identified by the set of ids handed over, not by a high-water mark:
    SQLite reuses the highest ids once they are deleted.

    >>> publisher = OutboxPublisher(config, bridge, before_send=bridge.check_statuses)
    >>> publisher.start(); ...; publisher.drain(3.0); publisher.stop()
    """

    def __init__(self, config: Config, sender: Sender,
                 before_send: Callable[[list[Status]], None] | None = None):
        self.config = config
        self.sender = sender
        self.before_send = before_send
        self.dropped = 0
        self._lock = threading.Lock()
        self._handed: set[int] = set()               # touched only by the publisher thread
        self._cursor = 0                             # every row with id <= cursor was handed over
        # Several nodes on one database: this node's rows, and those of a node whose lease
        # expired and whose session it took (store.nodes.published_by). None: every row.
        self._publish_for = config.flowd.node_id if is_shared_database(config) else None
        self._inflight: dict[int, tuple[int, int]] = {}   # mid -> (row id, qos)
        self._early_acks: dict[int, bool] = {}       # PUBACKs that beat publish()'s return
        self._acked: list[int] = []                  # row ids to delete
        self._oldest_ack = 0.0
        self._stopping = threading.Event()
        self._wake: WakeSocket | None = None
        self._poke_r, self._poke_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._poked = False     # something to do: set by poke(), cleared by the thread when it wakes
        self._sleeping = False  # the thread is in (or about to enter) select: poke() must send
        self._poke_r.setblocking(False)
        self._poke_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._next_cap_check = 0.0
        self._idle = threading.Event()
        self._reconnected = False
        self._taken_back: set[int] = set()           # mids paho gave back at a reconnect
        self.statuses = StatusInbox(config.state_dir / SOCKET_NAME, on_arrival=self.poke)
        self._status_inflight: dict[int, Status] = {}  # mid -> status handed and not acknowledged
        self._held: dict[int, float] = {}           # result row id -> when it began waiting for a status
        self._result_prefix = config.topic("flow/")

    # ------------------------------------------------------------------ called by other threads
    def start(self) -> None:
        """Bind the wake and status sockets (workers use them after each commit) and start the thread."""
        self._wake = WakeSocket(self.config.state_dir / WAKE_SOCKET_NAME)
        self.statuses.start()
        self._thread = threading.Thread(target=self._run, name="flowd-outbox", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Wake the thread now (connected, or room in the window again). A thread that is
        not asleep sees the flag before it sleeps again: no system call per status or
        PUBACK under load."""
        self._poked = True
        if not self._sleeping:
            return
        try:
            self._poke_w.send(b"!")
        except OSError:
            pass  # buffer full: the thread is awake with work already

    def acknowledged(self, mid: int, delivered: bool = True) -> None:
        """PUBACK for ``mid`` (QoS 0: written out), from the MQTT client's thread; the row may go."""
        with self._lock:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                window_was_full = len(self._status_inflight) >= STATUS_INFLIGHT
                if self._status_inflight.pop(mid, None) is None:
                    self._early_acks[mid] = delivered
                    return
                batch_ready = window_was_full  # statuses that back up may go now
            else:
                self._ack_row(entry[0], delivered)
                batch_ready = len(self._acked) == DELETE_BATCH
        if batch_ready:
            self.poke()  # free the window without waiting for the timer

    def connected(self, taken_back: list[int]) -> None:
        """The client (re)connected after giving back the messages ``taken_back`` (mids)
        it held: they are handed over again in order, with the QoS 0 ones it lost."""
        with self._lock:
            self._reconnected = True
            self._taken_back.update(taken_back)
        self.poke()

    def _ack_row(self, row_id: int, delivered: bool) -> None:
        if not delivered:
            log.warning("outbox: the broker refused message %d; dropping it", row_id)
        if not self._acked:
            self._oldest_ack = time.monotonic()
        self._acked.append(row_id)

    def drain(self, timeout: float) -> bool:
        """Wait until every row was acknowledged and deleted; False at the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._idle.clear()
            self.poke()
            if self._idle.wait(min(0.2, max(deadline - time.monotonic(), 0))) and self.is_empty():
                return True
            if not self.sender.is_connected():
                time.sleep(0.05)
        return self.is_empty()

    def is_empty(self) -> bool:
        """Nothing left to send or to be acknowledged: no row, no status."""
        with self._lock:
            if self._inflight or self._acked or self._status_inflight:
                return False
        if self.statuses.has_pending():
            return False
        return not store.has_messages(self._publish_for)

    def stop(self) -> None:
        self._stopping.set()
        self.poke()
        if self._thread is not None:
            self._thread.join(10)
        if self._wake is not None:
            self._wake.close()
            self.statuses.stop()
            log.info("status messages: %d received, %d coalesced or dropped (backed up)", self.statuses.received,
                     self.statuses.dropped)
        self._poke_r.close()
        self._poke_w.close()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        busy = False
        while not self._stopping.is_set():
            try:
                self._wait(0.01 if busy else (DELETE_AFTER_S if self._acked else IDLE_WAIT_S))
                if self._stopping.is_set():
                    break
                self._take_back()
                if self.sender.is_connected():
                    busy = self._send_rows()
                else:
                    self.statuses.set_backed_up(True)
                    busy = False
                self._delete_acked(force=False)
                self._check_cap()
                if not busy and not self._idle.is_set():  # set() takes a lock and notifies: once is enough
                    self._idle.set()
            except Exception as exc:
                busy = False
                if not integrity.note_damage(exc, "the outbox publisher"):  # damage: the daemon stops
                    log.exception("outbox publisher: unexpected error; retrying in 1s")
                self._stopping.wait(1.0)
        try:
            self._delete_acked(force=True)
        except Exception:
            log.exception("outbox publisher: could not delete acknowledged messages at stop")

    def _wait(self, timeout: float) -> None:
        assert self._wake is not None
        self._sleeping = True  # then the flag: a poke either sees this or is seen below (one GIL)
        try:
            readable, _, _ = select.select([self._wake.sock, self._poke_r], [], [], 0 if self._poked else timeout)
        except InterruptedError:
            return
        finally:
            self._sleeping = False
            self._poked = False  # the pass that follows sees what every poke so far announced
        if self._poke_r in readable:
            drain(self._poke_r)
        if self._wake.sock in readable:
            self._wake.drain()  # select said so: no second select to ask again

    def _send_rows(self) -> bool:
        """Hand waiting statuses, then rows in id order, to the client; True when more
        wait than it could take (or a result waits for its flow's last status)."""
        while True:
            if self._reconnected:
                return True  # hand the taken-back rows over first
            statuses = self.statuses.take(STATUS_INFLIGHT - len(self._status_inflight))
            window_full = len(self._handed) >= MAX_HANDED
            rows = [] if window_full else store.messages_after(self._cursor, READ_BATCH, self._publish_for)
            if not rows and not statuses:
                return window_full or self._statuses_wait()
            # Durable before visible (SPEC 4.5): one fsync covers every row read and every
            # status taken (each was sent after its commit).
            make_durable()
            if self.before_send is not None and statuses:
                self.before_send(statuses)
            for index, status in enumerate(statuses):
                if not self._hand_status(status):
                    self.statuses.restore(statuses[index:])
                    self.statuses.set_backed_up(True)
                    return True
            self.statuses.set_backed_up(len(self._status_inflight) >= STATUS_INFLIGHT)
            if not rows:
                return window_full
            result_flows = self._note_awaited_results(rows)
            for (row_id, topic, payload, qos, retain, correlation), flow_id in zip(rows, result_flows, strict=True):
                if row_id not in self._handed:
                    if len(self._handed) >= MAX_HANDED:
                        return True
                    if flow_id is not None and not self._is_result_due(row_id, flow_id):
                        return True
                    if not self._hand_over(row_id, topic, payload, qos, retain, correlation):
                        return True
                self._cursor = row_id
            if len(rows) < READ_BATCH:
                return self._statuses_wait()

    def _statuses_wait(self) -> bool:
        """Statuses pending with room in their window: they wait for a newer one of their
        flow (``StatusInbox.take``, behind); look again soon, not at the idle timeout."""
        return len(self._status_inflight) < STATUS_INFLIGHT and self.statuses.has_pending()

    def _result_flow(self, topic: str) -> int | None:
        """The flow id of a ``flow/<id>/result`` topic, else None."""
        if not (topic.endswith("/result") and topic.startswith(self._result_prefix)):
            return None
        middle = topic[len(self._result_prefix):-len("/result")]
        return int(middle) if middle.isdigit() else None

    def _note_awaited_results(self, rows: list[tuple[Any, ...]]) -> list[int | None]:
        """Start the wait of every result read whose flow's last status is on its way, so
        several such results wait together, not one after the other; per row, the flow
        whose result it is (None: not a result)."""
        now = time.monotonic()
        result_flows = [self._result_flow(row[1]) for row in rows]
        if any(flow_id is not None for flow_id in result_flows):
            # Statuses of a fast flow may all still sit in a sender's connection: take them
            # in first, or the flow would not look awaited and they would all come too late.
            self.statuses.receive_now()
        for row, flow_id in zip(rows, result_flows, strict=True):
            if flow_id is not None and row[0] not in self._held and self.statuses.is_awaited(flow_id):
                self._held[row[0]] = now
        return result_flows

    def _is_result_due(self, row_id: int, flow_id: int) -> bool:
        """The result of ``flow_id`` goes after its flow's last status: False while that
        status is on its way (sent by the process that committed the end, not received
        yet), for at most HOLD_S; a pending status of the flow is handed over first."""
        since = self._held.get(row_id)
        if since is not None and self.statuses.is_awaited(flow_id):
            self.statuses.receive_now()
            if self.statuses.is_awaited(flow_id) and time.monotonic() - since < HOLD_S:
                return False
        self._held.pop(row_id, None)
        for status in self.statuses.take_before_result(flow_id):
            if len(self._status_inflight) < STATUS_INFLIGHT + MAX_HANDED:
                self._hand_status(status)  # beyond the statuses' window: they go with their result
        return True

    def _send(self, topic: str, payload: str, qos: int, retain: bool, properties: Any, kind: str, ident: int) -> int:
        """Hand one message to the client: its mid; NOT_NOW when the client cannot take it
        now, NEVER when it never can (logged, naming it by ``kind`` and ``ident``)."""
        try:
            mid = self.sender.send(topic, payload.encode("utf-8"), qos, retain, properties)
        except ValueError as exc:
            log.error("outbox: %s %d to '%s' can never be sent (%s); dropping it", kind, ident, topic, exc)
            return NEVER
        return NOT_NOW if mid is None else int(mid)

    def _given_back(self, mid: int) -> bool:
        """(With the lock.) Whether paho gave ``mid`` back: the connection dropped under us."""
        if mid in self._taken_back:
            self._taken_back.discard(mid)
            return True
        return False

    def _hand_status(self, status: Status) -> bool:
        """Hand one status to the client; False when it cannot take it now."""
        mid = self._send(status.topic, status.payload, 1, False, None, "status of flow", status.flow_id)
        if mid in (NEVER, NOT_NOW):
            return mid == NEVER
        with self._lock:
            restore = self._given_back(mid)
            if not restore and self._early_acks.pop(mid, None) is None:
                self._status_inflight[mid] = status
        if restore:
            self.statuses.restore([status])
            return False
        return True

    def _hand_over(self, row_id: int, topic: str, payload: str, qos: int, retain: bool,
                   correlation: str | None) -> bool:
        mid = self._send(topic, payload, qos, retain, _correlation_bytes(correlation), "message", row_id)
        if mid == NOT_NOW:
            return False
        if mid == NEVER:
            self._handed.add(row_id)
            with self._lock:
                self._ack_row(row_id, True)
            return True
        with self._lock:
            if self._given_back(mid):
                return False
            self._handed.add(row_id)
            if mid in self._early_acks:
                self._ack_row(row_id, self._early_acks.pop(mid))
            else:
                self._inflight[mid] = (row_id, qos)
        return True

    def _take_back(self) -> None:
        with self._lock:
            if not self._reconnected:
                return
            self._reconnected = False
            lost = [mid for mid, (_, qos) in self._inflight.items() if qos == 0 or mid in self._taken_back]
            rows = [self._inflight.pop(mid)[0] for mid in lost]
            statuses = [self._status_inflight.pop(mid) for mid in list(self._status_inflight)
                        if mid in self._taken_back]
            self._taken_back.clear()
        self.statuses.restore(statuses)  # the latest of each flow goes again, unless a newer one came
        self._handed.difference_update(rows)
        if rows:
            self._cursor = min(self._cursor, min(rows) - 1)

    def _delete_acked(self, force: bool) -> None:
        with self._lock:
            if not self._acked:
                return
            if not force and len(self._acked) < DELETE_BATCH and time.monotonic() - self._oldest_ack < DELETE_AFTER_S:
                return
            done, self._acked = self._acked, []
        try:
            # No sync point: a delete lost in a power cut only sends those messages again.
            with write_transaction(sync=False):
                store.delete_messages(done)
        except Exception:
            with self._lock:  # keep them for the next try; deleting a row twice is harmless
                self._acked = done + self._acked
            raise
        self._handed.difference_update(done)
        if self._cursor in done:
            # SQLite hands out max(id) + 1: with the top rows gone, new rows may reuse ids
            # up to the cursor. Everything at or below the highest row still held was handed.
            self._cursor = max(self._handed, default=0)

    def _sweep_gaps(self) -> None:
        """Rows below the cursor never handed over (a backend that commits ids out of
        order, e.g. PostgreSQL sequences): move the cursor back so they are sent."""
        # A node whose lease expired meanwhile: its rows below the cursor come now.
        below = [row_id for row_id in store.message_ids_up_to(self._cursor, self._publish_for)
                 if row_id not in self._handed]
        if below:
            self._cursor = min(below) - 1

    def _check_cap(self) -> None:
        """Past ``mqtt.outbox_max`` rows, drop the oldest not handed over; count and log them."""
        now = time.monotonic()
        if now < self._next_cap_check:
            return
        self._next_cap_check = now + CAP_CHECK_EVERY_S
        self._held = {row_id: since for row_id, since in self._held.items() if now - since < 60}  # rows gone
        self._sweep_gaps()
        limit = self.config.mqtt.outbox_max
        span = store.message_id_span()
        if span is None or span[1] - span[0] + 1 <= limit:
            return  # ids span no more than the cap, so the rows cannot exceed it
        excess = store.count_messages() - limit
        if excess <= 0:
            return
        with write_transaction():
            removed = store.drop_oldest_messages(excess, self._handed)
            self.dropped += removed
            set_meta("outbox_dropped", str(int(get_meta("outbox_dropped", "0") or 0) + removed))
        log.warning("outbox: more than %d messages wait for the broker; dropped the %d oldest "
                    "(%d dropped since start)", limit, removed, self.dropped)
