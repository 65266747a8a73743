#!/usr/bin/env python3
"""Render the README's console screenshots with Debian's chromium, headless.

Starts a private mosquitto on a free 127.0.0.1 port and ``flowd run`` on a fresh state
folder with the example scripts of ``tasks/``, runs a few flows (one fails), and writes
``docs/img/console-overview.png`` and ``docs/img/console-flow.png``. Every child is
started here and stopped by PID.

    .venv/bin/python scripts/screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ROUTINES = """
[tasks.read-sensor]
script = "example.Step"
options = { key = "raw", source = "seed" }

[tasks.calibrate]
script = "example.Step"
options = { key = "celsius", source = "raw" }

[tasks.settle]
script = "example.VeryLong"
options = { seconds = 0.4 }
timeout = "1m"

[tasks.log-reading]
script = "example.Echo"

[routines.greenhouse]
tasks = ["read-sensor", "calibrate", "settle", "log-reading"]

[routines.nightly-report]
tasks = ["settle", "log-reading"]
schedule = "30 2 * * *"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: {what} did not happen within {timeout:.0f}s")
        time.sleep(0.1)


def flowctl(config: Path, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config), "--json", *args],
                          capture_output=True, text=True, check=True, cwd=ROOT, timeout=60)
    return json.loads(done.stdout) if done.stdout.strip() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="flowd-shots-"))
    port, web_port = free_port(), free_port()
    procs: list[subprocess.Popen[Any]] = []
    driver = None
    try:
        (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                             "log_dest none\n")
        procs.append(subprocess.Popen([MOSQUITTO, "-c", str(work / "mosquitto.conf")]))
        config = work / "flowd.toml"
        config.write_text(f'[flowd]\nstate_dir = "{work / "state"}"\ntask_paths = ["{ROOT / "tasks"}"]\n'
                          f'workers = 2\nnode_id = "greenhouse-pi"\n\n[mqtt]\nport = {port}\n\n'
                          f'[web]\nlisten = "127.0.0.1:{web_port}"\n')
        (work / "routines.toml").write_text(ROUTINES)
        flowctl(config, "apply", str(work / "routines.toml"))
        log = open(work / "flowd.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        procs.append(subprocess.Popen([sys.executable, "-m", "flowd", "run", "--config", str(config)], cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
        wait_until("flowd ready", lambda: b" ready: " in (work / "flowd.log").read_bytes(), 30)
        ids = [flowctl(config, "submit", "greenhouse", "--kw", f"seed={300 + n}")["id"] for n in range(5)]
        ids.append(flowctl(config, "submit", "greenhouse", "--kw", "seconds=soon")["id"])
        ids.append(flowctl(config, "submit", "nightly-report")["id"])
        for flow_id in ids:
            wait_until(f"flow {flow_id} ends",
                       lambda f=flow_id: flowctl(config, "flow", "show", str(f))["state"] in ("DONE", "FAILED"), 30)
        base = f"http://127.0.0.1:{web_port}"
        wait_until("the console", lambda: urllib.request.urlopen(base + "/healthz", timeout=2).status == 200, 10)

        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", "--force-device-scale-factor=1", "--disable-background-networking"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        for name, path, height in (("console-overview.png", "/", 820), ("console-flow.png", f"/flows/{ids[5]}", 1250)):
            driver.set_window_size(1200, height)
            driver.get(base + path)
            time.sleep(0.3)
            driver.save_screenshot(str(out / name))
            print(out / name)
    finally:
        if driver is not None:
            driver.quit()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
