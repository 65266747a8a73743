"""The paho client: submits in, outbox out, Last Will, and messages for waiting flows.

One client per node with a fixed client id and a persistent session (clean start off
plus a Session Expiry Interval in MQTT 5, clean session off in 3.1.1), so submits sent
while flowd was away are delivered when it reconnects. Subscriptions are renewed on
every connect. A submit is acknowledged (``manual_ack``) only once its flow is
committed or it was refused, so a crash in between loses nothing: the broker sends it
again. Nothing from the network is ever unpickled or evaluated; every payload is
checked (``payloads.py``) before it touches the engine.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from flowd import __version__
from flowd.config import Config
from flowd.engine.engine import Engine, Submission, flow_status_payload
from flowd.errors import ConfigError, InputError
from flowd.mqtt import intake, outbox
from flowd.mqtt.client import Client
from flowd.mqtt.intake import Intake, Received
from flowd.mqtt.payloads import SubmitRefused, SubmitRequest, is_reply_topic, parse_json_payload, parse_submit
from flowd.mqtt.status import Status
from flowd.mqtt.topics import is_valid_filter, topic_matches
from flowd.store import nodes
from flowd.store.models import WAITING, isoformat, utcnow, write_transaction

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
RECEIVE_MAXIMUM = intake.MAX_BATCH * 2
PAHO_INFLIGHT = outbox.MAX_IN_FLIGHT  # paho never queues behind its window, so it never reorders
SESSION_QUIET_S = 0.5   # a dead node's session is drained once nothing came for this long
SESSION_LIMIT_S = 30.0


# ---------------------------------------------------------------------- connection problems
def describe_connect_error(exc: BaseException, host: str, port: int) -> tuple[int, str]:
    """(log level, sentence) for a failed connection attempt."""
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return logging.ERROR, f"TLS: the broker's certificate at {where} was not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return logging.ERROR, f"TLS handshake with the broker at {where} failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return logging.WARNING, (f"the broker at {where} refused the connection (nothing listening?): start one "
                                 "(sudo systemctl start mosquitto) or set [mqtt] host and port")
    if isinstance(exc, socket.gaierror):
        return logging.ERROR, f"cannot resolve the broker host '{host}': {exc.strerror}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return logging.WARNING, f"connecting to the broker at {where} timed out"
    return logging.WARNING, f"cannot connect to the broker at {where}: {exc}"


def new_client(config: Config, client_id: str, *, v5: bool, persistent: bool) -> Client:
    """A paho client for the configured broker: protocol, user, password, TLS, reconnect
    backoff. ``persistent``: the daemon's session (kept by the broker, messages
    acknowledged by flowd); else a clean one (flowctl's listeners). ConfigError when a
    TLS file cannot be loaded."""
    if v5:
        client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=persistent)
    else:
        client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=not persistent, manual_ack=persistent)
    client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
    _set_credentials(client, config)
    return client


def _set_credentials(client: mqtt.Client, config: Config) -> None:
    m = config.mqtt
    if m.username:
        client.username_pw_set(m.username, m.password)
    if m.tls is not None:
        try:
            client.tls_set(ca_certs=m.tls.ca, certfile=m.tls.cert, keyfile=m.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS files: {exc}", key="mqtt.tls", path=config.path) from None
        if m.tls.insecure:
            client.tls_insecure_set(True)


# ---------------------------------------------------------------------- the bridge
class MqttBridge:
    """Connects flowd to the broker; owns the outbox publisher that feeds it.

    >>> bridge = MqttBridge(config, engine)
    >>> bridge.start()              # returns at once; connects and reconnects in the background
    >>> bridge.stop_intake(); bridge.publish_offline(); bridge.stop(drain=3.0)
    """

    def __init__(self, config: Config, engine: Engine):
        self.config = config
        self.engine = engine
        m = config.mqtt
        self.is_v5 = m.protocol == "5"
        self.status_topic = config.topic(f"flowd/{config.flowd.node_id}/status")
        self.error_topic = config.topic("flow/error")
        self.submit_topics = {config.topic("flow/submit"), config.topic(f"flowd/{config.flowd.node_id}/submit")}
        self.started = False
        self._connected = threading.Event()
        self._fall_back = False
        self._intake = True
        self._problem: str | None = None
        self._wait_lock = threading.Lock()
        self._wait_filters: set[str] = set()
        self._bad_filters: set[str] = set()
        self.publisher = outbox.OutboxPublisher(config, self, before_send=self.check_statuses)
        self.intake = Intake(self, ack=self.ack)
        self._connection = 0  # counts connections: a packet id is only valid on its own
        self._since: str | None = None  # when the current connection began: the status's "since"
        self.client = self._build_client()
        self.counts: Callable[[], dict[str, int]] | None = None  # the node's flow counts, for its status
        self.on_connected: Callable[[], None] | None = None     # called after each connect (Home Assistant)
        self.extra_topics: dict[str, Callable[[bytes], None]] = {}  # topic -> handler, not flowd's own input

    # ------------------------------------------------------------------ set-up
    def _subscriptions(self) -> list[str]:
        node_submit = self.config.topic(f"flowd/{self.config.flowd.node_id}/submit")
        group = self.config.mqtt.shared_group
        # With a shared group, each submit goes to exactly one node of the group (SPEC 10);
        # a plain subscription as well would hand this node a second copy.
        common = f"$share/{group}/{self.config.topic('flow/submit')}" if group else self.config.topic("flow/submit")
        return [common, node_submit]

    def _build_client(self) -> Client:
        client = new_client(self.config, self.config.mqtt.client_id, v5=self.is_v5, persistent=True)
        client.max_inflight_messages_set(PAHO_INFLIGHT)
        client.max_queued_messages_set(0)  # the outbox publisher bounds what it hands over
        client.will_set(self.status_topic, self._status_payload("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        return client

    def _status_payload(self, state: str) -> str:
        since = self._since if state == "online" and self._since else isoformat(utcnow())
        payload: dict[str, Any] = {"state": state, "version": __version__, "since": since}
        if state == "online" and self.counts is not None:
            try:
                payload["counts"] = self.counts()
            except Exception:  # the status must go out without them
                log.exception("MQTT: cannot count flows for the node status")
        return json.dumps(payload, separators=(",", ":"))

    def publish_online(self) -> None:
        """Queue the retained ``online`` status again, with fresh counts (the daemon's loop,
        when they changed)."""
        if not self.is_connected():
            return
        self._queue([(self.status_topic, self._status_payload("online"), None, True)])

    def _queue(self, messages: list[tuple[str, Any, str | None, bool]]) -> None:
        """Put (topic, payload (text or JSON value), correlation data, retain) messages in the outbox, in one
        transaction, and wake the publisher (its own thread: it syncs before it sends)."""
        with write_transaction(sync=False):
            for topic, payload, correlation_hex, retain in messages:
                outbox.add_message(topic, payload, correlation_data=correlation_hex, retain=retain,
                                   node_id=self.config.flowd.node_id)
        self.publisher.poke()

    def start(self) -> None:
        """Start the publisher and the network thread; a broker that is down is retried."""
        self.started = True
        self.publisher.start()
        self.intake.start()
        self._connect()

    def _connect(self) -> None:
        m = self.config.mqtt
        if self.is_v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = min(int(m.session_expiry), 0xFFFFFFFF)
            # Unacknowledged submits the broker may send ahead (MQTT 5 Receive Maximum):
            # the window a batch of the intake's group commit can grow to.
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            self.client.connect_async(m.host, m.port, m.keepalive, clean_start=False, properties=properties)
        else:
            self.client.connect_async(m.host, m.port, m.keepalive)
        self.client.loop_start()
        log.info("MQTT: connecting to %s:%d as '%s' (MQTT %s%s%s)", m.host, m.port, m.client_id,
                 "5" if self.is_v5 else "3.1.1", ", TLS" if m.tls else "",
                 f", user '{m.username}'" if m.username else "")

    def fall_back_if_needed(self) -> None:
        """Switch to MQTT 3.1.1 when the broker turned MQTT 5 down (called by the daemon's
        loop: the client cannot be replaced from its own thread)."""
        if not self._fall_back:
            return
        self._fall_back = False
        log.warning("MQTT: the broker at %s:%d does not speak MQTT 5; using MQTT 3.1.1 (set mqtt.protocol = "
                    "\"3.1.1\" to start with it)", self.config.mqtt.host, self.config.mqtt.port)
        self.client.loop_stop()
        self.is_v5 = False
        self._problem = None
        self.client = self._build_client()
        self._connect()

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def stop_intake(self) -> None:
        """Stop taking submits; they stay unacknowledged in the session for the next start."""
        self._intake = False

    def publish_offline(self) -> None:
        """Queue the retained ``offline`` status (a clean disconnect sends no Last Will)."""
        self._queue([(self.status_topic, self._status_payload("offline"), None, True)])

    def stop(self, drain: float = 3.0) -> bool:
        """Send what the outbox holds for up to ``drain`` s, then disconnect; True if it all went."""
        self.intake.stop()
        drained = self.publisher.drain(drain) if self.is_connected() else False
        self.publisher.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        return drained

    # ------------------------------------------------------------------ paho callbacks (network thread)
    def _report_problem(self, level: int, text: str) -> None:
        """Log a connection problem once, not at every retry."""
        if text != self._problem:
            self._problem = text
            log.log(level, "MQTT: %s; retrying with backoff up to %ds", text, RECONNECT_MAX_S)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Without TCP_NODELAY every request/answer waits ~40 ms for Nagle + delayed ACK.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        exc = self.client.last_error
        m = self.config.mqtt
        if exc is None:
            self._report_problem(logging.WARNING, f"cannot connect to the broker at {m.host}:{m.port}")
        else:
            self._report_problem(*describe_connect_error(exc, m.host, m.port))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        try:
            m = self.config.mqtt
            if reason.is_failure and self.is_v5 and reason.value == 0x84:  # Unsupported Protocol Version
                self._fall_back = True
                return
            if reason.is_failure:
                level = logging.ERROR if reason.value in (0x04, 0x05, 0x86, 0x87, 0x8C) else logging.WARNING
                self._report_problem(level, f"the broker at {m.host}:{m.port} refused the connection: {reason}")
                return
            self._problem = None
            self._connection += 1
            # paho would re-send what it holds before anything new, racing the outbox
            # thread; take it back and let the outbox hand it over again, in row order.
            taken_back = [held.mid for held in self.client.drop_out_messages()]
            self.publisher.connected(taken_back)
            self._connected.set()
            log.info("MQTT: connected to %s:%d (session present: %s)", m.host, m.port,
                     "yes" if flags.session_present else "no")
            self._subscribe(self._subscriptions() + sorted(self.extra_topics))
            with self._wait_lock:
                self._wait_filters.clear()
            self.refresh_wait_topics()
            self._since = isoformat(utcnow())
            self._queue([(self.status_topic, self._status_payload("online"), None, True)])
            if self.on_connected is not None:
                self.on_connected()
        except Exception:
            log.exception("MQTT: error while setting up the connection")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        if self._connected.is_set():
            self._connected.clear()
            if reason.is_failure or self._intake:
                log.warning("MQTT: lost the connection to the broker (%s); reconnecting", reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        try:
            self.publisher.acknowledged(mid, not reason.is_failure)
        except Exception:
            log.exception("MQTT: error handling the acknowledgement of message %d", mid)

    def _subscribe(self, topics: list[str]) -> None:
        if not topics:
            return
        if self.is_v5:
            self.client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        else:
            self.client.subscribe([(t, 1) for t in topics])

    def check_statuses(self, statuses: list[Status]) -> None:
        """Before a flow's WAITING status goes out, subscribe what it waits for, so an
        answer sent on seeing that status cannot arrive before the subscription."""
        if any(status.state == WAITING for status in statuses):
            self.refresh_wait_topics()

    def refresh_wait_topics(self) -> None:
        """Subscribe the topics waiting flows listen on; drop the ones nobody waits for."""
        if not self.is_connected():
            return
        with self._wait_lock:
            # Read inside the lock: a stale read racing a newer refresh would unsubscribe
            # a topic a flow has just started waiting on.
            wanted = {t for t in self.engine.waiting_topics() if t}
            new = sorted(wanted - self._wait_filters - self._bad_filters)
            gone = sorted(self._wait_filters - wanted)
            for topic in new:
                if not is_valid_filter(topic):
                    log.error("MQTT: a flow waits on '%s', which is not a valid topic filter", topic)
                    self._bad_filters.add(topic)
            new = [t for t in new if t not in self._bad_filters]
            self._subscribe(new)
            keep = set(self._subscriptions())
            gone = [t for t in gone if t not in keep]
            if gone:
                self.client.unsubscribe(gone)
            self._wait_filters = (self._wait_filters | set(new)) - set(gone)

    # ------------------------------------------------------------------ messages
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not self._intake:
            return  # not acknowledged: the broker keeps it for the next session
        topic = message.topic  # a property: paho decodes the topic's bytes each time it is read
        handler = self.extra_topics.get(topic)
        if handler is not None:
            try:
                handler(bytes(message.payload))
            except Exception:
                log.exception("MQTT: error handling a message on %r", topic)
            if message.qos:
                self.client.ack(message.mid, message.qos)
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("MQTT: message %d on '%s' (%d bytes%s)", message.mid, topic, len(message.payload),
                      ", again" if message.dup else "")
        self.intake.put(Received(topic, bytes(message.payload), message.properties, message.mid, message.qos,
                                 bool(message.retain), self._connection))

    def ack(self, message: Received) -> None:
        """PUBACK a handled message, called by the intake once its state is on disk."""
        if message.connection != self._connection:
            return  # its packet id belonged to an earlier connection: the broker sends it again
        self.client.ack(message.mid, message.qos)

    def is_submit(self, topic: str) -> bool:
        return topic in self.submit_topics

    def end_session_of(self, node_id: str, client_id: str) -> None:
        """Take what the broker keeps for a node whose lease expired, and end its session.

        mosquitto (2.0) keeps handing a persistent session its turn of a shared
        subscription while the client is away, and holds what it had not acknowledged:
        without this, those submits would wait for the dead node to come back. Resuming
        the session with a Session Expiry of 0 delivers them here (stored, then
        acknowledged, like ours), and the session ends when this connection closes, so
        the broker sends the group's next submits to the nodes still connected.
        """
        self.refresh_wait_topics()  # what its waiting flows listen on, before its session ends
        if client_id == self.config.mqtt.client_id or self.config.mqtt.protocol != "5":
            self._session_drained(node_id)
            return
        threading.Thread(target=self._drain_session, args=(node_id, client_id), name="flowd-mqtt-takeover",
                         daemon=True).start()

    def _session_drained(self, node_id: str) -> None:
        """Lift the mark :func:`nodes.claim_session` set: the node, back, may connect."""
        try:
            with write_transaction():
                nodes.session_drained(node_id)
        except Exception:  # the node back waits SESSION_LIMIT_S at most
            log.exception("cannot note that node %s's broker session was taken", node_id)

    def _drain_session(self, node_id: str, client_id: str) -> None:
        try:
            self._drain(node_id, client_id)
        finally:
            self._session_drained(node_id)

    def _drain(self, node_id: str, client_id: str) -> None:
        m = self.config.mqtt
        client = new_client(self.config, client_id, v5=True, persistent=True)  # no will, none of our callbacks
        topics = {self.config.topic("flow/submit"), self.config.topic(f"flowd/{node_id}/submit")}

        def ack(message: Received) -> None:
            client.ack(message.mid, message.qos)

        drain = Intake(_SessionHandler(self, topics), ack=ack)
        arrived = {"at": time.monotonic(), "count": 0}

        def on_message(c: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
            arrived["at"], arrived["count"] = time.monotonic(), arrived["count"] + 1
            drain.put(Received(message.topic, bytes(message.payload), message.properties, message.mid, message.qos,
                               bool(message.retain), 0))

        client.on_message = on_message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        properties.ReceiveMaximum = RECEIVE_MAXIMUM  # the rest waits in the session, as for our own
        drain.start()
        try:
            client.connect(m.host, m.port, m.keepalive, clean_start=False, properties=properties)
        except OSError as exc:
            log.warning("MQTT: cannot reach the broker to end node %s's session: %s", node_id, exc)
            drain.stop()
            return
        log.info("node %s: its lease expired; node %s is taking its MQTT session '%s'", node_id,
                 self.config.flowd.node_id, client_id)
        # Out of the group first: the broker would go on handing this session its turn
        # of new submits, and the last ones could come just before the session ends
        # (lost with it). What it holds already is still delivered.
        group = m.shared_group
        client.unsubscribe([f"$share/{group}/{self.config.topic('flow/submit')}" if group
                            else self.config.topic("flow/submit"), self.config.topic(f"flowd/{node_id}/submit")])
        client.loop_start()
        deadline = time.monotonic() + SESSION_LIMIT_S
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if time.monotonic() - arrived["at"] > SESSION_QUIET_S and drain.acknowledged >= arrived["count"]:
                break
        client.disconnect()
        client.loop_stop()
        drain.stop()
        log.warning("node %s: its lease expired; node %s ended its MQTT session '%s' and took the %d message(s) "
                    "the broker kept for it", node_id, self.config.flowd.node_id, client_id, drain.acknowledged)

    def handle_submits(self, messages: list[Received]) -> None:
        """Start a flow for each submit, or refuse it with one message on ``flow/error``;
        the flows share one transaction (the intake syncs once, then acknowledges).
        Refusals and answers go out in the order the submits came."""
        checked: list[tuple[int, Received, SubmitRequest, str | None, str | None]] = []
        answers: list[tuple[int, str, dict[str, Any], str | None]] = []   # (order, topic, payload, correlation)
        for order, message in enumerate(messages):
            properties = message.properties
            response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
            if response_topic is not None and not is_reply_topic(response_topic):
                response_topic = None
            correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
            correlation_hex = bytes(correlation).hex() if correlation else None
            try:
                request = parse_submit(message.payload, self.config.mqtt.max_payload)
            except SubmitRefused as exc:
                answers.extend((order, *answer) for answer in self._refusal(
                    message.topic, str(exc), exc.request_id, exc.reply_to or response_topic, correlation_hex))
                continue
            checked.append((order, message, request, request.reply_to or response_topic, correlation_hex))
        outcomes = self.engine.submit_many([
            Submission(request.routine, request.args, request.kwargs, request.request_id, reply_to, correlation_hex,
                       trigger="mqtt", require_mqtt=True)
            for _, _, request, reply_to, correlation_hex in checked], sync=False) if checked else []
        for (order, message, request, reply_to, correlation_hex), outcome in zip(checked, outcomes, strict=True):
            if isinstance(outcome, InputError):
                answers.extend((order, *answer) for answer in self._refusal(
                    message.topic, str(outcome), request.request_id, reply_to, correlation_hex))
                continue
            if isinstance(outcome, Exception):
                raise outcome
            flow, created = outcome
            extra = {"FLOW_ID": flow.id, "ROUTINE": flow.routine}
            if created:
                log.debug("flow %d (%s) submitted on '%s'", flow.id, flow.routine, message.topic, extra=extra)
                continue
            log.info("flow %d (%s): request_id '%s' seen again on '%s'; answering with its status", flow.id,
                     flow.routine, request.request_id, message.topic, extra=extra)
            answers.append((order, reply_to or self.config.topic(f"flow/{flow.id}/status"),
                            flow_status_payload(flow), correlation_hex))
        if answers:
            answers.sort(key=lambda answer: answer[0])
            self._queue([(topic, payload, correlation_hex, False) for _, topic, payload, correlation_hex in answers])

    def _refusal(self, topic: str, error: str, request_id: str | None, reply_to: str | None,
                 correlation_hex: str | None) -> list[tuple[str, dict[str, Any], str | None]]:
        """Log a refused submit; the messages that say so (``flow/error``, and ``reply_to``)."""
        log.warning("MQTT: submit on '%s'%s refused: %s", topic,
                    f" (request_id '{request_id}')" if request_id else "", error)
        payload: dict[str, Any] = {"error": error, "topic": topic}
        if request_id is not None:
            payload["request_id"] = request_id
        messages: list[tuple[str, dict[str, Any], str | None]] = [(self.error_topic, payload, None)]
        if reply_to and reply_to != self.error_topic:
            messages.append((reply_to, payload, correlation_hex))
        return messages

    def handle_event(self, topic: str, payload: bytes, retained: bool = False, *, any_topic: bool = False) -> None:
        """A message on a topic a waiting flow listens on (SPEC 2.1).

        A retained message replayed at subscribe time is old news, not the event waited for.
        JSON payloads are passed decoded, other UTF-8 text as a string. ``any_topic``: it
        came from a dead node's session, subscribed for its flows, which this node may
        not have subscribed yet (the engine matches it against the waiting flows anyway).
        """
        with self._wait_lock:
            watched = any_topic or any(topic_matches(f, topic) for f in self._wait_filters)
        if not watched or retained:
            log.debug("MQTT: ignoring a %smessage on '%s'", "retained " if retained else "", topic)
            return
        limit = self.config.mqtt.max_payload
        if len(payload) > limit:
            log.warning("MQTT: ignoring a message on '%s' for a waiting flow: %d bytes is over mqtt.max_payload "
                        "(%d)", topic, len(payload), limit)
            return
        try:
            event: Any = parse_json_payload(payload, limit)
        except InputError:
            try:
                event = payload.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("MQTT: ignoring a message on '%s' for a waiting flow: it is not UTF-8 text", topic)
                return
        resumed = self.engine.deliver_event(topic, event)
        if resumed:
            log.debug("MQTT: message on '%s' resumed flow(s) %s", topic, ", ".join(map(str, resumed)))

    # ------------------------------------------------------------------ outbox.Sender
    def send(self, topic: str, payload: bytes, qos: int, retain: bool, correlation_data: bytes | None) -> int | None:
        """Hand one outbox row to paho; its mid, or None when paho cannot take it now."""
        properties = None
        if correlation_data and self.is_v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation_data
        rc, mid = self.client.send(topic, payload, qos, retain, properties)
        if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return None
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            return None  # paho dropped it; send again once connected
        return mid


class _SessionHandler:
    """The intake's handler for a dead node's session: its submit topics count as submits."""

    def __init__(self, bridge: MqttBridge, submit_topics: set[str]):
        self.bridge = bridge
        self.submit_topics = submit_topics

    def is_submit(self, topic: str) -> bool:
        return topic in self.submit_topics

    def handle_submits(self, messages: list[Received]) -> None:
        self.bridge.handle_submits(messages)

    def handle_event(self, topic: str, payload: bytes, retained: bool = False) -> None:
        self.bridge.handle_event(topic, payload, retained, any_topic=True)
