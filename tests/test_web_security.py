"""What the console refuses (SPEC 11), against a real ``flowd run``: a POST without its
CSRF token changes nothing; a console other machines could reach needs a password, or
flowd does not start; with a password every page needs a login and a failed login slows
the next; no task option value and no address elsewhere appears in any page."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, flowd_env, wait_for
from webconsole import SECRET, Http, start_console_daemon

PASSWORD = "correct horse battery"


def run_flowd(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowd", "run", "--config", str(config)], capture_output=True,
                          text=True, env=flowd_env(), timeout=timeout, cwd=str(ROOT))


def test_post_without_csrf_token_is_refused_and_changes_nothing(tmp_path: Path, broker: Any, config_file: Any,
                                                                 flowd_proc: Any) -> None:
    # Each action posted without a token, with a wrong one, and with another session's token:
    # 403 every time, and no flow started, cancelled or retried, no routine disabled.
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc)
    client, other = daemon.client(), daemon.client()
    token, other_token = client.csrf(), other.csrf()
    assert token != other_token
    status, headers, _ = client.post("/routines/slow/run", {"csrf": token, "input": '{"kwargs": {"seconds": 30}}'})
    assert status == 303
    running = int(headers["location"].rsplit("/", 1)[1])
    daemon.wait_state(running, ("RUNNING",))
    status, headers, _ = client.post("/routines/fragile/run", {"csrf": token})
    failed = int(headers["location"].rsplit("/", 1)[1])
    daemon.wait_state(failed, ("FAILED",))
    before = daemon.flowctl("flows")
    actions = [("/routines/slow/run", {"input": "{}"}), ("/routines/slow/disable", {}),
               (f"/flows/{running}/cancel", {}), (f"/flows/{failed}/retry", {}), ("/logout", {})]
    for path, form in actions:
        for bad in ({}, {"csrf": "forged"}, {"csrf": other_token}):
            status, _, text = client.post(path, {**form, **bad})
            assert status == 403, (path, bad, status)
            assert "CSRF token" in text
        status, _, _ = Http(daemon.port).post(path, {**form, "csrf": token})  # no session cookie at all
        assert status == 403
    assert daemon.flowctl("flows") == before
    assert daemon.flow(running)["state"] == "RUNNING" and daemon.flow(failed)["state"] == "FAILED"
    assert daemon.flowctl("routine", "show", "slow")["enabled"] is True
    # The harness can see a change: the same cancel with the token works.
    assert client.post(f"/flows/{running}/cancel", {"csrf": token})[0] == 303
    daemon.wait_state(running, ("CANCELLED",))


def test_no_task_option_value_and_no_external_address_in_any_page(tmp_path: Path, broker: Any, config_file: Any,
                                                                  flowd_proc: Any) -> None:
    # "leaky" runs a task that passes its secret option on into its output, the next step's
    # input and the flow's result. flowctl shows it (the harness sees it); no console page does.
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc)
    client = daemon.client()
    token = client.csrf()
    status, headers, _ = client.post("/routines/leaky/run", {"csrf": token, "input": '{"kwargs": {"x": 1}}'})
    leaky = int(headers["location"].rsplit("/", 1)[1])
    assert daemon.wait_state(leaky, ("DONE",))["result"]["kwargs"]["api_token"] == SECRET
    client.post("/routines/fragile/run", {"csrf": token})
    daemon.wait_state(leaky + 1, ("FAILED",))
    pages = ["/", "/routines", "/flows", "/flows?state=DONE", "/flows?routine=leaky", f"/flows/{leaky}",
             f"/flows/{leaky}/live", f"/flows/{leaky + 1}", "/metrics", "/healthz", "/flows/999999", "/nowhere",
             "/static/console.css", "/static/console.js", "/static/favicon.svg"]
    for path in pages:
        status, headers, text = client.get(path)
        assert status in (200, 404), (path, status)
        assert SECRET not in text, path
        plain = re.sub(r"^#.*$", "", re.sub(r'xmlns="[^"]*"', "", text), flags=re.M)  # namespaces, metric help
        assert not re.search(r"(?i)\b(?:https?|wss?|ftp):|//[a-z0-9]", plain), path
        for ref in re.findall(r'(?:src|href|action)="([^"]*)"', text):
            assert ref.startswith(("/", "#")) and not ref.startswith("//"), (path, ref)
        if path.startswith("/flows/") or path in ("/", "/routines", "/flows"):
            assert "default-src 'none'" in headers["content-security-policy"]
    status, _, text = client.get(f"/flows/{leaky}")
    assert text.count("•••") == 4 and "&quot;x&quot;: 1" in text  # 2 outputs, 1 input, the result


def test_listening_beyond_loopback_needs_a_password_file(tmp_path: Path, config_file: Any) -> None:
    # flowd refuses to start, naming the key, before it opens or binds anything.
    for listen in ("0.0.0.0:8470", "192.0.2.7:8470", "[::]:8470", "flowd.local:8470"):
        result = run_flowd(config_file(web={"listen": listen}))
        assert result.returncode == 2, (listen, result.stderr)
        assert "key 'web.password_file'" in result.stderr and listen in result.stderr
        assert "Traceback" not in result.stderr
    # A password file anyone may read is refused the same way, as is a missing one.
    loose = tmp_path / "loose-password"
    loose.write_text(PASSWORD)
    loose.chmod(0o644)
    result = run_flowd(config_file(web={"listen": "127.0.0.1:8470", "password_file": str(loose)}))
    assert result.returncode == 2 and "web.password_file" in result.stderr and "chmod 600" in result.stderr
    result = run_flowd(config_file(web={"password_file": str(tmp_path / "missing")}))
    assert result.returncode == 2 and "the password file does not exist" in result.stderr


def login_page_token(client: Http) -> str:
    status, _, text = client.get("/login")
    assert status == 200
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found
    return found.group(1)


def test_with_a_password_every_page_needs_a_login(tmp_path: Path, broker: Any, config_file: Any,
                                                  flowd_proc: Any) -> None:
    # Pages redirect to /login; /metrics and /healthz answer 401 unless given the password
    # (HTTP basic) or open_metrics; a wrong password makes the next try wait, even a right one.
    secret_file = tmp_path / "console-password"
    secret_file.write_text(PASSWORD + "\n")
    secret_file.chmod(0o600)
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc, web={"password_file": str(secret_file)})
    client = daemon.client()
    for path in ("/", "/routines", "/flows", "/flows/1", "/flows/1/live"):
        status, headers, text = client.get(path)
        assert status == 303 and headers["location"].startswith("/login?next="), path
        assert "Overview" not in text
    for path in ("/metrics", "/healthz"):
        assert client.get(path)[0] == 401
    token = login_page_token(client)
    assert client.post("/routines/slow/run", {"csrf": token, "input": "{}"})[0] == 303  # to /login: nothing ran
    assert daemon.flowctl("flows") == []

    status, _, text = client.post("/login", {"csrf": token, "password": "wrong", "next": "/flows"})
    assert status == 401 and "wrong password" in text
    status, headers, text = client.post("/login", {"csrf": token, "password": PASSWORD, "next": "/flows"})
    assert status == 429 and "try again in" in text and int(headers["retry-after"]) >= 1
    wait_for(lambda: client.post("/login", {"csrf": token, "password": PASSWORD, "next": "/flows"})[0] == 303,
             timeout=5, interval=0.3, message="login after the wait")
    assert client.get("/flows")[0] == 200
    assert client.get("/metrics")[0] == 200

    basic = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
    assert Http(daemon.port).get("/metrics", headers={"Authorization": f"Basic {basic}"})[0] == 200
    assert Http(daemon.port).get("/", headers={"Authorization": f"Basic {basic}"})[0] == 303  # pages: a session
    # A session after logout is refused again.
    status, _, text = client.get("/routines")
    token = re.search(r'name="csrf" value="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    assert client.post("/logout", {"csrf": token})[0] == 303
    assert client.get("/routines")[0] == 303


def test_session_cookie_and_host_checks(tmp_path: Path, broker: Any, config_file: Any, flowd_proc: Any) -> None:
    # The cookie is HttpOnly and SameSite=Strict; a loopback-only console answers only to
    # loopback host names (a page elsewhere rebinding its own name to 127.0.0.1 gets nothing).
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc, web={"open_metrics": True})
    status, headers, _ = Http(daemon.port).get("/")
    assert status == 200
    cookie = headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    for host in (f"localhost:{daemon.port}", f"[::1]:{daemon.port}", "127.0.0.1:9999"):
        assert Http(daemon.port).get("/", headers={"Host": host})[0] == 200, host
    for host in (f"evil.example:{daemon.port}", "10.0.0.5", f"flowd.local:{daemon.port}"):
        status, _, text = Http(daemon.port).get("/", headers={"Host": host})
        assert status == 403 and "loopback" in text, host


@pytest.mark.parametrize("text, error", [
    ("[1, 2]", "must be a JSON object"),
    ('{"raw": 312}', "unknown key 'raw'"),
    ('{"args": {}}', '"args" must be a list'),
    ('{"kwargs": []}', '"kwargs" must be an object'),
    ('{"kwargs": {"x": NaN}}', "NaN, which is not JSON"),
    ("{", "the input is not JSON"),
])
def test_run_input_is_checked(text: str, error: str) -> None:
    from flowd.errors import InputError
    from flowd.web.app import parse_run_input

    with pytest.raises(InputError, match=re.escape(error)):
        parse_run_input(text)
    assert parse_run_input(' {"args": [1], "kwargs": {"a": "b"}} ') == ([1], {"a": "b"})
    assert parse_run_input("") == ([], {})


def test_sessions_throttle_and_password_hash() -> None:
    from flowd.web.auth import LoginThrottle, PasswordHash, Sessions

    hashed = PasswordHash(PASSWORD)
    assert hashed.matches(PASSWORD) and not hashed.matches(PASSWORD + " ") and not hashed.matches("")
    assert PASSWORD.encode() not in repr(vars(hashed)).encode()
    throttle = LoginThrottle(first_s=1, max_s=8)
    assert throttle.wait_left(now=0) == 0
    assert [throttle.failed(now=0) for _ in range(5)] == [1, 2, 4, 8, 8]
    assert throttle.wait_left(now=3) == 5
    throttle.succeeded()
    assert throttle.wait_left(now=3) == 0
    sessions = Sessions(idle_s=10, cap=3)
    user = sessions.new(authenticated=True)
    for _ in range(5):  # anonymous visitors never push out a logged-in session
        sessions.new(authenticated=False)
    assert sessions.get(user.id) is user and user.has_token(user.csrf) and not user.has_token(None)
    assert sessions.get(user.id, now=user.last_seen + 11) is None  # idle too long
