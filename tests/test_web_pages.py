"""What the console's pages say about flows that wait, and how they read with JavaScript
off (SPEC 11), against a real ``flowd run``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from conftest import wait_for
from selenium.webdriver.common.by import By
from webconsole import make_driver, start_console_daemon, wait_browser


def test_a_waiting_flow_shows_what_it_waits_for_and_links_parent_and_child(
        tmp_path: Path, broker: Any, config_file: Any, flowd_proc: Any, mqtt_client: Any) -> None:
    # "watch-door" starts "door" as a sub-flow, which waits for {"open": true} on sensors/door.
    # The parent's page links its child and says it waits for it; the child's page links its
    # parent and names the topic and the match. The event ends both; the pages say DONE.
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc)
    client = daemon.client()
    status, headers, _ = client.post("/routines/watch-door/run", {"csrf": client.csrf(), "input": ""})
    assert status == 303
    parent = int(headers["location"].rsplit("/", 1)[1])
    daemon.wait_state(parent, ("WAITING",))
    child = wait_for(lambda: daemon.flow(parent)["children"], timeout=20, message="the sub-flow")[0]["id"]
    daemon.wait_state(child, ("WAITING",))
    _, _, page = client.get(f"/flows/{parent}")
    assert f'href="/flows/{child}"' in page and "its sub-flow to end" in page
    assert '<noscript><meta http-equiv="refresh" content="2"></noscript>' in page
    _, _, page = client.get(f"/flows/{child}")
    text = html.unescape(page)
    assert f'href="/flows/{parent}"' in page and "a message on <code>sensors/door</code>" in text
    assert 'matching <code>{"open": true}</code>' in text
    events = mqtt_client()

    def door_opens() -> bool:
        # flowd subscribes to the topic shortly after the flow waits: repeat until it is heard.
        events.publish("sensors/door", {"open": True, "door": "north"})
        return bool(daemon.flow(parent)["state"] == "DONE")

    wait_for(door_opens, timeout=30, interval=0.5, message="the parent flow DONE")
    _, _, page = client.get(f"/flows/{child}")
    assert '<span class="state done" id="flow-state">DONE</span>' in page and "noscript" not in page
    assert "&quot;door&quot;: &quot;north&quot;" in page  # the event, as the next step's input


def test_with_javascript_off_pages_read_and_a_running_flow_reloads_itself(
        tmp_path: Path, broker: Any, config_file: Any, flowd_proc: Any) -> None:
    # Chromium with scripts disabled: the routines form still runs a flow (a plain POST and
    # redirect), and the flow page refreshes itself until the flow is DONE.
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc)
    driver = make_driver(javascript=False)
    try:
        driver.get(daemon.url + "/routines")
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("data-js") is None  # console.js did not run
        driver.find_element(By.ID, "run-slow").click()
        wait_browser(lambda: "/flows/" in driver.current_url, message="the flow page")
        assert wait_browser(lambda: driver.find_element(By.ID, "flow-state").text) in ("INIT", "RUNNING", "DONE")
        wait_browser(lambda: driver.find_element(By.ID, "flow-state").text == "DONE", timeout=30,
                     message="DONE after reloads")
        driver.get(daemon.url + "/flows?state=DONE")
        assert len(driver.find_elements(By.CSS_SELECTOR, "table.flows tbody tr")) == 1
    finally:
        driver.quit()


def test_console_stops_with_the_daemon_and_a_busy_port_leaves_flows_running(
        tmp_path: Path, broker: Any, config_file: Any, flowd_proc: Any) -> None:
    # SIGTERM: flowd exits 0 and the console's port is closed. Started again with its port
    # held by someone else: one ERROR line naming [web] listen, and flows still run.
    import socket
    import subprocess
    import sys

    from conftest import ROOT, flowd_env

    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc)
    assert daemon.proc.terminate() == 0
    assert "flowd stopped" in daemon.proc.log_text()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", daemon.port)) != 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", daemon.port))
        holder.listen()
        again = flowd_proc(daemon.config)
        wait_for(lambda: " ready: " in again.log_text(), timeout=30, message="flowd ready")
        log = again.log_text()
        assert "key 'web.listen'" in log and "cannot listen on 127.0.0.1:" in log and "without the console" in log
        done = subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(daemon.config), "submit", "leaky",
                               "--wait", "--timeout", "30"], capture_output=True, text=True, env=flowd_env(),
                              timeout=60, cwd=str(ROOT))
        assert done.returncode == 0, done.stderr
