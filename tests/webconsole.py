"""Helpers for the web console tests: a real daemon serving its console, a small HTTP
client that keeps its cookie, and Debian's chromium driven headless through selenium."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from conftest import ROOT, flowd_env, wait_for
from prometheus_client.parser import text_string_to_metric_families

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# The routines the console tests use: a slow one, one that fails until a marker file
# exists, and one whose task has a secret option and passes it on.
APPLY = """
[tasks.slow]
script = "web.Slow"
options = {{ seconds = 1.5 }}

[tasks.quick]
script = "web.Slow"
options = {{ seconds = 0 }}

[tasks.needs-marker]
script = "web.NeedsMarker"
options = {{ marker = "{marker}" }}

[tasks.pass-on]
script = "web.PassOn"
options = {{ api_token = "{secret}" }}

[routines.slow]
tasks = ["quick", "slow", "quick"]

[routines.fragile]
tasks = ["quick", "needs-marker"]

[routines.leaky]
tasks = ["pass-on", "quick"]

[tasks.spawn-door]
script = "w.Spawn"
options = {{ child = "door" }}

[tasks.await-door]
script = "w.Await"
options = {{ topic = "sensors/door", match = {{ open = true }}, wait_timeout = 120 }}

[routines.door]
tasks = ["await-door", "quick"]

[routines.watch-door]
tasks = ["spawn-door", "quick"]
"""
SECRET = "opt-secret-7f3a9c"


@dataclass
class Http:
    """One HTTP client with its own cookie jar (a session), talking to 127.0.0.1 only."""

    port: int
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        body = urlencode(form).encode() if form is not None else None
        sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        out_headers = {k.lower(): v for k, v in response.getheaders()}
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                cookie, _, _ = value.partition(";")
                key, _, val = cookie.partition("=")
                if val in ("", '""'):
                    self.cookies.pop(key.strip(), None)
                else:
                    self.cookies[key.strip()] = val.strip()
        return response.status, out_headers, text

    def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, form: dict[str, str], **kwargs: Any) -> tuple[int, dict[str, str], str]:
        return self.request("POST", path, form=form, **kwargs)

    def csrf(self, path: str = "/routines") -> str:
        """The CSRF token of this session, read from a page's form."""
        status, _, text = self.get(path)
        assert status == 200, (status, text[:300])
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        assert found, "no CSRF field on " + path
        return found.group(1)


@dataclass
class ConsoleDaemon:
    """A running ``flowd run`` with its console on ``port``."""

    proc: Any
    config: Path
    port: int
    marker: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Http:
        return Http(self.port)

    def flowctl(self, *args: str) -> Any:
        result = subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(self.config), "--json", *args],
                                capture_output=True, text=True, env=flowd_env(), timeout=60, cwd=str(ROOT))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if result.stdout.strip() else None

    def flow(self, flow_id: int) -> dict[str, Any]:
        data: dict[str, Any] = self.flowctl("flow", "show", str(flow_id))
        return data

    def wait_state(self, flow_id: int, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(lambda: (f := self.flow(flow_id))["state"] in states and f,
                                         timeout=timeout, interval=0.2, message=f"flow {flow_id} in {states}")
        return found


def start_console_daemon(tmp_path: Path, broker: Any, config_file: Callable[..., Path],
                         flowd_proc: Callable[..., Any], web: dict[str, Any] | None = None) -> ConsoleDaemon:
    """Apply the test routines, start ``flowd run`` and wait until its console answers."""
    from conftest import free_port

    port = free_port()
    marker = tmp_path / "marker"
    config = config_file(broker=broker, web={"listen": f"127.0.0.1:{port}", **(web or {})})
    apply = tmp_path / "routines.toml"
    apply.write_text(APPLY.format(marker=marker, secret=SECRET))
    subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--config", str(config), "apply", str(apply)],
                   check=True, capture_output=True, env=flowd_env(), timeout=60, cwd=str(ROOT))
    proc = flowd_proc(config)
    daemon = ConsoleDaemon(proc, config, port, marker)

    def answers() -> bool:
        try:
            status, _, _ = Http(port).get("/healthz")
        except OSError:
            return False
        return status in (200, 401)

    wait_for(answers, timeout=30, interval=0.1, message="the console answers")
    return daemon


def make_driver(javascript: bool = True) -> Any:
    """Debian's chromium, headless, driven by selenium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        options.add_argument(arg)
    if not javascript:
        options.add_argument("--blink-settings=scriptEnabled=false")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for a test module."""
    driver = make_driver()
    yield driver
    driver.quit()


def wait_browser(condition: Callable[[], Any], timeout: float = 30, message: str = "condition") -> Any:
    """Poll a page condition; a stale element (the live trace swapped in) counts as not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def check() -> Any:
        try:
            return condition()
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    return wait_for(check, timeout=timeout, interval=0.1, message=message)


def time_get(client: Http, path: str, runs: int = 5) -> float:
    """The median time in seconds of ``runs`` GETs of ``path`` (each must answer 200)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        status, _, _ = client.get(path)
        times.append(time.perf_counter() - start)
        assert status == 200, path
    return sorted(times)[len(times) // 2]


def scrape(client: Http) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by the Prometheus client's own parser."""
    status, headers, text = client.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
