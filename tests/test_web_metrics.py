"""``/metrics`` and ``/healthz`` (SPEC 11), and the console's speed with 10,000 flows stored."""

from __future__ import annotations

import json
import uuid
import wsgiref.util
from pathlib import Path
from typing import Any

from conftest import wait_for
from webconsole import scrape, start_console_daemon, time_get, value


def test_metrics_count_what_ran(tmp_path: Path, broker: Any, config_file: Any, flowd_proc: Any) -> None:
    # Three "leaky" flows end DONE, two "fragile" ones FAILED; then one fragile flow is
    # retried and ends DONE. The counters say exactly that, the histogram has one
    # observation per attempt, the gauges read the node.
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc, web={"open_metrics": True})
    client = daemon.client()
    first = scrape(client)
    assert value(first, "flowd_broker_connected") == 1.0
    assert not [k for k in first if k[0].startswith("flowd_flows_")]
    token = client.csrf()
    ids = []
    for routine in ("leaky", "leaky", "fragile", "leaky", "fragile"):
        status, headers, _ = client.post(f"/routines/{routine}/run", {"csrf": token, "input": ""})
        assert status == 303
        ids.append(int(headers["location"].rsplit("/", 1)[1]))
    for flow_id in ids:
        daemon.wait_state(flow_id, ("DONE", "FAILED"))
    samples = scrape(client)
    assert value(samples, "flowd_flows_started_total", routine="leaky") == 3
    assert value(samples, "flowd_flows_started_total", routine="fragile") == 2
    assert value(samples, "flowd_flows_ended_total", routine="leaky", state="DONE") == 3
    assert value(samples, "flowd_flows_ended_total", routine="fragile", state="FAILED") == 2
    assert value(samples, "flowd_flows_ended_total", routine="fragile", state="DONE") is None
    for routine, task, count in (("leaky", "pass-on", 3), ("leaky", "quick", 3), ("fragile", "quick", 2),
                                 ("fragile", "needs-marker", 2)):
        assert value(samples, "flowd_step_duration_seconds_count", routine=routine, task=task) == count
        assert value(samples, "flowd_step_duration_seconds_bucket", routine=routine, task=task, le="+Inf") == count
        assert (value(samples, "flowd_step_duration_seconds_sum", routine=routine, task=task) or 0) < 5
    assert (value(samples, "flowd_database_bytes") or 0) > 10_000
    assert value(samples, "flowd_queue_depth") == 0
    assert (value(samples, "flowd_outbox_messages") or 0) >= 0

    daemon.marker.write_text("fixed\n")
    assert client.post(f"/flows/{ids[2]}/retry", {"csrf": token})[0] == 303
    daemon.wait_state(ids[2], ("DONE",))
    samples = scrape(client)
    assert value(samples, "flowd_flows_started_total", routine="fragile") == 2
    assert value(samples, "flowd_flows_ended_total", routine="fragile", state="DONE") == 1
    assert value(samples, "flowd_flows_ended_total", routine="fragile", state="FAILED") == 2
    assert value(samples, "flowd_step_duration_seconds_count", routine="fragile", task="needs-marker") == 3

    def counted(found: dict[Any, float]) -> dict[Any, float]:
        return {k: v for k, v in found.items() if k[0].startswith(("flowd_flows_", "flowd_step_"))}

    assert counted(scrape(client)) == counted(samples)  # a scrape counts nothing twice


def call(app: Any, path: str) -> tuple[str, Any]:
    environ: dict[str, Any] = {"PATH_INFO": path, "HTTP_HOST": "127.0.0.1:8470"}
    wsgiref.util.setup_testing_defaults(environ)
    answer: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        answer["status"] = status

    body = b"".join(app(environ, start_response))
    return answer["status"], json.loads(body)


def test_healthz_is_503_when_the_database_cannot_be_read(db: Any) -> None:
    # The console's app in this process, on a real SQLite file that then turns to garbage.
    from flowd.store.models import database, sqlite_path
    from flowd.web.app import ConsoleApp

    app = ConsoleApp(db.config, None).wsgi
    status, body = call(app, "/healthz")
    assert status.startswith("200") and body["status"] == "ok" and body["node_id"] == "testnode"
    path = sqlite_path(db.config.database.url)
    assert path is not None
    database.obj.close()
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        name.unlink(missing_ok=True)
    path.write_bytes(b"this is not a database file" * 200)
    status, body = call(app, "/healthz")
    assert status.startswith("503") and body["status"] == "unavailable"
    assert "the database cannot be read" in body["error"]


def fill_database(config: Any, flows: int) -> None:
    """``flows`` ended flows with three attempts each, written straight into the file."""
    from flowd import api
    from flowd.store.models import Flow, TaskResult, utcnow, write_transaction

    api.configure(config, create=True)  # as the daemon's first start would
    now = utcnow()
    with write_transaction():
        for start in range(0, flows, 500):
            rows = []
            for n in range(start, min(start + 500, flows)):
                state = ("DONE", "FAILED", "CANCELLED")[n % 3] if n % 10 else "DONE"
                rows.append({"uid": str(uuid.uuid4()), "routine": ("leaky", "fragile", "slow")[n % 3],
                             "steps": ["quick", "slow", "quick"], "state": state, "position": 2,
                             "args": [], "kwargs": {"n": n}, "trigger": "mqtt", "admitted": True,
                             "result": {"args": [], "kwargs": {"n": n}} if state == "DONE" else None,
                             "error": "RuntimeError: no" if state == "FAILED" else None,
                             "created_at": now, "started_at": now, "finished_at": now, "updated_at": now})
            Flow.insert_many(rows).execute()
        ids = [f.id for f in Flow.select(Flow.id)]
        for start in range(0, len(ids), 300):
            TaskResult.insert_many([
                {"flow": flow_id, "position": p, "task": ("quick", "slow", "quick")[p], "attempt": 1, "state": "DONE",
                 "input": {"args": [], "kwargs": {"n": flow_id}}, "output": {"args": [], "kwargs": {}},
                 "started_at": now, "finished_at": now}
                for flow_id in ids[start:start + 300] for p in range(3)]).execute()
    api.reset()


def test_pages_are_quick_with_ten_thousand_flows(tmp_path: Path, broker: Any, config_file: Any,
                                                 flowd_proc: Any) -> None:
    # 10,000 flows (30,000 attempts) in the database: every page answers in under 100 ms
    # (the median of five, over HTTP, on this machine), and the list pages on.
    from flowd.config import load_config

    fill_database(load_config(config_file()), 10_000)
    daemon = start_console_daemon(tmp_path, broker, config_file, flowd_proc, web={"open_metrics": True})
    client = daemon.client()
    status, _, text = client.get("/flows?state=FAILED")
    assert status == 200 and text.count('<span class="state failed">') == 50
    older = wait_for(lambda: __import__("re").search(r'href="(/flows\?state=FAILED&amp;before=\d+)"', text),
                     timeout=1, message="a link to older flows").group(1).replace("&amp;", "&")
    status, _, page2 = client.get(older)
    assert status == 200 and page2.count('<span class="state failed">') == 50
    timings = {path: time_get(client, path) for path in ("/", "/routines", "/flows", "/flows?state=FAILED",
                                                          "/flows?routine=slow", older, "/flows/1", "/flows/9999",
                                                          "/flows/5000/live", "/metrics", "/healthz")}
    slow = {path: round(t * 1000, 1) for path, t in timings.items() if t >= 0.1}
    assert not slow, f"pages over 100 ms (ms): {slow}"
