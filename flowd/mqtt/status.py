"""Status messages (``flow/<id>/status``, SPEC 4.4): progress reports, not records.

A status reports a transition that is already committed, so it needs no row of its
own: the process that committed the transition (a worker, the daemon, flowctl) sends
the statuses it produced to the daemon right after the commit, over a Unix
SEQPACKET socket in the state folder (``status.sock``). Nobody listening (the daemon
is down) or the daemon's socket full means the status is dropped; the database and
the flow's result are the record.

In the daemon, :class:`StatusInbox` receives them on its own thread and keeps, per
flow, only the latest status not yet handed to the broker (they coalesce when they
back up: broker slow, or away). The outbox publisher's thread hands them to the MQTT
client (:mod:`flowd.mqtt.outbox`), after ``models.make_durable()`` and before the outbox rows
it reads in the same pass, within their own window of ``STATUS_INFLIGHT`` messages, so
they never hold back results.

Once backed up, the inbox is *behind* until it caught up (the window has room and
nothing is pending). Behind, a flow's latest status goes out only after it has been
the latest for ``BEHIND_WAIT_S`` (50 ms): under load most flows end within that time,
and their final status goes with the result, so a flow costs about one status on the
wire where it cost one per slot the window freed (1.6 per 3-step flow at C=100, each
a QoS 1 PUBLISH and its PUBACK). A slow flow's status still goes, 50 ms later; a flow
running alone never waits: nothing backs up.

Why SEQPACKET and not datagrams like the wake sockets: a datagram socket that nobody
connected takes at most ``net.unix.max_dgram_qlen`` datagrams (10 on many systems)
before it refuses more; a connection is bounded by its buffer only (~160 messages).

Ordering, as the outbox publisher applies it:

- a flow's statuses go out in the order they were sent (each process sends after its
  commit; a flow's transitions follow one another);
- a flow's last status goes out before its ``flow/<id>/result``: the result waits up to
  ``HOLD_S`` for a final status that is on its way, and a pending one goes just before it;
- no status of a flow goes out after its result, except the INIT of a ``flow retry``;
- a WAITING status goes out only after the topic it waits on is subscribed.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from flowd.engine.flowmessages import flow_status_payload, quoted
from flowd.service.wakeup import drain
from flowd.store.models import ENDED_STATES, INIT, WAITING, dumps

log = logging.getLogger(__name__)

SOCKET_NAME = "status.sock"
STATUS_INFLIGHT = 4         # statuses handed to the MQTT client and not yet acknowledged; past it they
                            # coalesce (a flow's latest only): at C=100 ~1.5 per flow go out of ~4
                            # (2.2 with a window of 16; a window of 1 or 2 gives ~1.35)
PENDING_MAX = 1000          # statuses waiting in memory (~0.5 KB each); past it the oldest go
LIVE_MAX = 10_000           # flows with statuses under way whose final status has not come yet
HOLD_S = 0.05               # longest a result waits for its flow's final status
BEHIND_WAIT_S = 0.05        # behind, how long a flow's latest status waits for a newer one (see take)
ENDED_MEMORY_S = 1.0        # how long a late status of a flow whose result went out is recognised
MAX_MESSAGE = 32 * 1024     # bytes per socket message; more statuses are split over several
_RECEIVE_SIZE = 256 * 1024
_SEP = b"\x00"              # never inside a field: not in topics (invalid), states, ids, or JSON text


class Status(NamedTuple):
    """One ``flow/<id>/status`` message: ``payload`` is its JSON text. A named tuple:
    the daemon makes several per flow, at a third of a frozen dataclass's cost."""

    flow_id: int
    state: str
    topic: str
    payload: str

    @property
    def is_final(self) -> bool:
        return self.state in ENDED_STATES


# ---------------------------------------------------------------------- wire format
def status_payload_text(flow: Any, child_id: int | None = None) -> str:
    """``dumps(flow_status_payload(flow, child_id))``, the same text: a worker sends one
    per step, and for a running flow (neither waiting nor failed) it is written out
    here directly, without the dict and the encoder's walk over it (~4x cheaper)."""
    if flow.error or flow.state == WAITING:
        return dumps(flow_status_payload(flow, child_id))
    steps = flow.steps or []
    position = flow.position
    task = steps[position] if 0 <= position < len(steps) else None
    return (f'{{"flow_id":{int(flow.id)},"uid":{quoted(flow.uid)},"routine":{quoted(flow.routine)},'
            f'"request_id":{quoted(flow.request_id)},"state":{quoted(flow.state)},"position":{int(position)},'
            f'"steps":{len(steps)},"task":{quoted(task)},"trigger":{quoted(flow.trigger)}}}')


