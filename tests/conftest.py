"""Shared fixtures: a real mosquitto, real SQLite files, real huey workers, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """The root logger's handlers and level as they were: a test may install flowd's logging."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def decode_payloads(payloads: list[bytes]) -> list[Any]:
    """Each payload parsed as JSON, or kept as bytes when it is not JSON."""
    found: list[Any] = []
    for payload in payloads:
        try:
            found.append(json.loads(payload))
        except ValueError:
            found.append(payload)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """A private mosquitto on a free loopback port that a test can stop and start again.

    Persistence is on (in the test's folder) so sessions and queued QoS 1 messages
    survive a restart, as with a real broker.
    """

    def __init__(self, folder: Path, extra_conf: str = "", port: int | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"

    def write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root",  # as root, mosquitto would drop to 'mosquitto', which cannot write here
            "persistence true",
            f"persistence_location {self.folder}/",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            f"log_dest file {self.log}",
        ]
        if self.extra_conf:
            lines = [line for line in lines if not line.startswith(("listener", "allow_anonymous"))]
            lines.append(textwrap.dedent(self.extra_conf).strip())
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.write_conf()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start: {self.log.read_text() if self.log.exists() else ''}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto on 127.0.0.1:<free port>, with stop()/start()."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """A task folder with the project's example scripts and the test scripts."""
    path = tmp_path / "tasks"
    path.mkdir()
    for script in (ROOT / "tasks").glob("task_*.py"):
        shutil.copy(script, path / script.name)
    for script in (ROOT / "tests" / "task_scripts").glob("task_*.py"):
        shutil.copy(script, path / script.name)
    path.chmod(0o755)
    return path


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a flowd.toml from nested dicts (values must be TOML-representable)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def config_file(tmp_path: Path, state_dir: Path, task_dir: Path) -> Callable[..., Path]:
    """Factory: ``config_file(broker=b, workers=2, mqtt={...}, flowd={...})`` -> path of a flowd.toml."""

    def make(broker: Broker | None = None, workers: int = 2, **sections: dict[str, Any]) -> Path:
        flowd_section = {"state_dir": str(state_dir), "task_paths": [str(task_dir)], "workers": workers,
                         "node_id": "testnode", "shutdown_grace": 5}
        flowd_section.update(sections.pop("flowd", {}))
        mqtt_section: dict[str, Any] = {"host": "127.0.0.1", "port": broker.port if broker else free_port()}
        mqtt_section.update(sections.pop("mqtt", {}))
        # The console is on by default (SPEC 11): each test daemon gets its own free port.
        web_section: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}"}
        web_section.update(sections.pop("web", {}))
        data = {"flowd": flowd_section, "mqtt": mqtt_section, "web": web_section, **sections}
        return write_config(tmp_path / "flowd.toml", data)

    return make


@pytest.fixture
def config(config_file: Callable[..., Path]) -> Any:
    from flowd.config import load_config

    return load_config(config_file())


@pytest.fixture
def db(config: Any) -> Iterator[Any]:
    """The real SQLite database of ``config``, opened in this process."""
    from flowd import api

    engine = api.configure(config, create=True)
    yield engine
    api.reset()


@pytest.fixture
def worker_pool(db: Any) -> Iterator[Any]:
    """The real worker processes for ``config`` (the engine fixture ``db``), forked from this one."""
    from flowd.queue.workers import WorkerPool

    pool = WorkerPool(db.config)
    pool.start()
    yield pool
    pool.stop(grace=2)


PG_ADMIN = "dbname=postgres user=postgres host=127.0.0.1 port=5432"  # the machine's PostgreSQL


def create_pg_database(prefix: str) -> str:
    """A new, empty database on the machine's PostgreSQL for one test; its name."""
    import uuid

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    """Drop a test's database, closing what is still connected to it."""
    _pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)')


