"""The example task scripts in tasks/, unit-tested with flowd.testing, as a user tests
their own scripts (README, "Testing your tasks"): in this process, no daemon, no
database, no broker.
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

from flowd.errors import InputError
from flowd.testing import run_routine, run_task

TASKS = [str(ROOT / "tasks")]


def test_greenhouse_reading_applies_the_offset() -> None:
    run = run_task("greenhouse.Reading", kwargs={"raw": 312}, options={"offset": -0.5}, task_paths=TASKS)
    assert run.ok, run.error
    assert run.result == {"args": [], "kwargs": {"celsius": 30.7}}
    assert run.published == []


def test_greenhouse_alarm_publishes_over_its_limit_only() -> None:
    sys.path.insert(0, TASKS[0])
    try:
        from task_greenhouse import Alarm  # the class itself works as well as its reference
    finally:
        sys.path.remove(TASKS[0])
    hot = run_task(Alarm, kwargs={"celsius": 31.0}, options={"limit": 28})
    assert [(m.topic, m.payload, m.qos, m.retain) for m in hot.published] == [
        ("greenhouse/alarm", {"celsius": 31.0}, 1, False)]
    assert hot.result == {"args": [], "kwargs": {"celsius": 31.0}}  # None: its input (not the options) goes on
    cool = run_task(Alarm, kwargs={"celsius": 20.0}, options={"limit": 28})
    assert cool.ok and cool.published == []


def test_the_readme_routine_end_to_end() -> None:
    run = run_routine(["reading", "alarm"], kwargs={"raw": 312}, task_paths=TASKS, tasks={
        "reading": {"script": "greenhouse.Reading", "options": {"offset": -0.5}},
        "alarm": {"script": "greenhouse.Alarm", "options": {"limit": 28}, "retries": 2}})
    assert run.ok, run.error
    assert [m.topic for m in run.published] == ["greenhouse/alarm"]
    assert run.outputs == [{"args": [], "kwargs": {"celsius": 30.7}}] * 2


def test_a_failing_task_is_a_failed_run_with_its_error_and_retries() -> None:
    run = run_task("greenhouse.Reading", kwargs={"raw": "warm"}, retries=2, task_paths=TASKS)
    assert run.state == "FAILED"
    assert len(run.attempts) == 3  # retries happen, without waiting their delay
    assert [a.retry_in for a in run.attempts] == [1.0, 2.0, None]
    assert run.error == ("step 1/1 (Reading) failed: TypeError: unsupported operand type(s) for /: 'str' and 'int'")
    assert "task_greenhouse.py" in (run.attempts[-1].error or "")  # the traceback points at the script


def test_example_step_echo_and_verylong() -> None:
    steps = run_routine(["one", "two", "echo"], args=["a"], task_paths=TASKS, tasks={
        "one": {"script": "example.Step", "options": {"key": "a"}},
        "two": {"script": "example.Step", "options": {"key": "b", "source": "a"}},
        "echo": {"script": "example.Echo"}})
    assert steps.result == {"args": ["a"], "kwargs": {"a": 1, "b": 2}}
    slept = run_task("example.VeryLong", kwargs={"seconds": 0}, task_paths=TASKS)
    assert slept.result == {"args": [], "kwargs": {"slept": 0}}
    assert slept.attempts[0].logs == [("INFO", "sleeping 0s")]  # self.log lines are kept, whatever the level
    too_long = run_task("example.VeryLong", kwargs={"seconds": 5}, timeout=0.2, task_paths=TASKS)
    assert too_long.state == "FAILED" and "timed out after 0.2s" in (too_long.error or "")


def test_mqtt_publish_is_recorded_not_sent() -> None:
    run = run_task("mqtt.Publish", kwargs={"topic": "sensors/x", "value": 3}, task_paths=TASKS)
    assert [(m.topic, m.payload) for m in run.published] == [
        ("sensors/x", {"args": [], "kwargs": {"value": 3}})]
    bad = run_task("mqtt.Publish", kwargs={"topic": "sensors/#"}, task_paths=TASKS)
    assert bad.state == "FAILED" and "cannot publish to 'sensors/#'" in (bad.error or "")


def test_file_append_line(tmp_path: Path) -> None:
    path = tmp_path / "readings.jsonl"
    run = run_task("file.AppendLine", kwargs={"path": str(path), "celsius": 21.5}, options={"keys": ["celsius"]},
                   task_paths=TASKS)
    assert run.ok, run.error
    line = json.loads(path.read_text())
    assert line["celsius"] == 21.5 and line["flow"] == 0  # a foreground run has no flow id


@pytest.fixture
def sensor() -> Iterator[str]:
    """A local HTTP sensor on 127.0.0.1 answering JSON."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"temperature": 21.5, "humidity": 40, "noise": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/data"
    server.shutdown()
    server.server_close()


def test_http_fetch_digest(sensor: str) -> None:
    run = run_task("http.FetchDigest", options={"url": sensor, "fields": ["temperature", "humidity"]},
                   task_paths=TASKS)
    assert run.ok, run.error
    kwargs = run.result["kwargs"] if run.result else {}
    assert kwargs["status"] == 200 and kwargs["data"] == {"temperature": 21.5, "humidity": 40}
    assert len(kwargs["sha256"]) == 64


def test_the_apply_file_routine_and_bad_definitions(tmp_path: Path) -> None:
    spec = tmp_path / "gh.toml"
    spec.write_text('[tasks.r]\nscript = "greenhouse.Reading"\noptions = { offset = 1 }\n'
                    '[routines.gh]\ntasks = ["r"]\n')
    assert run_routine("gh", kwargs={"raw": 100}, apply_file=str(spec), task_paths=TASKS).result == {
        "args": [], "kwargs": {"celsius": 11.0}}
    with pytest.raises(InputError, match="no Task class Nope"):
        run_routine(["x"], tasks={"x": {"script": "greenhouse.Nope"}}, task_paths=TASKS)
    with pytest.raises(InputError, match="not JSON-serialisable"):
        run_task("greenhouse.Reading", kwargs={"raw": object()}, task_paths=TASKS)


def test_a_routine_timeout_bounds_the_whole_run() -> None:
    # A 0.3 s routine timeout: the slow first step is stopped when the routine's time is
    # up, and the run fails saying so, as the daemon's flow would.
    run = run_routine("slow", task_paths=TASKS, tasks={
        "nap": {"script": "example.VeryLong", "options": {"seconds": 2}, "retries": 3},
        "echo": {"script": "example.Echo"}}, routines={"slow": {"tasks": ["nap", "echo"], "timeout": 0.3}})
    assert run.state == "FAILED"
    assert run.error == "flow timed out: routine 'slow' allows 0.3s for the whole flow"
    assert len(run.attempts) == 1 and (run.attempts[0].error or "").startswith("timed out after 0.")
