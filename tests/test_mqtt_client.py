"""flowd.mqtt.client against paho-mqtt itself: same decoding, same callbacks, same
bookkeeping, through a real mosquitto at MQTT 5 and 3.1.1.

The overrides rest on paho 2.2.0's private methods; the first test names them and
fingerprints the ones whose lines were copied or replaced, so an upgrade of paho
fails here until someone has re-read them against flowd/mqtt/client.py.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import struct
import threading
import time
import types
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, free_port, wait_for
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowd.mqtt.client import (
    BufferedSocket,
    Client,
    LeanMessage,
    decode_puback,
    decode_publish,
    made_info,
    remaining_length,
)

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311

# sha256 of the source of each paho function flowd.mqtt.client copies or stands in for.
PAHO_SOURCES = {
    "Client._handle_pubackcomp": "04d39ba283b1f3be",
    "Client._handle_publish": "1bbaa3ef0e3afc6d",
    "Client._packet_queue": "e298fa9ab31e5f79",
    "Client._packet_write": "d097b7b51bed128d",
    "Client._do_on_publish": "5bbcad6f9447107a",
    "Client._update_inflight": "d11feb21cf855b12",
    "Client._messages_reconnect_reset_out": "464a42c69618a49b",
    "Client._packet_read": "bbe32d8af1e37955",
    "MQTTMessage.__init__": "af92f9a50f5f90e4",
    "Client.publish": "5c00cd3dcebceaae",
    "Client._get_proxy": "725ac4a27856ecd9",
    "Client._sock_recv": "c3b9043a46dd81b7",
    "Client._sock_send": "300d9f1031bd0dbd",
    "Client._send_publish": "4edd21dd50f58a28",
    "Client._handle_on_message": "8ccc46fdb090aead",
    "Client.ack": "92f83b7a84a46b21",
    "Client._send_puback": "bb015cefb632f942",
    "Client._send_command_with_mid": "1a771678b66dc9e4",
    "Client._pack_remaining_length": "588b47e80722ce0c",
    "_packet._decode_mid_reason_prop": "c001ca9750a186ed",
    "_packet.decode_publish": "50c158487fa3d96e",
}


def paho_source_digest(name: str) -> str:
    owner, attribute = name.split(".")
    function = getattr({"Client": mqtt.Client, "MQTTMessage": mqtt.MQTTMessage}.get(owner, _packet), attribute)
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def test_the_paho_internals_relied_on_are_those_of_2_2_0() -> None:
    assert version("paho-mqtt") == "2.2.0"
    for name in ("_handle_pubackcomp", "_handle_publish", "_handle_on_message", "_do_on_publish", "_update_inflight",
                 "_packet_queue", "_packet_write", "_loop", "_easy_log", "_send_puback", "_send_pubrec",
                 "_call_socket_register_write", "_create_socket", "_mid_generate",
                 "_messages_reconnect_reset_out"):
        assert callable(getattr(mqtt.Client, name)), name
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    for name in ("_in_packet", "_out_packet", "_out_messages", "_out_message_mutex", "_in_messages",
                 "_in_message_mutex", "_in_callback_mutex", "_protocol", "_sockpairW", "_thread", "_manual_ack",
                 "_on_socket_register_write", "_inflight_messages", "_max_inflight_messages", "_msgtime_mutex",
                 "_last_bytes_received", "_on_log", "_logger", "_on_publish", "_userdata", "_callback_api_version",
                 "_max_queued_messages", "suppress_exceptions", "_on_message", "_on_message_filtered"):
        assert hasattr(client, name), name
    assert set(client._in_packet) == {"command", "have_remaining", "remaining_count", "remaining_mult",
                                      "remaining_length", "packet", "to_process", "pos"}
    assert isinstance(mqtt.MQTTMessage.__dict__["info"], types.MemberDescriptorType) and callable(client._packet_handle)
    assert mqtt.sockpair_data == b"0" and callable(mqtt.time_func) and mqtt.mqtt_ms_queued is not None
    assert client._on_message_filtered._root._children == {}
    assert isinstance(_packet.DECODE_ERRORS, tuple) and _packet.PublishPacket._fields == (
        "dup", "qos", "retain", "topic", "mid", "properties", "payload")
    changed = {name: paho_source_digest(name) for name, digest in PAHO_SOURCES.items()
               if paho_source_digest(name) != digest}
    assert not changed, f"paho changed: re-read these against flowd/mqtt/client.py, then update PAHO_SOURCES: {changed}"


# ---------------------------------------------------------------------- decoding, against paho's decoders
def outcome(decode: Any, *args: Any) -> Any:
    """What a decoder gives, in comparable form: the fields, or the exception's type."""
    try:
        result = decode(*args)
    except Exception as exc:
        return type(exc).__name__
    fields = list(result)
    for index, field in enumerate(fields):
        if isinstance(field, Properties):
            fields[index] = ("Properties", field.packetType, str(field), field.isEmpty())
        elif hasattr(field, "getName"):
            fields[index] = ("ReasonCode", field.packetType, field.value, str(field), field.is_failure)
        elif isinstance(field, (bytes, bytearray)):
            fields[index] = (type(field).__name__, bytes(field))
    return fields