def _pg_admin(statement: str) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE cannot run inside one)."""
    import psycopg2

    admin = psycopg2.connect(PG_ADMIN)
    try:
        admin.autocommit = True
        admin.cursor().execute(statement)
    finally:
        admin.close()


def flowd_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "INVOCATION_ID",
                                                             "STATE_DIRECTORY", "JOURNAL_STREAM", "FLOWD_CONFIG")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class FlowdProcess:
    """``flowd run`` as a real subprocess, with kill -9 and restart."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None):
        self.config_path = config_path
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FlowdProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "flowd", "run", "--config", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, env=flowd_env(self.env),
                                         cwd=str(ROOT), start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        """kill -9 the daemon and every process of its session (pool, workers)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._reap_group()
        self.proc = None
        return code

    def _reap_group(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def flowd_proc(tmp_path: Path) -> Iterator[Callable[..., FlowdProcess]]:
    """Factory: ``flowd_proc(config_path)`` starts ``flowd run``; all are killed at teardown."""
    started: list[FlowdProcess] = []

    def start(config_path: Path, env: dict[str, str] | None = None) -> FlowdProcess:
        proc = FlowdProcess(config_path, tmp_path / f"flowd-{len(started)}.log", env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill9()


@pytest.fixture
def flowctl(config_file: Callable[..., Path]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``flowctl`` (``python -m flowd.cli.cli``) against the test config."""

    def run(*args: str, config: Path | None = None, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        path = config or config_file()
        return subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(path), *args],
                              capture_output=True, text=True, env=flowd_env(), timeout=timeout, cwd=str(ROOT),
                              input=input)

    return run


class MqttClient:
    """A small paho client for tests: subscribe, collect messages, publish and wait for PUBACK."""

    def __init__(self, broker: Broker, client_id: str = "", protocol: int = 5):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self.connected.wait(5):
            raise RuntimeError("test client could not connect")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, message.properties))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos)
        done.wait(5)

    def publish(self, topic: str, payload: Any, qos: int = 1, properties: Any = None) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        info = self.client.publish(topic, data, qos=qos, properties=properties)
        info.wait_for_publish(5)

    def json_on(self, topic_filter: str) -> list[Any]:
        from flowd.mqtt.topics import topic_matches

        with self.lock:
            return decode_payloads([p for t, p, _ in self.messages if topic_matches(topic_filter, t)])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def mqtt_client(broker: Broker) -> Iterator[Callable[..., MqttClient]]:
    clients: list[MqttClient] = []

    def make(client_id: str = "", protocol: int = 5) -> MqttClient:
        client = MqttClient(broker, client_id, protocol)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# ---------------------------------------------------------------------------
# Daemon / MQTT area (flowd run, outbox, systemd): a test client whose session
# survives broker restarts, so nothing flowd publishes while it reconnects is missed.


class SessionClient:
    """An MQTT 5 test client with a fixed id and a persistent session that re-subscribes
    on every connect; messages are kept in arrival order with their properties."""

    def __init__(self, broker: Broker, client_id: str, topics: list[str], tls: dict[str, Any] | None = None,
                 username: str | None = None, password: str | None = None):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.topics = topics
        self.messages: list[tuple[str, bytes, Any, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            self.client.tls_set(**tls)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("session test client could not connect and subscribe")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, message.properties, bool(message.retain)))

    def publish(self, topic: str, payload: Any, qos: int = 1, retain: bool = False, properties: Any = None) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        info = self.client.publish(topic, data, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(10)

    def received(self, topic_filter: str) -> list[tuple[str, bytes, Any, bool]]:
        from flowd.mqtt.topics import topic_matches

        with self.lock:
            return [m for m in self.messages if topic_matches(topic_filter, m[0])]

    def json_on(self, topic_filter: str) -> list[Any]:
        return decode_payloads([m[1] for m in self.received(topic_filter)])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def session_client(broker: Broker) -> Iterator[Callable[..., SessionClient]]:
    """Factory: ``session_client(topics=["flow/#"], client_id="watcher")``."""
    clients: list[SessionClient] = []

    def make(topics: list[str], client_id: str = "test-watcher", target: Broker | None = None,
             **kwargs: Any) -> SessionClient:
        client = SessionClient(target or broker, client_id, topics, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
