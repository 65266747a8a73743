"""paho's client class as flowd uses it, made cheaper per message.

At a few MQTT packets per flow (a submit in, its PUBACK out, statuses and a result
out, their PUBACKs in), paho's per-packet Python is a large part of the daemon's
main process. :class:`Client` keeps paho's behaviour and cuts what it costs:

* reads are served from one buffer (:class:`BufferedSocket`), not three ``recv`` per packet,
  and a packet wholly in it is taken in one step, not a byte at a time;
* a message received, or sent with :meth:`Client.send`, gets no ``MQTTMessageInfo`` (a
  ``Condition`` to wait for its publishing) unless something asks for one (:class:`LeanMessage`);
* :meth:`Client.send` publishes at QoS 1 or 2 returning only (rc, mid), and a PUBLISH
  packet is built in one join, not by paho's helpers a field at a time;
* a PUBACK is decoded in a few lines, not by paho's generic decoder, which builds a
  ``ReasonCode`` and a ``Properties`` object (two dozen dict entries each) per packet,
  and handled straight from the read buffer;
* a PUBLISH without properties (a submit from most clients) skips paho's parse of them;
* the packets waiting to go out are written with one ``send``, not one each;
* a burst of publishes wakes the network thread once, not once per publish;
* a PUBACK does not make paho look through every message in flight for a queued one
  while none can be queued;
* without TLS and without an ``mqtt_proxy`` variable, ``ssl`` and ``urllib.request``
  (deferred by :mod:`flowd.service.imports`) are never looked into, so they never load.

These overrides rest on private parts of paho-mqtt 2.2.0 (pinned exactly in
pyproject.toml); ``tests/test_mqtt_client.py`` fails when they change.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import paho.mqtt.client as mqtt
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from paho.mqtt.client import _OutPacket

WRITE_SIZE = 65536  # bytes of waiting packets joined into one send


class BufferedSocket:
    """The broker connection with reads served from one buffer.

    paho reads a packet in three ``recv`` calls (its type, its length, the rest), one
    system call each: at a few small packets per flow (a submit, PUBACKs, statuses)
    that is most of the network thread's time. Here one ``recv`` takes whatever the
    kernel holds and the packet reads are served from it. ``pending`` tells paho's
    loop that bytes are waiting here, so it reads them before it sleeps in ``select``
    (paho asks this of TLS sockets, which buffer the same way). Everything else goes
    to the socket itself.
    """

    READ_SIZE = 65536

    def __init__(self, sock: Any):
        self._sock = sock
        self._data = b""
        self._position = 0
        # Asked for at every turn of paho's loop: found here, not through __getattr__.
        self.send = sock.send
        self.fileno = sock.fileno
        self._inner_pending = getattr(sock, "pending", None)  # an SSLSocket's

    def recv(self, size: int) -> bytes:
        if self._position >= len(self._data):
            data = self._sock.recv(max(size, self.READ_SIZE))  # BlockingIOError, b"" at EOF: as the socket
            if len(data) <= size:
                self._data, self._position = b"", 0
                return bytes(data)
            self._data, self._position = data, 0
        start, self._position = self._position, min(self._position + size, len(self._data))
        return self._data[start:self._position]

    def take_packet(self) -> tuple[int, bytes] | None:
        """The next packet if the buffer holds all of it, taken out: (its first byte,
        what follows its remaining length). None otherwise (nothing or part of one
        buffered, or a length of over 4 bytes): paho's own read takes it from there."""
        data, start = self._data, self._position
        end = len(data)
        index, length, multiplier = start + 1, 0, 1
        while True:
            if index >= end or index - start > 4:
                return None
            byte = data[index]
            index += 1
            length += (byte & 127) * multiplier
            if not byte & 128:
                break
            multiplier *= 128
        if index + length > end:
            return None
        self._position = index + length
        return data[start], data[index:index + length]

    def pending(self) -> int:
        inner = self._inner_pending() if self._inner_pending is not None else 0
        return len(self._data) - self._position + int(inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


_PUBACK_REASONS: dict[int, ReasonCode] = {}  # value -> ReasonCode: never changed once made, so shared
_EMPTY_PROPERTIES = {kind: Properties(kind) for kind in (PacketTypes.PUBACK, PacketTypes.PUBLISH)}  # type: ignore[no-untyped-call]


def puback_reason(value: int) -> ReasonCode:
    """The PUBACK ReasonCode for ``value``, made once. KeyError or ValueError when it is
    not a PUBACK reason code, as paho's ``ReasonCode.unpack``."""
    reason = _PUBACK_REASONS.get(value)
    if reason is None:
        reason = _PUBACK_REASONS[value] = ReasonCode(PacketTypes.PUBACK, identifier=value)
    return reason


def empty_properties(packet_type: int) -> Properties:
    """What ``Properties(packet_type)`` makes (PUBACK or PUBLISH), without building its
    name tables again: a new object (a callback may keep or fill it) sharing them,
    which paho only ever reads."""
    properties = object.__new__(Properties)
    properties.__dict__.update(_EMPTY_PROPERTIES[packet_type].__dict__)
    return properties


def decode_puback(packet: bytes | bytearray, protocol: int) -> tuple[int, ReasonCode, Properties]:
    """(mid, reason code, properties) of a PUBACK's variable header, as paho's
    ``_packet.decode_puback`` gives them; MalformedPacket where it raises it.

    MQTT 5 may leave out the reason code (Success) and the properties; 3.1.1 has
    the packet id only."""
    size = len(packet)
    if size < 2 or (size != 2 and protocol != MQTTProtocolVersion.MQTTv5):
        raise MalformedPacket("wrong size of packet")
    mid = (packet[0] << 8) | packet[1]
    if size == 2:
        return mid, puback_reason(0), empty_properties(PacketTypes.PUBACK)
    try:
        reason = puback_reason(packet[2])
        if size == 3:
            return mid, reason, empty_properties(PacketTypes.PUBACK)
        properties = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
        properties.unpack(packet[3:])  # type: ignore[no-untyped-call]
    except _packet.DECODE_ERRORS as exc:
        raise MalformedPacket(str(exc)) from exc
    return mid, reason, properties


def decode_publish(header: int, packet: bytes | bytearray, protocol: int) -> _packet.PublishPacket:
    """A PUBLISH packet as paho's ``_packet.decode_publish`` gives it (payload and topic
    as bytes), MalformedPacket where it raises it; no properties (the usual case) cost
    an empty :class:`Properties`, not paho's parse of nothing."""
    try:
        data = bytes(packet)
        topic_end = 2 + int.from_bytes(data[:2], "big") if len(data) >= 2 else -1
        if not 2 <= topic_end <= len(data):
            raise MalformedPacket("the topic does not fit in the packet")
        topic = data[2:topic_end]
        if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
            raise MalformedPacket("topic can't be empty in MQTTv3")
        position, mid, qos = topic_end, 0, (header & 0x06) >> 1
        if qos > 0:
            if len(data) < position + 2:
                raise MalformedPacket("no room for the packet id")
            mid, position = int.from_bytes(data[position:position + 2], "big"), position + 2
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            if data[position:position + 1] == b"\x00":
                properties, position = empty_properties(PacketTypes.PUBLISH), position + 1
            else:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                position += properties.unpack(data[position:])[1]  # type: ignore[no-untyped-call]
    except MalformedPacket:
        raise
    except _packet.DECODE_ERRORS as exc:
        raise MalformedPacket(str(exc)) from exc
    return _packet.PublishPacket(dup=bool(header & 0x08), qos=qos, retain=bool(header & 0x01), topic=topic, mid=mid,
                                 properties=properties, payload=data[position:])


_INFO: Any = mqtt.MQTTMessage.__dict__["info"]  # the slot paho's MQTTMessage keeps its info in


def made_info(message: mqtt.MQTTMessage) -> mqtt.MQTTMessageInfo | None:
    """The message's info if it has one already (a :class:`LeanMessage` may not)."""
    info: mqtt.MQTTMessageInfo | None = _INFO.__get__(message, mqtt.MQTTMessage)
    return info


class LeanMessage(mqtt.MQTTMessage):
    """paho's ``MQTTMessage`` without the ``MQTTMessageInfo`` its ``__init__`` makes (a
    ``threading.Condition``, to wait for a publish to go out): nobody reads it for a
    message received, nor for one flowd sends with :meth:`Client.send`, which returns
    the mid only. One is made if asked for (a reconnect re-sending the message does)."""

    __slots__ = ()

    def __init__(self, mid: int = 0, topic: bytes = b""):  # paho's __init__ but the info
        self.timestamp = 0.0
        self.state = mqtt.mqtt_ms_invalid
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = b""
        self.qos = 0
        self.retain = False
        _INFO.__set__(self, None)
        self.properties = None

    @property
    def info(self) -> mqtt.MQTTMessageInfo:
        info = made_info(self)
        if info is None:
            info = mqtt.MQTTMessageInfo(self.mid)
            _INFO.__set__(self, info)
        return info

    @info.setter
    def info(self, value: mqtt.MQTTMessageInfo) -> None:
        _INFO.__set__(self, value)


def remaining_length(length: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length (paho's
    ``_pack_remaining_length``); ValueError past the largest."""
    if length > 268_435_455:
        raise ValueError("Packet too large")
    if length < 128:
        return bytes((length,))
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(encoded)


class _PlainSocket(Protocol):
    """What a connection without TLS is read and written through (a BufferedSocket, a socket)."""

    def recv(self, size: int, /) -> bytes: ...

    def send(self, data: bytes | bytearray, /) -> int: ...


class Client(mqtt.Client):
    """paho's client, remembering why the last connection attempt failed (paho's own
    retry loop swallows the exception), with the cheaper per-packet paths above."""

    last_error: BaseException | None = None
    _wake_sent = False  # a wake byte went to the network thread since its loop last began
    _may_hold_queued = True  # a QoS > 0 message may wait in paho's queue for room in the window

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise

    def _get_proxy(self) -> dict[str, Any] | None:
        """paho's, without reading the environment through ``urllib.request`` (deferred,
        see :mod:`flowd.service.imports`) when no ``mqtt_proxy`` variable is set: paho takes
        only that one from it."""
        if self._proxy or any(value and name.lower() == "mqtt_proxy" for name, value in os.environ.items()):
            return super()._get_proxy()
        return None

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho's, which names ``ssl``'s want-read and want-write errors in the handlers
        of every ``BlockingIOError``: not looked up (``ssl`` stays deferred) without TLS."""
        if self._ssl:
            return super()._sock_recv(bufsize)
        return self._plain_socket().recv(bufsize)

    def _sock_send(self, buf: bytes | bytearray) -> int:
        """paho's, likewise: without TLS only a ``BlockingIOError`` needs handling."""
        if self._ssl:
            return super()._sock_send(buf)
        try:
            return self._plain_socket().send(buf)
        except BlockingIOError:
            self._call_socket_register_write()
            raise

    def _plain_socket(self) -> _PlainSocket:
        sock = self._sock  # read once: another thread may drop it meanwhile (paho then raises as here)
        if sock is None:
            raise ConnectionError("self._sock is None")
        return sock

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        return BufferedSocket(sock) if isinstance(sock, socket.socket) else sock  # SSLSocket is one too

    def _packet_read(self) -> MQTTErrorCode:
        """paho's, in one step for a packet the buffer holds whole (under load, most:
        one ``recv`` brings many). paho reads it a byte at a time through the buffer
        (its type, each byte of its length, the rest) and keeps its progress in
        ``_in_packet`` between reads; here ``_in_packet`` is filled as paho leaves it
        when the packet is complete, then handled and reset as paho does."""
        sock = self._sock
        if self._in_packet["command"] != 0 or not isinstance(sock, BufferedSocket):
            return super()._packet_read()
        whole = sock.take_packet()
        if whole is None:
            return super()._packet_read()
        command, packet = whole
        try:  # from here on, paho's lines
            if command & 0xF0 == mqtt.PUBACK:  # the usual packet: no _in_packet to fill and reset
                rc = self._handle_puback(packet)
            else:
                in_packet = self._in_packet
                in_packet["command"], in_packet["have_remaining"] = command, 1
                in_packet["remaining_length"], in_packet["packet"] = len(packet), bytearray(packet)
                in_packet["to_process"], in_packet["pos"] = 0, 0
                try:
                    rc = self._packet_handle()
                finally:
                    self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                                       "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return rc

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """paho's handler, with the PUBACK decoded by :func:`decode_puback`; the
        bookkeeping after it (``_do_on_publish``: the callback, the message's info,
        the in-flight window) is paho's own."""
        if cmd != "PUBACK":
            return super()._handle_pubackcomp(cmd)
        return self._handle_puback(self._in_packet["packet"])

    def _handle_puback(self, packet: bytes | bytearray) -> MQTTErrorCode:
        """A PUBACK's variable header ``packet``, handled as paho's ``_handle_pubackcomp``."""
        mid, reason, properties = decode_puback(packet, self._protocol)
        if self._logger is not None or self._on_log is not None:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received %s (Mid: %d)", "PUBACK", mid)
        with self._out_message_mutex:
            if mid in self._out_messages:  # only the first PUBACK of a message counts
                return self._do_on_publish(mid, reason, properties)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _do_on_publish(self, mid: int, reason_code: ReasonCode, properties: Properties) -> MQTTErrorCode:
        """paho's, but a message sent by :meth:`send` has no info to mark published (none
        was made: nobody waits on it)."""
        if self._callback_api_version != CallbackAPIVersion.VERSION2:
            return super()._do_on_publish(mid, reason_code, properties)
        on_publish = cast("mqtt.CallbackOnPublish_v2 | None", self._on_publish)  # paho's lock orders nothing here
        if on_publish:
            with self._in_callback_mutex:
                try:
                    on_publish(self, self._userdata, mid, reason_code, properties)
                except Exception as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_publish: %s", err)
                    if not self.suppress_exceptions:
                        raise
        message = self._out_messages.pop(mid)
        info = made_info(message)
        if info is not None:
            info._set_as_published()
        if message.qos > 0:
            self._inflight_messages -= 1
            if self._max_inflight_messages > 0:
                rc = self._update_inflight()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        """paho's handler line for line, with the packet decoded by :func:`decode_publish`
        into a :class:`LeanMessage`, and its log line made only while the log is on."""
        result = decode_publish(self._in_packet["command"], self._in_packet["packet"], self._protocol)
        message = LeanMessage(mid=result.mid, topic=result.topic)
        message.dup = result.dup
        message.qos = result.qos
        message.retain = result.retain
        message.properties = result.properties
        message.payload = result.payload
        if self._logger is not None or self._on_log is not None:
            self._log_received(message)
        message.timestamp = mqtt.time_func()
        if message.qos == 0:
            self._handle_on_message(message)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if message.qos == 1:
            self._handle_on_message(message)
            return MQTTErrorCode.MQTT_ERR_SUCCESS if self._manual_ack else self._send_puback(message.mid)
        if message.qos == 2:
            rc = self._send_pubrec(message.mid)
            message.state = mqtt.mqtt_ms_wait_for_pubrel
            with self._in_message_mutex:
                self._in_messages[message.mid] = message
            return rc
        return MQTTErrorCode.MQTT_ERR_PROTOCOL

    def ack(self, mid: int, qos: int) -> MQTTErrorCode:
        """paho's; a QoS 1 PUBACK (every submit's) queued directly while paho's log is off."""
        if qos == 1 and self._manual_ack and self._logger is None and self._on_log is None:
            return self._packet_queue(mqtt.PUBACK, bytes((mqtt.PUBACK, 2, mid >> 8, mid & 0xFF)), mid, 1)
        return super().ack(mid, qos)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        """paho's: with no callback added for a topic filter (flowd adds none), only
        ``on_message``, without paho's search of the empty filter tree per message."""
        if self._on_message_filtered._root._children:
            super()._handle_on_message(message)
            return
        on_message = self._on_message
        if on_message:
            with self._in_callback_mutex:
                try:
                    on_message(self, self._userdata, message)
                except Exception as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                    if not self.suppress_exceptions:
                        raise

    def _log_received(self, message: LeanMessage) -> None:
        """paho's log line for a PUBLISH received (only while its log is on: it decodes the topic)."""
        try:
            print_topic = message._topic.decode("utf-8")
        except UnicodeDecodeError:
            print_topic = f"TOPIC WITH INVALID UTF-8: {message._topic!r}"
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            self._easy_log(mqtt.MQTT_LOG_DEBUG,
                           "Received PUBLISH (d%d, q%d, r%d, m%d), '%s', properties=%s, ...  (%d bytes)",
                           message.dup, message.qos, message.retain, message.mid, print_topic, message.properties,
                           len(message.payload))
        else:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), '%s', ...  (%d bytes)",
                           message.dup, message.qos, message.retain, message.mid, print_topic, len(message.payload))

    def publish(self, topic: str, payload: mqtt.PayloadType = None, qos: int = 0, retain: bool = False,
                properties: Properties | None = None) -> mqtt.MQTTMessageInfo:
        """paho's, noting (under paho's lock) when the message may have been queued: the
        window was full."""
        if qos == 0:
            return super().publish(topic, payload, qos, retain, properties)
        with self._out_message_mutex:
            info = super().publish(topic, payload, qos, retain, properties)
            if self._inflight_messages >= self._max_inflight_messages > 0:
                self._may_hold_queued = True
        return info

    def send(self, topic: str, payload: bytes, qos: int, retain: bool = False,
             properties: Properties | None = None) -> tuple[MQTTErrorCode, int]:
        """``publish()`` returning (rc, mid) instead of an ``MQTTMessageInfo``: at QoS 1
        and 2 the message is a :class:`LeanMessage` (no ``Condition`` made for it);
        paho's ``publish`` otherwise. The same checks and ValueErrors as paho's."""
        if qos not in (1, 2) or not isinstance(payload, bytes):
            info = self.publish(topic, payload, qos, retain, properties)
            return info.rc, info.mid
        if self._protocol != mqtt.MQTTv5 and not topic:
            raise ValueError("Invalid topic.")
        topic_bytes = topic.encode("utf-8")
        if b"+" in topic_bytes or b"#" in topic_bytes:
            raise ValueError("Publish topic cannot contain wildcards.")
        if len(topic_bytes) > 65535:
            raise ValueError("Publish topic is too long.")
        if len(payload) > 268435455:
            raise ValueError("Payload too large.")
        mid = self._mid_generate()
        message = LeanMessage(mid, topic_bytes)
        message.timestamp = mqtt.time_func()
        message.payload = payload
        message.qos = qos
        message.retain = retain
        message.properties = properties
        with self._out_message_mutex:  # from here on, paho's publish()
            if self._max_queued_messages > 0 and len(self._out_messages) >= self._max_queued_messages:
                return MQTTErrorCode.MQTT_ERR_QUEUE_SIZE, mid
            if mid in self._out_messages:
                return MQTTErrorCode.MQTT_ERR_QUEUE_SIZE, mid
            self._out_messages[mid] = message
            if self._max_inflight_messages == 0 or self._inflight_messages < self._max_inflight_messages:
                self._inflight_messages += 1
                message.state = mqtt.mqtt_ms_wait_for_puback if qos == 1 else mqtt.mqtt_ms_wait_for_pubrec
                rc = self._send_publish(mid, topic_bytes, payload, qos, retain, False, None, properties)
                if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                    self._inflight_messages -= 1
                    message.state = mqtt.mqtt_ms_publish
                if self._inflight_messages >= self._max_inflight_messages > 0:
                    self._may_hold_queued = True
                return rc, mid
            message.state = mqtt.mqtt_ms_queued
            self._may_hold_queued = True
            return MQTTErrorCode.MQTT_ERR_SUCCESS, mid

    def _send_publish(self, mid: int, topic: bytes, payload: bytes | bytearray = b"", qos: int = 0,
                      retain: bool = False, dup: bool = False, info: mqtt.MQTTMessageInfo | None = None,
                      properties: Properties | None = None) -> MQTTErrorCode:
        """paho's, the packet made in one join of its parts (the same bytes); paho's own
        while its log is on (it logs each packet)."""
        if self._logger is not None or self._on_log is not None:
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        if not isinstance(topic, bytes):
            raise TypeError("topic must be bytes, not str")
        if payload and not isinstance(payload, (bytes, bytearray)):
            raise TypeError("payload must be bytes if set")
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        packet_id = mid.to_bytes(2, "big") if qos > 0 else b""
        packed_properties = b""
        if self._protocol == mqtt.MQTTv5:
            packed_properties = b"\x00" if properties is None else properties.pack()  # type: ignore[no-untyped-call]
        length = 2 + len(topic) + len(packet_id) + len(packed_properties) + len(payload)
        command = mqtt.PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | retain
        packet = b"".join((bytes((command,)), remaining_length(length), len(topic).to_bytes(2, "big"), topic,
                           packet_id, packed_properties, payload))
        return self._packet_queue(mqtt.PUBLISH, packet, mid, qos, info)

    def _messages_reconnect_reset_out(self) -> None:
        super()._messages_reconnect_reset_out()
        self._may_hold_queued = True  # it queues what does not fit in the window

    def _update_inflight(self) -> MQTTErrorCode:
        """paho's, skipped while no message is queued: after each PUBACK paho looks at
        every message it holds for a queued one, and flowd never fills the window (its
        outbox hands over no more). Called with paho's lock held."""
        if not self._may_hold_queued:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        rc = super()._update_inflight()
        self._may_hold_queued = any(m.state == mqtt.mqtt_ms_queued for m in self._out_messages.values())
        return rc

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        # Before paho looks at what waits to be written: a packet queued after this
        # point either is seen there or wakes the select below (see _packet_queue).
        self._wake_sent = False
        return super()._loop(timeout)

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        """paho's, but the byte that wakes the network thread from ``select`` is sent
        once per turn of its loop, not once per packet.

        A packet queued while ``_wake_sent`` is set needs no byte of its own: the byte
        already sent wakes the loop that follows, or was read by this turn, whose
        clearing of the flag comes after the packet went in the queue, so the next
        turn sees the packet when it asks what waits to be written. (Two threads may
        both send a byte: harmless, the loop reads them all at once.)"""
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": info})
        if self._sockpairW is not None and not self._wake_sent:
            self._wake_sent = True
            try:
                self._sockpairW.send(mqtt.sockpair_data)
            except BlockingIOError:
                pass
        # From here on, paho's lines as they are.
        if self._thread is None and self._on_socket_register_write is None and self._in_callback_mutex.acquire(False):
            self._in_callback_mutex.release()
            return self.loop_write()
        self._call_socket_register_write()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        """paho's, after joining the packets at the head of the queue into one, so one
        ``send`` carries them (TCP_NODELAY makes each its own segment otherwise).

        Only packets paho does nothing with once written are joined: not a QoS 0
        PUBLISH (its callback fires on writing), not a DISCONNECT. Only this thread
        takes from the queue's head; others append at its tail."""
        queue = self._out_packet
        if len(queue) < 2:
            return super()._packet_write()
        run: list[_OutPacket] = []
        size = 0
        while queue and size < WRITE_SIZE:
            head = queue.popleft()
            kind = head["command"] & 0xF0
            if kind == mqtt.DISCONNECT or (kind == mqtt.PUBLISH and head["qos"] == 0):
                queue.appendleft(head)
                break
            run.append(head)
            size += head["to_process"]
        if len(run) > 1:
            joined = b"".join(part["packet"][part["pos"]:] for part in run)
            queue.appendleft({"command": run[0]["command"], "mid": run[0]["mid"], "qos": run[0]["qos"], "pos": 0,
                              "to_process": len(joined), "packet": joined, "info": None})
        elif run:
            queue.appendleft(run[0])
        return super()._packet_write()