def encode_statuses(statuses: Iterable[Status]) -> list[bytes]:
    """Socket messages for ``statuses``: fields and records separated by NUL bytes
    (each record encoded at once: one ``encode`` per status, not one per field)."""
    messages: list[bytes] = []
    records: list[bytes] = []
    size = 0
    for status in statuses:
        record = f"{int(status.flow_id)}\0{status.state}\0{status.topic}\0{status.payload}".encode()
        if records and size + len(record) + 1 > MAX_MESSAGE:
            messages.append(_SEP.join(records))
            records, size = [], 0
        records.append(record)
        size += len(record) + 1
    if records:
        messages.append(_SEP.join(records))
    return messages


def decode_statuses(message: bytes) -> list[Status]:
    """The statuses of one socket message; ValueError (UnicodeDecodeError is one) for a
    malformed one. Decoded whole, then split: a NUL byte is never part of another
    character's UTF-8, so that is each field decoded on its own, in one call."""
    fields = message.decode("utf-8").split("\x00")
    if len(fields) % 4:
        raise ValueError(f"a status message has {len(fields)} fields, not a multiple of 4")
    each = iter(fields)  # four at a time (their count is a multiple of 4)
    return [Status(int(flow_id), state, topic, payload)
            for flow_id, state, topic, payload in zip(each, each, each, each, strict=True)]


# ---------------------------------------------------------------------- any process: sending
class _Connection:
    """This process's connection to the daemon's status socket, made on first use and
    again after the daemon restarted; never blocks."""

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:  # no daemon (no socket, or a stale one): nobody to tell
            sock.close()
            return None
        return sock

    def send(self, messages: list[bytes]) -> bool:
        for _attempt in (1, 2):
            if self.sock is None:
                self.sock = self._connect()
                if self.sock is None:
                    return False
            try:
                for message in messages:
                    self.sock.send(message, socket.MSG_NOSIGNAL)
                return True
            except BlockingIOError:
                return False  # the daemon is that far behind: these are dropped
            except OSError:  # the daemon we knew is gone; a new one may listen
                self.sock.close()
                self.sock = None
        return False


_connection: _Connection | None = None