def properties_bytes(kind: int, **values: Any) -> bytes:
    properties = Properties(kind)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(properties, name, value)
    return bytes(properties.pack())  # type: ignore[no-untyped-call]


PUBACKS = [
    b"", b"\x00", b"\x12\x34", b"\xff\xff", b"\x12\x34\x00", b"\x12\x34\x10", b"\x12\x34\x80", b"\x12\x34\x87",
    b"\x12\x34\x97", b"\x12\x34\x01", b"\x12\x34\x55", b"\x00\x07\x00\x00",
    b"\x00\x07\x87" + properties_bytes(PacketTypes.PUBACK, ReasonString="not for you"),
    b"\x00\x07\x00" + properties_bytes(PacketTypes.PUBACK, UserProperty=("a", "b")),
    b"\x00\x07\x00\x05\x1f", b"\x00\x07\x00\x03\x21\x00\x01",  # truncated; a property PUBACK may not carry
]


@pytest.mark.parametrize("environment", [{}, {"MQTT_PROXY": "socks://127.0.0.1:1080"},
                                         {"mqtt_proxy": "http://127.0.0.1:3128", "no_proxy": "example.org"},
                                         {"mqtt_proxy": "socks://127.0.0.1:1080", "no_proxy": "127.0.0.1"},
                                         {"http_proxy": "http://127.0.0.1:3128"}])
