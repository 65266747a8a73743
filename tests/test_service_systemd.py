"""``flowd run`` under a (simulated) systemd: sd_notify, watchdog, STATUS, SIGHUP, SIGTERM.

The notify socket is a real AF_UNIX datagram socket bound by the test, exactly what
systemd gives a ``Type=notify`` service in ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, flowd_env, wait_for

from flowd import catalog
from flowd.service.sdnotify import Notifier, send_notify
from flowd.store.models import Flow, FlowState, NodeStatus


class NotifySocket:
    """The service manager's end: collects every datagram flowd sends."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append(data.decode())

    def lines(self) -> list[str]:
        with self.lock:
            return [line for message in self.messages for line in message.splitlines()]

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


@pytest.fixture
def tasks(db: Any, task_dir: Path) -> Path:
    paths = [str(task_dir)]
    catalog.save_task("nap", "mqtt_steps.Nap", task_paths=paths)
    catalog.save_task("double", "mqtt_steps.Double", task_paths=paths)
    catalog.save_routine("napper", ["nap", "double"])
    return task_dir


def flow_states() -> list[str]:
    return [f.state for f in Flow.select().order_by(Flow.id)]


def test_ready_watchdog_status_and_stopping(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                            notify_socket: NotifySocket, tasks: Path) -> None:
    # systemd with WatchdogSec=1s: READY=1 once serving, WATCHDOG=1 again and again,
    # STATUS= with the counts and the broker, and STOPPING=1 then exit 0 on SIGTERM.
    proc = flowd_proc(config_file(broker=broker), env={"NOTIFY_SOCKET": notify_socket.path,
                                                         "WATCHDOG_USEC": "1000000"})
    wait_for(lambda: "READY=1" in notify_socket.lines(), timeout=20, message=f"READY=1; log:\n{proc.log_text()}")
    wait_for(lambda: notify_socket.count("WATCHDOG=1") >= 4, timeout=10, message="repeated WATCHDOG=1")
    status = wait_for(lambda: [s for s in notify_socket.lines() if s.startswith("STATUS=") and "connected" in s],
                      timeout=10, message="STATUS line")
    assert status[-1] == "STATUS=0 running, 0 queued, broker connected"
    assert f"MAINPID={proc.pid}" in notify_socket.lines()
    assert notify_socket.lines().index("READY=1") < notify_socket.lines().index("WATCHDOG=1")
    assert proc.terminate() == 0
    assert notify_socket.count("STOPPING=1") == 1
    assert NodeStatus.get(NodeStatus.node_id == "testnode").stopped_at is not None


def test_status_counts_flows_and_a_missing_broker(broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
                                                  notify_socket: NotifySocket, tasks: Path) -> None:
    from flowd import api

    proc = flowd_proc(config_file(broker=broker), env={"NOTIFY_SOCKET": notify_socket.path})
    wait_for(lambda: "READY=1" in notify_socket.lines(), timeout=20, message="READY=1")
    api.submit_flow("napper", nap=4)
    wait_for(lambda: "STATUS=1 running, 0 queued, broker connected" in notify_socket.lines(), timeout=10,
             message=f"a running flow in STATUS: {notify_socket.lines()}")
    broker.stop()
    wait_for(lambda: [s for s in notify_socket.lines() if s.endswith("broker unreachable")], timeout=10,
             message="broker unreachable in STATUS")
    assert "WATCHDOG=1" not in notify_socket.lines()  # no WATCHDOG_USEC, no pings
    broker.start()
    assert proc.proc.poll() is None


