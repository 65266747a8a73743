"""flowd against a broker that wants TLS and a password (throwaway CA made with openssl).

Right credentials: it connects and serves. Wrong password or an untrusted
certificate: it keeps running, retries with backoff, and says why in one log line
(not one per retry); the password never appears in the log.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, free_port, wait_for

from flowd import catalog
from flowd.store.models import Flow

PASSWORD = "s3cret-Pa55"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path
    passwd: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder)
    return folder / f"{name}.crt", folder / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca, ca_key = _make_ca(folder, "flowd-test-ca")
    other_ca, _ = _make_ca(folder, "some-other-ca")
    (folder / "san.cnf").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", ca.name, "-CAkey", ca_key.name, "-CAcreateserial",
             "-days", "2", "-extfile", "san.cnf", "-out", "server.crt", cwd=folder)
    passwd = folder / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "flowd", PASSWORD], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "watcher", "watch"], check=True, capture_output=True,
                   timeout=30)
    for path in folder.iterdir():
        path.chmod(0o644)
    folder.chmod(0o755)
    return Pki(ca=ca, other_ca=other_ca, cert=folder / "server.crt", key=folder / "server.key", passwd=passwd)


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    port = free_port()
    broker = Broker(tmp_path / "tls-broker", port=port, extra_conf=f"""
        listener {port} 127.0.0.1
        cafile {pki.ca}
        certfile {pki.cert}
        keyfile {pki.key}
        allow_anonymous false
        password_file {pki.passwd}
        """)  # conftest's broker runs as root, so it can read the files in tmp_path
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def routines(db: Any, task_dir: Path) -> None:
    catalog.save_task("double", "mqtt_steps.Double", task_paths=[str(task_dir)])
    catalog.save_routine("twice", ["double", "double"])


def tls_config(config_file: Callable[..., Path], broker: Broker, tls: dict[str, str], **mqtt: Any) -> Path:
    """A flowd.toml with an [mqtt.tls] table (the fixture writes flat sections only)."""
    path = config_file(broker=broker, mqtt=mqtt)
    lines = "".join(f'{key} = "{value}"\n' for key, value in tls.items())
    path.write_text(path.read_text() + f"\n[mqtt.tls]\n{lines}")
    return path


def broker_log_count(broker: Broker, text: str) -> int:
    return broker.log.read_text(errors="replace").count(text) if broker.log.exists() else 0


def test_connects_with_the_right_certificate_and_password(
        tls_broker: Broker, pki: Pki, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        routines: None, tmp_path: Path) -> None:
    # The password comes from mqtt.password_file; the broker's certificate is checked
    # against our CA. Over that link a submit runs and its result comes back.
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")
    watcher = session_client(["flow/#", "flowd/#"], target=tls_broker, tls={"ca_certs": str(pki.ca)},
                             username="watcher", password="watch")
    proc = flowd_proc(tls_config(config_file, tls_broker, {"ca": str(pki.ca)}, username="flowd",
                                      password_file=str(secret)))
    wait_for(lambda: watcher.json_on("flowd/testnode/status"), timeout=20,
             message=f"online over TLS; log:\n{proc.log_text()}")
    watcher.publish("flow/submit", {"routine": "no-such"})
    assert "no-such" in wait_for(lambda: watcher.json_on("flow/error"), timeout=10)[0]["error"]
    watcher.publish("flow/submit", {"routine": "twice", "kwargs": {"value": 5}})
    result = wait_for(lambda: watcher.json_on("flow/+/result"), timeout=20, message="result over TLS")
    assert result[0]["result"]["kwargs"] == {"value": 20}
    assert "TLS, user 'flowd'" in proc.log_text()
    assert PASSWORD not in proc.log_text()
    assert Flow.select().count() == 1


def test_wrong_password_keeps_running_retries_and_says_why_once(
        tls_broker: Broker, pki: Pki, config_file: Callable[..., Path], flowd_proc: Any, routines: None) -> None:
    proc = flowd_proc(tls_config(config_file, tls_broker, {"ca": str(pki.ca)}, username="flowd",
                                      password="wrong-one"))
    wait_for(lambda: broker_log_count(tls_broker, "not authorised") >= 3, timeout=30, message="three attempts")
    reasons = [line for line in proc.log_text().splitlines() if "refused the connection" in line]
    assert len(reasons) == 1, reasons
    assert "ERROR" in reasons[0] and ("password" in reasons[0].lower() or "authori" in reasons[0].lower())
    assert "wrong-one" not in proc.log_text()
    assert proc.proc.poll() is None
    # Flows still run without the broker (flowctl / the API path).
    from flowd import api

    flow = api.submit_flow("twice", value=1)
    wait_for(lambda: api.get_flow(flow.id).state == "DONE", timeout=20, message="flow runs without the broker")


def test_untrusted_certificate_keeps_running_and_says_why_once(
        tls_broker: Broker, pki: Pki, config_file: Callable[..., Path], flowd_proc: Any, routines: None) -> None:
    proc = flowd_proc(tls_config(config_file, tls_broker, {"ca": str(pki.other_ca)}, username="flowd",
                                      password=PASSWORD))
    wait_for(lambda: broker_log_count(tls_broker, "unknown ca") >= 3, timeout=30, message="three attempts")
    reasons = [line for line in proc.log_text().splitlines() if "flowd.mqtt.bridge: MQTT: TLS" in line]
    assert len(reasons) == 1, proc.log_text()
    assert "ERROR" in reasons[0] and "certificate" in reasons[0] and "not accepted" in reasons[0]
    assert proc.proc.poll() is None


def test_missing_tls_file_is_a_config_error(tmp_path: Path, config_file: Callable[..., Path], flowd_proc: Any,
                                            broker: Broker) -> None:
    proc = flowd_proc(tls_config(config_file, broker, {"ca": str(tmp_path / "missing-ca.crt")}))
    assert proc.proc.wait(30) == 2
    assert "mqtt.tls" in proc.log_text() and "Traceback" not in proc.log_text()