def test_the_proxy_is_paho_s(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("socks")  # without PySocks paho takes no proxy at all
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    ours, stock = Client(CallbackAPIVersion.VERSION2), mqtt.Client(CallbackAPIVersion.VERSION2)
    for client in (ours, stock):
        client._host = "127.0.0.1"
    assert ours._get_proxy() == stock._get_proxy()
    ours.proxy_set(proxy_type=2, proxy_addr="127.0.0.2", proxy_port=1080)
    stock.proxy_set(proxy_type=2, proxy_addr="127.0.0.2", proxy_port=1080)
    assert ours._get_proxy() == stock._get_proxy() == {"proxy_type": 2, "proxy_addr": "127.0.0.2", "proxy_port": 1080}


@pytest.mark.parametrize("protocol", [V5, V311])
@pytest.mark.parametrize("packet", PUBACKS)
def test_decode_puback_is_paho_s(packet: bytes, protocol: MQTTProtocolVersion) -> None:
    def paho(data: bytearray, version: MQTTProtocolVersion) -> Any:
        return _packet.decode_puback(0x40, data, version)

    ours, theirs = outcome(decode_puback, bytearray(packet), protocol), outcome(paho, bytearray(packet), protocol)
    assert ours == theirs
    if packet == b"\x12\x34\x87" and protocol == V5:
        assert ours[0] == 0x1234 and ours[1][2:] == (0x87, "Not authorized", True)


def publish_packet(topic: bytes, payload: bytes, qos: int, protocol: MQTTProtocolVersion,
                   properties: bytes = b"\x00") -> bytes:
    packet = struct.pack("!H", len(topic)) + topic
    if qos:
        packet += b"\x01\x02"
    if protocol == V5:
        packet += properties
    return packet + payload


PUBLISHES = [
    (0x30, publish_packet(b"flow/submit", b'{"routine": "r"}', 0, V5)),
    (0x32, publish_packet(b"flow/submit", b'{"routine": "r"}', 1, V5)),
    (0x3B, publish_packet(b"a/b", b"x", 1, V5)),  # dup, retain
    (0x34, publish_packet(b"a/b", b"", 2, V5)),
    (0x32, publish_packet(b"a/b", b"p", 1, V5, properties_bytes(
        PacketTypes.PUBLISH, ResponseTopic="reply/1", CorrelationData=b"\x01\x02", UserProperty=("k", "v")))),
    (0x32, publish_packet(b"", b"p", 1, V5)),  # empty topic: allowed in 5 (alias), not in 3.1.1
    (0x32, publish_packet(b"t\xff", b"p", 1, V5)),  # not UTF-8
    (0x30, publish_packet(b"flow/submit", b"p", 0, V311)),
    (0x32, publish_packet(b"flow/submit", b"p", 1, V311)),
    (0x32, b""), (0x32, b"\x00"), (0x32, b"\x00\x09ab"), (0x32, b"\x00\x01a"), (0x32, b"\x00\x01a\x00"),
    (0x30, b"\x00\x01a\x05\x01"), (0x32, b"\x00\x01a\x00\x01\x03\x01\x00"),
]


@pytest.mark.parametrize("protocol", [V5, V311])
@pytest.mark.parametrize(("header", "packet"), PUBLISHES)
def test_decode_publish_is_paho_s(header: int, packet: bytes, protocol: MQTTProtocolVersion) -> None:
    ours = outcome(decode_publish, header, bytearray(packet), protocol)
    assert ours == outcome(_packet.decode_publish, header, bytearray(packet), protocol)
    if packet == publish_packet(b"flow/submit", b'{"routine": "r"}', 1, V5) and protocol == V5:
        assert ours[3] == ("bytes", b"flow/submit") and ours[6] == ("bytes", b'{"routine": "r"}')


def test_empty_properties_are_new_objects_that_behave_as_paho_s() -> None:
    first = decode_publish(0x30, bytearray(publish_packet(b"t", b"", 0, V5)), V5).properties
    second = decode_publish(0x30, bytearray(publish_packet(b"t", b"", 0, V5)), V5).properties
    assert first is not None and second is not None and first is not second
    first.ResponseTopic = "reply/x"  # a callback filling its own does not touch the next one's
    assert second.isEmpty() and getattr(second, "ResponseTopic", None) is None
    assert first.json() == {"ResponseTopic": "reply/x"}
    with pytest.raises(MalformedPacket):
        decode_puback(bytearray(b"\x00\x01\x00\x00"), V311)


def test_whole_packets_are_taken_from_the_buffer_and_the_rest_left_to_paho() -> None:
    big = b"\x30" + bytes([0x80 | (300 & 127), 300 >> 7]) + b"\x00\x01t" + b"x" * 297  # a 2-byte length
    data = b"\x40\x02\x00\x07" + big + b"\xd0\x00" + b"\x40\x03\x00\x08"  # PUBACK, PUBLISH, PINGRESP, part
    left, right = socket.socketpair()
    try:
        left.sendall(data)
        buffered = BufferedSocket(right)
        assert buffered.take_packet() is None  # nothing buffered yet: paho's read fills it
        assert buffered.recv(1) == b"\x40"
        buffered._position = 0  # as if not read: what paho's first recv brought is all buffered
        taken = [buffered.take_packet() for _ in range(4)]
        assert taken == [(0x40, b"\x00\x07"), (0x30, big[3:]), (0xD0, b""), None]
        assert buffered.pending() == 4 and buffered.recv(4) == b"\x40\x03\x00\x08"  # the part stays for paho
        buffered._data, buffered._position = b"\x30\xff\xff\xff\xff\x01" + b"x" * 10, 0  # 5 length bytes
        assert buffered.take_packet() is None and buffered.pending() == 16  # paho refuses it (protocol error)
        assert buffered.fileno() == right.fileno() and buffered.send(b"z") == 1 and left.recv(1) == b"z"
        tls_like = types.SimpleNamespace(send=None, fileno=None, pending=lambda: 5)
        assert BufferedSocket(tls_like).pending() == 5  # what an SSLSocket holds counts too
    finally:
        left.close()
        right.close()


def test_a_lean_message_makes_its_info_only_when_asked() -> None:
    message = LeanMessage(mid=9, topic=b"in/x")
    stock = mqtt.MQTTMessage(mid=9, topic=b"in/x")
    fields = ("timestamp", "state", "dup", "mid", "topic", "payload", "qos", "retain", "properties")
    assert [getattr(message, f) for f in fields] == [getattr(stock, f) for f in fields]
    assert isinstance(message, mqtt.MQTTMessage) and message == LeanMessage(mid=9)
    assert not hasattr(message, "__dict__")
    assert made_info(message) is None and made_info(stock) is stock.info  # not made yet
    info = message.info
    assert isinstance(info, mqtt.MQTTMessageInfo) and info.mid == 9 and message.info is info
    assert made_info(message) is info
    message.info = mqtt.MQTTMessageInfo(10)
    assert message.info.mid == 10


@pytest.mark.parametrize("length", [0, 1, 127, 128, 300, 16383, 16384, 2097151, 2097152, 268435455, 268435456])
def test_remaining_length_is_paho_s(length: int) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    assert outcome(lambda: (remaining_length(length),)) == outcome(
        lambda: (bytes(client._pack_remaining_length(bytearray(), length)),))


class Queued:
    """A client (flowd's or paho's) whose packets are kept, not written: as under
    loop_start, a publish from another thread only queues."""

    def __init__(self, cls: type[mqtt.Client], protocol: MQTTProtocolVersion, window: int = 20):
        self.client = cls(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.max_inflight_messages_set(window)
        self.ends = socket.socketpair()
        self.client._sock = self.ends[0]
        self.client._thread = threading.current_thread()  # type: ignore[assignment]

    def packets(self) -> list[tuple[int, int, int, bytes]]:
        queued = [(p["command"], p["mid"], p["qos"], bytes(p["packet"])) for p in self.client._out_packet]
        self.client._out_packet.clear()
        return queued

    def messages(self) -> list[tuple[Any, ...]]:
        return [(m.mid, m.topic, bytes(m.payload), m.qos, m.retain, m.dup, m.state, str(m.properties))
                for m in self.client._out_messages.values()]

    def close(self) -> None:
        self.client._sock = None
        for end in self.ends:
            end.close()


def correlation(value: bytes) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.CorrelationData = value
    return properties


SENDS: list[tuple[str, bytes, int, bool, Properties | None]] = [
    ("flow/7/status", b'{"state":"RUNNING"}', 1, False, None), ("flow/7/result", b"x" * 200, 1, True, None),
    ("a/b", b"", 1, False, None), ("a/b", b"y" * 20000, 2, False, correlation(b"\x01\x02")),
    ("t/\u00e9", b"p", 1, False, correlation(b"c")), ("a/+", b"p", 1, False, None), ("a/#", b"p", 1, False, None),
    ("", b"p", 1, False, None), ("t" * 65536, b"p", 1, False, None), ("q0", b"p", 0, False, None),
]


@pytest.mark.parametrize("protocol", [V5, V311])
def test_send_queues_what_publish_queues(protocol: MQTTProtocolVersion) -> None:
    # The same packets, bookkeeping and refusals as paho's publish(); its info is made
    # only when asked, and nothing at all in between.
    outcomes = {}
    for cls in (Client, mqtt.Client):
        queued = Queued(cls, protocol, window=7)
        try:
            results = []
            for topic, payload, qos, retain, properties in SENDS * 2:  # the second half past the window
                if cls is Client:
                    results.append(outcome(queued.client.send, topic, payload, qos, retain, properties))
                else:
                    results.append(outcome(lambda *a: tuple(queued.client.publish(*a)),  # noqa: B023
                                           topic, payload, qos, retain, properties))
            outcomes[cls] = (results, queued.packets(), queued.messages(), queued.client._inflight_messages)
            if cls is Client:
                assert all(made_info(m) is None for m in queued.client._out_messages.values())
        finally:
            queued.close()
    assert outcomes[Client] == outcomes[mqtt.Client]
    results, packets, messages, inflight = outcomes[Client]
    assert "ValueError" in results and inflight == 7 and len(packets) == 9
    assert len(messages) == (12 if protocol == V5 else 10)  # an empty topic is refused in 3.1.1 only


@pytest.mark.parametrize("manual", [True, False])
@pytest.mark.parametrize("with_log", [False, True])
def test_acks_queue_paho_s_packets(manual: bool, with_log: bool) -> None:
    made = {}
    for cls in (Client, mqtt.Client):
        queued = Queued(cls, V5)
        queued.client._manual_ack = manual
        if with_log:
            queued.client.on_log = lambda *args: None
        try:
            rcs = [queued.client.ack(mid, qos) for mid in (1, 255, 256, 0x1234, 65535) for qos in (0, 1, 2)]
            made[cls] = (rcs, queued.packets())
        finally:
            queued.close()
    assert made[Client] == made[mqtt.Client]
    assert len(made[Client][1]) == (10 if manual else 0)


@pytest.mark.parametrize("protocol", [V5, V311])
@pytest.mark.parametrize("with_log", [False, True])
def test_publish_packets_are_paho_s(protocol: MQTTProtocolVersion, with_log: bool) -> None:
    def send_all(client: mqtt.Client) -> list[Any]:
        results = []
        for topic, payload, qos, retain, properties in SENDS:
            if len(topic) > 65535:
                continue  # publish() refuses it first
            for dup in (False, True):
                results.append(outcome(lambda *a: (client._send_publish(*a),), 5, topic.encode(), payload, qos,
                                       retain, dup, None, properties))
        results.append(outcome(lambda: (client._send_publish(5, "str", b"p"),)))  # type: ignore[arg-type]
        results.append(outcome(lambda: (client._send_publish(5, b"t", "str"),)))  # type: ignore[arg-type]
        return results

    made = {}
    logged: dict[type, list[str]] = {Client: [], mqtt.Client: []}
    for cls in (Client, mqtt.Client):
        queued = Queued(cls, protocol)
        if with_log:
            queued.client.on_log = lambda c, u, level, text, cls=cls: logged[cls].append(text)
        try:
            made[cls] = (send_all(queued.client), queued.packets())
            queued.client._sock = None
            made[cls] += (outcome(lambda: (queued.client._send_publish(1, b"t", b"p", 1),)),)  # noqa: B023
        finally:
            queued.close()
    assert made[Client] == made[mqtt.Client]
    assert logged[Client] == logged[mqtt.Client] and len(logged[Client]) == (18 if with_log else 0)
    assert made[Client][2] == [MQTTErrorCode.MQTT_ERR_NO_CONN]


# ---------------------------------------------------------------------- with a real mosquitto
class Recorder:
    """A client (flowd's or stock paho's) that records what on_publish gets."""

    def __init__(self, cls: type[mqtt.Client], broker: Broker, protocol: MQTTProtocolVersion, window: int = 20):
        self.published: list[tuple[int, int, str, bool, str]] = []
        self.lock = threading.Lock()
        self.client = cls(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.max_inflight_messages_set(window)
        self.client.on_publish = self._on_publish
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(5)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self.lock:
            self.published.append((mid, reason.value, str(reason), reason.is_failure, str(properties)))

    def publish_all(self, topics: list[str], qos: int = 1) -> list[mqtt.MQTTMessageInfo]:
        infos = [self.client.publish(topic, f"{index}", qos=qos) for index, topic in enumerate(topics)]
        for info in infos:
            info.wait_for_publish(5)
        return infos

    def calls(self) -> list[tuple[int, int, str, bool, str]]:
        with self.lock:
            return sorted(self.published)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto that lets anonymous clients publish under ``open/`` only: MQTT 5 clients
    get PUBACK "Not authorized" (0x87) elsewhere."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite open/#\n")
    port = free_port()
    broker = Broker(tmp_path / "acl-broker", extra_conf=f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                                                     f"acl_file {acl}\n", port=port)
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.parametrize("protocol", [V5, V311])
def test_pubacks_resolve_like_paho_s(acl_broker: Broker, protocol: MQTTProtocolVersion) -> None:
    # With no subscriber, mosquitto answers an MQTT 5 publish with "No matching
    # subscribers" (3 bytes); a subscriber makes it a plain Success (2 bytes); a topic
    # the ACL refuses gets "Not authorized", a failure that still resolves the publish.
    watcher = Recorder(mqtt.Client, acl_broker, protocol)
    watcher.client.subscribe("open/watched/#", qos=1)
    time.sleep(0.2)
    topics = ["open/watched/a", "open/nobody", "closed/x", "open/watched/b"] * 25
    results = {}
    for cls, way in ((Client, "publish"), (Client, "send"), (mqtt.Client, "publish")):
        recorder = Recorder(cls, acl_broker, protocol)
        try:
            if way == "send":  # flowd's outbox: mids only, no info to wait on
                mids = [recorder.client.send(topic, b"x", 1)[1] for topic in topics]
            else:
                infos = recorder.publish_all(topics)
                assert all(info.is_published() for info in infos)
                mids = [info.mid for info in infos]
            wait_for(lambda: len(recorder.published) == len(topics), 5, message="every on_publish")  # noqa: B023
            assert sorted(mids) == [call[0] for call in recorder.calls()]
            assert recorder.client._out_messages == {} and recorder.client._inflight_messages == 0
            by_mid = dict(zip(mids, topics, strict=True))
            results[cls, way] = sorted((by_mid[mid], *rest) for mid, *rest in recorder.calls())
        finally:
            recorder.close()
    watcher.close()
    assert results[Client, "publish"] == results[Client, "send"] == results[mqtt.Client, "publish"]
    reasons = {(topic.split("/")[0] + "/" + topic.split("/")[1], value, failure)
               for topic, value, _, failure, _ in results[Client, "send"]}
    if protocol == V5:
        assert reasons == {("open/watched", 0, False), ("open/nobody", 0x10, False), ("closed/x", 0x87, True)}
    else:
        assert reasons == {("open/watched", 0, False), ("open/nobody", 0, False), ("closed/x", 0, False)}


def started_sender(broker: Broker) -> mqtt.Client:
    """A stock paho client, connected, its loop running, the clients under test settled."""
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=V5)
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    time.sleep(0.3)
    return sender


@pytest.mark.parametrize("protocol", [V5, V311])
def test_messages_in_arrive_as_paho_gives_them(broker: Broker, protocol: MQTTProtocolVersion) -> None:
    received: dict[type, list[tuple[Any, ...]]] = {Client: [], mqtt.Client: []}
    logged: dict[type, list[str]] = {Client: [], mqtt.Client: []}
    clients = []
    for cls in (Client, mqtt.Client):
        client = cls(CallbackAPIVersion.VERSION2, protocol=protocol)

        def on_message(c: Any, userdata: Any, message: mqtt.MQTTMessage, cls: type = cls) -> None:
            properties = message.properties
            received[cls].append((message.topic, message.payload, type(message.payload), message.qos, message.retain,
                                  properties.json() if properties is not None else None))

        client.on_message = on_message
        client.on_log = lambda c, u, level, text, cls=cls: text.startswith("Received PUBLISH") and logged[cls].append(
            text.split(", m")[0] + text.split(")", 1)[1])  # the mid differs between the two
        client.connect(broker.host, broker.port)
        client.subscribe("in/#", qos=2)
        client.loop_start()
        clients.append(client)
    sender = started_sender(broker)
    reply = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reply.ResponseTopic, reply.CorrelationData = "reply/7", b"\x07"
    sent = [("in/a", b"zero", 0, None), ("in/b", b'{"routine": "r"}', 1, None), ("in/c", b"two", 2, None),
            ("in/d", b"", 1, None), ("in/e", b"props", 1, reply)]
    for topic, payload, qos, properties in sent:
        sender.publish(topic, payload, qos=qos, properties=properties).wait_for_publish(5)
    wait_for(lambda: all(len(got) == len(sent) for got in received.values()), 5, message="every message")
    for client in (*clients, sender):
        client.disconnect()
        client.loop_stop()
    assert sorted(received[Client], key=repr) == sorted(received[mqtt.Client], key=repr)
    assert sorted(logged[Client]) == sorted(logged[mqtt.Client]) and len(logged[Client]) == len(sent)
    assert {row[0] for row in received[Client]} == {"in/a", "in/b", "in/c", "in/d", "in/e"}
    with_properties = [row for row in received[Client] if row[0] == "in/e"]
    assert with_properties[0][5] == ({"ResponseTopic": "reply/7", "CorrelationData": "07"} if protocol == V5 else None)


def test_callbacks_added_for_a_topic_filter_are_paho_s(broker: Broker) -> None:
    # flowd adds none, so its client skips the search for them; once one is added, each
    # message goes where paho sends it.
    got: dict[type, list[tuple[str, str]]] = {Client: [], mqtt.Client: []}
    clients = []
    for cls in (Client, mqtt.Client):
        client = cls(CallbackAPIVersion.VERSION2, protocol=V5)
        client.on_message = lambda c, u, m, cls=cls: got[cls].append(("any", m.topic))
        client.connect(broker.host, broker.port)
        client.subscribe("cb/#", qos=1)
        client.loop_start()
        clients.append(client)
    sender = started_sender(broker)
    sender.publish("cb/before", b"1", qos=1).wait_for_publish(5)
    wait_for(lambda: all(len(g) == 1 for g in got.values()), 5, message="the first message")
    for client, cls in zip(clients, (Client, mqtt.Client), strict=True):
        client.message_callback_add("cb/f/+", lambda c, u, m, cls=cls: got[cls].append(("filtered", m.topic)))
    for topic in ("cb/f/x", "cb/other", "cb/f/y/z"):
        sender.publish(topic, b"2", qos=1).wait_for_publish(5)
    wait_for(lambda: all(len(g) == 4 for g in got.values()), 5, message="every message")
    for client in (*clients, sender):
        client.disconnect()
        client.loop_stop()
    assert got[Client] == got[mqtt.Client] == [("any", "cb/before"), ("filtered", "cb/f/x"), ("any", "cb/other"),
                                                ("any", "cb/f/y/z")]


def test_bursts_from_other_threads_go_out_at_once_and_in_order(broker: Broker) -> None:
    # One wake byte per turn of the network loop: a publish that skipped its byte must
    # still go out now, not at the loop's next timeout (1 s); joined writes keep the order.
    arrivals: list[tuple[str, float]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=V5)
    watcher.on_message = lambda c, u, message: arrivals.append((message.payload.decode(), time.monotonic()))
    watcher.connect(broker.host, broker.port)
    watcher.subscribe("burst/#", qos=1)
    watcher.loop_start()
    client = Client(CallbackAPIVersion.VERSION2, protocol=V5)
    qos0_written: list[int] = []
    client.on_publish = lambda c, u, mid, reason, properties: qos0_written.append(mid)
    client.connect(broker.host, broker.port)
    client.loop_start()
    time.sleep(0.3)
    sent_at: dict[str, float] = {}

    def burst(name: str, count: int) -> None:
        for index in range(count):
            payload = f"{name}-{index:03d}"
            sent_at[payload] = time.monotonic()
            client.publish(f"burst/{name}", payload, qos=0 if index % 10 == 5 else 1)

    for round_ in range(20):  # lone publishes while the loop sleeps in select
        time.sleep(0.03)
        burst(f"lone{round_}", 1)
    threads = [threading.Thread(target=burst, args=(name, 200)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: len(arrivals) == 420, 10, message="every message")
    client.disconnect()
    client.loop_stop()
    watcher.disconnect()
    watcher.loop_stop()
    delays = sorted(at - sent_at[payload] for payload, at in arrivals)
    assert delays[-1] < 0.5, f"a publish waited for the loop's timeout: {delays[-5:]}"
    for name in ("a", "b"):
        qos1 = [f"{name}-{i:03d}" for i in range(200) if i % 10 != 5]  # the broker orders each QoS apart
        assert [p for p, _ in arrivals if p in qos1] == qos1
    assert len(qos0_written) == 420  # QoS 0: on_publish once written, QoS 1: on its PUBACK


@pytest.mark.parametrize("protocol", [V5, V311])
def test_messages_queued_behind_a_full_window_still_go(broker: Broker, protocol: MQTTProtocolVersion) -> None:
    # flowd never fills paho's window, so its client skips paho's search for queued
    # messages after each PUBACK; once the window does fill, they must go as with paho.
    for cls in (Client, mqtt.Client):
        recorder = Recorder(cls, broker, protocol, window=3)
        recorder.publish_all(["q/first"] * 3)  # PUBACKs while nothing is queued: flowd's client stops looking
        wait_for(lambda: len(recorder.published) == 3, 5, message="the first on_publish")  # noqa: B023
        queued_seen = []
        with recorder.client._out_message_mutex:  # the network thread cannot take a PUBACK meanwhile
            infos = [recorder.client.publish(f"q/{index}", b"x", qos=1) for index in range(60)]
            queued_seen.append(sum(m.state == mqtt.mqtt_ms_queued for m in recorder.client._out_messages.values()))
        for info in infos:
            info.wait_for_publish(5)
        assert all(info.is_published() for info in infos), cls
        wait_for(lambda: len(recorder.published) == 63, 5, message="every on_publish")  # noqa: B023
        assert queued_seen == [57] and recorder.client._out_messages == {}
        recorder.close()