def test_sighup_picks_up_a_new_script_while_a_flow_runs(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, notify_socket: NotifySocket,
        tasks: Path, tmp_path: Path) -> None:
    # A flow is mid-step when the operator drops in a new task script, defines a routine
    # with it and sends SIGHUP: RELOADING=1 then READY=1; the new routine runs; the
    # running flow is not disturbed and finishes.
    from flowd import api

    path = config_file(broker=broker)
    proc = flowd_proc(path, env={"NOTIFY_SOCKET": notify_socket.path})
    wait_for(lambda: "READY=1" in notify_socket.lines(), timeout=20, message="READY=1")
    marker = tmp_path / "started.txt"
    running = api.submit_flow("napper", nap=3, marker=str(marker))
    wait_for(marker.exists, timeout=15, message="first step started")

    token = uuid.uuid4().hex[:8]
    (tasks / "task_mqtt_fresh.py").write_text(
        "from flowd.task import Task\n\n\n"
        "class Stamp(Task):\n"
        "    def perform(self, *args, **kwargs):\n"
        f"        return args, {{**kwargs, 'stamp': '{token}'}}\n")
    catalog.save_task("stamp", "mqtt_fresh.Stamp", task_paths=[str(tasks)])
    catalog.save_routine("fresh", ["stamp"])
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: any(s.startswith("RELOADING=1") for s in notify_socket.lines())
             and notify_socket.count("READY=1") == 2, timeout=10, message="RELOADING=1 then READY=1")
    fresh = api.submit_flow("fresh", value=1)
    wait_for(lambda: api.get_flow(fresh.id).state == FlowState.DONE.value, timeout=20,
             message=f"the new routine ran; log:\n{proc.log_text()[-2000:]}")
    assert api.get_flow(fresh.id).result["kwargs"]["stamp"] == token
    wait_for(lambda: api.get_flow(running.id).state == FlowState.DONE.value, timeout=20,
             message="the running flow finished")
    assert api.get_flow(running.id).result["kwargs"] == {"napped": 3, "value": 2}
    assert marker.read_text().count("\n") == 1  # its step ran once, not restarted by the reload
    assert "reloading (SIGHUP)" in proc.log_text()
    assert proc.proc.poll() is None


def test_sighup_logs_what_changed_and_survives_a_broken_file(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, notify_socket: NotifySocket,
        tasks: Path) -> None:
    path = config_file(broker=broker)
    proc = flowd_proc(path, env={"NOTIFY_SOCKET": notify_socket.path})
    wait_for(lambda: "READY=1" in notify_socket.lines(), timeout=20, message="READY=1")
    path.write_text(path.read_text().replace("[flowd]\n", '[flowd]\nlog_level = "debug"\n')
                    .replace('"testnode"', '"renamed"'))
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: "at the next restart" in proc.log_text(), timeout=10, message="the changes logged")
    assert "reload: flowd.log_level changed from 'info' to 'debug'" in proc.log_text()
    restart_line = [line for line in proc.log_text().splitlines() if "take(s) effect at the next restart" in line]
    assert len(restart_line) == 1 and "flowd.node_id" in restart_line[0] and "log_level" not in restart_line[0]
    path.write_text("[flowd\nbroken")
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: "keeping the running configuration" in proc.log_text(), timeout=10, message="bad reload")
    wait_for(lambda: notify_socket.count("READY=1") == 3, timeout=5, message="READY=1 after the failed reload")
    assert proc.proc.poll() is None
    assert proc.terminate() == 0


def test_a_dead_worker_is_replaced_and_the_daemon_keeps_serving(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, notify_socket: NotifySocket,
        tasks: Path) -> None:
    # The workers are the daemon's children (no pool process): one that dies is replaced
    # within seconds, and the daemon goes on serving (no exit, no restart by systemd).
    proc = flowd_proc(config_file(broker=broker), env={"NOTIFY_SOCKET": notify_socket.path})
    wait_for(lambda: "READY=1" in notify_socket.lines(), timeout=20, message="READY=1")

    def children() -> list[int]:
        return [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]

    before = children()
    assert len(before) == 2, "the two workers are the daemon's children"
    os.kill(before[0], signal.SIGKILL)
    wait_for(lambda: len(children()) == 2 and before[0] not in children(), timeout=10, message="a new worker")
    assert proc.proc.poll() is None
    assert f"(pid {before[0]}) was killed by SIGKILL after" in proc.log_text()
    assert proc.terminate() == 0