def send_statuses(state_dir: str | os.PathLike[str], statuses: list[Status]) -> bool:
    """Send statuses of committed transitions to the daemon; False when they were
    dropped (no daemon, or it is that far behind). Never raises, never blocks."""
    global _connection
    path = os.path.join(state_dir, SOCKET_NAME)
    if _connection is None or _connection.pid != os.getpid() or _connection.path != path:
        _connection = _Connection(path)
    try:
        return _connection.send(encode_statuses(statuses))
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------- the daemon: receiving
class StatusInbox:
    """The daemon's end: receives statuses on its own thread, keeps the latest per flow.

    While statuses can go out, every one is kept, in order; while they cannot (the
    publisher says so with ``set_backed_up``), each flow keeps only its latest. The
    outbox publisher takes them (``take``) and, when it hands a flow's result over,
    takes that flow's too (``take_before_result``); one lock guards everything here.

    >>> inbox = StatusInbox(config.state_dir / SOCKET_NAME, on_arrival=publisher.poke)
    >>> inbox.start(); ...; inbox.take(10); ...; inbox.stop()
    """

    def __init__(self, path: str | os.PathLike[str], on_arrival: Callable[[], None] | None = None):
        self.path = Path(path)
        self.on_arrival = on_arrival
        self.received = 0
        self.dropped = 0                      # coalesced away, over PENDING_MAX, or late
        self._lock = threading.Lock()
        self._receive_lock = threading.Lock()  # reading a connection and queueing what it held: in order
        self._pending: OrderedDict[int, list[Status]] = OrderedDict()  # flow id -> not handed, in order
        self._count = 0                       # statuses in _pending
        self._backed_up = False               # what the publisher said last: its window full, or the broker away
        self._behind = False                  # backed up, and not caught up since
        self._since: dict[int, float] = {}    # flow id -> when its latest pending status came
        self._live: OrderedDict[int, None] = OrderedDict()        # final status still to come
        self._ended: OrderedDict[int, float] = OrderedDict()      # result sent (monotonic time)
        self._listener: socket.socket | None = None
        self._peers: list[socket.socket] = []
        self._stop_r, self._stop_w = socket.socketpair()
        self._refresh_r, self._refresh_w = socket.socketpair()  # another thread accepted: select on the new peer
        self._refresh_r.setblocking(False)
        self._refresh_w.setblocking(False)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Bind the socket (replacing a stale one) and start receiving."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(os.fspath(self.path))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._thread = threading.Thread(target=self._run, name="flowd-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop receiving and remove the socket; what is pending is dropped."""
        try:
            self._stop_w.send(b"!")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        for sock in self._peers:
            sock.close()
        self._peers = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._stop_r.close()
        self._stop_w.close()
        self._refresh_r.close()
        self._refresh_w.close()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        assert self._listener is not None
        while True:
            try:
                readable, _, _ = select.select([self._stop_r, self._refresh_r, self._listener, *self._peers], [], [])
            except InterruptedError:
                continue
            except (OSError, ValueError):
                log.exception("status inbox: select failed; retrying in 1s")
                time.sleep(1.0)
                continue
            if self._stop_r in readable:
                return
            if self._refresh_r in readable:
                drain(self._refresh_r)
            try:
                with self._receive_lock:
                    if self._listener in readable:
                        self._accept()
                    arrived = [s for sock in readable if sock in self._peers for s in self._read(sock, True)]
                    if arrived:
                        self.put(arrived)
            except Exception:
                log.exception("status inbox: unexpected error; carrying on")

    def receive_now(self) -> None:
        """Take in what the senders' connections hold already, from the calling thread
        (the publisher, before it makes a result wait: the status is usually there).
        A sender whose connection the inbox thread has not accepted yet (a worker's
        first status) is accepted here too."""
        with self._receive_lock:
            known = len(self._peers)
            if self._listener is not None:
                self._accept()
            if len(self._peers) != known:
                try:
                    self._refresh_w.send(b"!")
                except OSError:
                    pass  # full: the thread is awake already
            arrived = [s for peer in list(self._peers) for s in self._read(peer, False)]
            if arrived:
                self.put(arrived)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                peer, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            peer.setblocking(False)
            self._peers.append(peer)

    def _read(self, peer: socket.socket, may_close: bool) -> list[Status]:
        """Every message waiting on one connection; ``may_close``: only the inbox's own
        thread closes a connection whose sender went away (it selects on them)."""
        found: list[Status] = []
        while True:
            try:
                message = peer.recv(_RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                return found
            except OSError:
                message = b""
            if not message:  # the sender's process ended
                if may_close:
                    self._peers.remove(peer)
                    peer.close()
                return found
            try:
                found.extend(decode_statuses(message))
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("status inbox: ignoring a malformed message (%d bytes): %s", len(message), exc)

    # ------------------------------------------------------------------ the buffer
    def set_backed_up(self, backed_up: bool) -> None:
        """The publisher cannot send statuses now (broker away, or its window is full):
        from now until it caught up (it can, and none is pending), each flow keeps only
        its latest pending status, and that waits a little for a newer one (``take``)."""
        with self._lock:
            if backed_up and not self._behind:  # while behind, put() and restore() keep one per flow
                for waiting in self._pending.values():
                    if len(waiting) > 1:
                        self.dropped += len(waiting) - 1
                        self._count -= len(waiting) - 1
                        del waiting[:-1]
            self._backed_up = backed_up
            self._behind = self._behind or backed_up
            self._note_caught_up()

    def _note_caught_up(self) -> None:
        """Behind ends once caught up: able to send again, and nothing pending (however the
        last went: taken, with its result, or dropped). Called with the lock held."""
        if self._behind and not self._backed_up and not self._pending:
            self._behind = False

    def put(self, statuses: Iterable[Status], now: float | None = None) -> None:
        """Queue statuses to go out (coalesced per flow while behind)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for status in statuses:
                self.received += 1
                flow_id = status.flow_id
                ended = self._ended.get(flow_id)
                if ended is not None:
                    if status.state != INIT and now - ended < ENDED_MEMORY_S:
                        self.dropped += 1  # late: the flow's result went out already
                        continue
                    del self._ended[flow_id]
                if status.is_final:
                    self._live.pop(flow_id, None)
                else:
                    self._live[flow_id] = None
                    if len(self._live) > LIVE_MAX:
                        self._live.popitem(last=False)
                waiting = self._pending.get(flow_id)
                if waiting is None:
                    self._pending[flow_id] = [status]
                elif self._behind:  # backed up, or not caught up since
                    self.dropped += len(waiting)  # coalesced: only the latest of a flow goes out
                    self._count -= len(waiting)
                    self._pending[flow_id] = [status]
                    self._pending.move_to_end(flow_id)  # in the order they came: see take()
                else:
                    waiting.append(status)
                self._since[flow_id] = now
                self._count += 1
                if self._count > PENDING_MAX:
                    self._drop_oldest()
        if self.on_arrival is not None:
            self.on_arrival()

    def _drop_oldest(self) -> None:
        flow_id, waiting = next(iter(self._pending.items()))
        waiting.pop(0)
        if not waiting:
            del self._pending[flow_id]
            self._since.pop(flow_id, None)
        self._count -= 1
        self.dropped += 1

    def take(self, limit: int, now: float | None = None) -> list[Status]:
        """Up to ``limit`` pending statuses, oldest flow first, each flow's in order; they
        leave the buffer.

        Behind (backed up and not caught up since), a flow's status is taken only once it
        has been its latest for ``BEHIND_WAIT_S``: a flow that moves on within that time
        costs one status where it cost one per free slot of the window, and its final
        status goes with its result anyway. Caught up, every status goes at once."""
        taken: list[Status] = []
        with self._lock:
            cutoff = (time.monotonic() if now is None else now) - BEHIND_WAIT_S if self._behind else None
            while self._pending and len(taken) < limit:
                flow_id, waiting = next(iter(self._pending.items()))
                if cutoff is not None and self._since.get(flow_id, 0.0) > cutoff:
                    break  # the others came later still
                room = limit - len(taken)
                taken.extend(waiting[:room])
                if len(waiting) > room:
                    self._pending[flow_id] = waiting[room:]
                else:
                    del self._pending[flow_id]
                    self._since.pop(flow_id, None)
            self._count -= len(taken)
            self._note_caught_up()
        return taken

    def is_awaited(self, flow_id: int) -> bool:
        """True while the flow sent statuses and its final one has not arrived (a retry's
        INIT waiting to go means the result at hand is of the run before)."""
        with self._lock:
            return flow_id in self._live and not self._has_retry(flow_id)

    def _has_retry(self, flow_id: int) -> bool:
        waiting = self._pending.get(flow_id)  # usually none: no generator to make
        return waiting is not None and any(s.state == INIT for s in waiting)

    def take_before_result(self, flow_id: int, now: float | None = None) -> list[Status]:
        """The flow's result is being handed over: its pending statuses, to go just before
        it; from now on no late status of the flow goes out, but a retry's."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._has_retry(flow_id):
                return []  # retried meanwhile: this result ended the run before
            waiting = self._pending.pop(flow_id, [])
            self._since.pop(flow_id, None)
            self._count -= len(waiting)
            self._note_caught_up()
            self._live.pop(flow_id, None)
            self._ended[flow_id] = now
            self._ended.move_to_end(flow_id)
            while self._ended and now - next(iter(self._ended.values())) >= ENDED_MEMORY_S:
                self._ended.popitem(last=False)
            return waiting

    def restore(self, statuses: Iterable[Status]) -> None:
        """Statuses taken but not sent (the MQTT client gave them back at a reconnect):
        pending again in front, unless a newer one of the flow is pending (while backed
        up) or the flow's result went out."""
        with self._lock:
            for status in reversed(list(statuses)):  # each goes to the front: keep their order
                flow_id = status.flow_id
                if flow_id in self._ended:
                    continue
                waiting = self._pending.get(flow_id)
                if waiting is None:
                    self._pending[flow_id] = [status]
                    self._pending.move_to_end(flow_id, last=False)
                elif self._behind:  # backed up, or not caught up since
                    continue
                else:
                    waiting.insert(0, status)
                self._count += 1

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)