def test_journal_stream_picks_exactly_one_log_destination(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, notify_socket: NotifySocket,
        tasks: Path) -> None:
    # Under systemd (JOURNAL_STREAM set) flowd logs to the journal when python-systemd is
    # there, and then not also to stderr (journald captures stderr: every line twice).
    # Without python-systemd the lines must still go to stderr, never into a handler
    # that drops them.
    import importlib.util

    has_journal = importlib.util.find_spec("systemd") is not None
    proc = flowd_proc(config_file(broker=broker), env={"NOTIFY_SOCKET": notify_socket.path,
                                                         "JOURNAL_STREAM": "8:12345"})
    wait_for(lambda: "READY=1" in notify_socket.lines(), timeout=20, message="READY=1")
    if has_journal:
        assert proc.terminate() == 0
        assert " ready: node 'testnode'" not in proc.log_text()
    else:
        wait_for(lambda: " ready: node 'testnode'" in proc.log_text(), timeout=5, message="ready line on stderr")


def test_second_daemon_on_the_same_state_dir_is_refused(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, notify_socket: NotifySocket,
        tasks: Path) -> None:
    path = config_file(broker=broker)
    first = flowd_proc(path, env={"NOTIFY_SOCKET": notify_socket.path})
    wait_for(lambda: "READY=1" in notify_socket.lines(), timeout=20, message="READY=1")
    second = flowd_proc(path)
    assert second.proc.wait(20) == 1
    assert f"another flowd (pid {first.pid}) is already running" in second.log_text()
    assert first.proc.poll() is None


def test_usage_and_config_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flowd", *args], capture_output=True, text=True,
                              env=flowd_env(), cwd=str(ROOT), timeout=30)

    bare = run()
    assert bare.returncode == 2 and "flowd run" in bare.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'eighty'\n")
    refused = run("run", "--config", str(bad))
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "mqtt.port" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = run("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert run("--version").stdout.startswith("flowd ")


# ---------------------------------------------------------------------- sd_notify alone
def test_pure_sd_notify_reaches_an_abstract_socket() -> None:
    name = f"@flowd-test-{uuid.uuid4().hex}"
    sock = NotifySocket(name)
    try:
        assert send_notify("READY=1", {"NOTIFY_SOCKET": name})
        wait_for(lambda: sock.lines() == ["READY=1"], timeout=5)
    finally:
        sock.close()


def test_notifier_is_a_no_op_outside_systemd_and_pings_only_when_asked(tmp_path: Path) -> None:
    outside = Notifier(env={})
    outside.ready()
    assert not outside.enabled and outside.watchdog_interval is None and not outside.watchdog_due()

    sock = NotifySocket(str(tmp_path / "n.sock"))
    try:
        no_watchdog = Notifier(env={"NOTIFY_SOCKET": sock.path})
        assert no_watchdog.watchdog_interval is None
        other_pid = Notifier(env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
        assert other_pid.watchdog_interval is None
        armed = Notifier(env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "4000000"})
        assert armed.watchdog_interval == 2.0
        assert armed.watchdog_due(now=100.0)
        armed.watchdog(now=100.0)
        assert not armed.watchdog_due(now=100.5) and armed.watchdog_due(now=101.0)
        armed.status("a")
        armed.status("a")
        armed.status("b")
        wait_for(lambda: sock.lines() == ["WATCHDOG=1", "STATUS=a", "STATUS=b"], timeout=5)
    finally:
        sock.close()


# ---------------------------------------------------------------------- logs alone
def test_stderr_logging_shows_the_journal_fields_and_level_from_config(
        capsys: pytest.CaptureFixture[str], restore_root_logger: None) -> None:
    import logging

    from flowd.config import build_config
    from flowd.service.logs import setup_logging

    config = build_config({"flowd": {"log_level": "warning"}}, env={})
    assert setup_logging(config, env={"JOURNAL_STREAM": ""}) == "stderr"
    assert setup_logging(config, env={}) == "stderr"  # again: replaces, never doubles
    log = logging.getLogger("flowd.test")
    log.info("not shown at warning")
    log.warning("flow %d step failed", 12, extra={"FLOW_ID": 12, "ROUTINE": "r", "TASK": "t"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("flowd.test: flow 12 step failed [flow=12 routine=r task=t]")


def test_journal_stream_with_python_systemd_uses_the_journal(restore_root_logger: None) -> None:
    pytest.importorskip("systemd.journal")
    from flowd.config import build_config
    from flowd.service.logs import setup_logging

    assert setup_logging(build_config({}, env={}), env={"JOURNAL_STREAM": "8:1"}) == "journal"
