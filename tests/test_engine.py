"""Core engine against a real SQLite file and a real huey consumer with process workers."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, flowd_env, wait_for

from flowd import api, catalog
from flowd.errors import InputError, NotFoundError
from flowd.store.models import Flow, Outbox, TaskResult

ENDED = ("DONE", "FAILED", "CANCELLED")


def ended(flow_id: int, timeout: float = 20) -> Flow:
    return wait_for(lambda: (f := api.get_flow(flow_id)).state in ENDED and f, timeout,
                    message=f"flow {flow_id} to end")


def attempts(flow_id: int) -> list[tuple[int, int, str]]:
    return [(r.position, r.attempt, r.state) for r in api.flow_trace(flow_id)]


@pytest.fixture
def paths(db: Any) -> tuple[str, ...]:
    return db.config.flowd.task_paths


def add(name: str, script: str, paths: tuple[str, ...], **fields: Any) -> None:
    catalog.save_task(name, script, task_paths=paths, **fields)


# ---------------------------------------------------------------- data passing (SPEC 2)

def test_data_passes_between_steps_as_tuple_dict_and_none(paths: tuple[str, ...], worker_pool: Any) -> None:
    add("tuple", "t.Tuple", paths)
    add("dict", "t.Dict", paths)
    add("nothing", "t.Nothing", paths)
    add("results", "t.Results", paths)
    catalog.save_routine("chain", ["tuple", "dict", "nothing", "results"])
    flow = ended(api.submit_flow("chain", 1, 2, b=1, a=2).id)
    assert flow.state == "DONE", flow.error
    # Tuple -> (["x", 1, 2], {"got": ["a", "b"]}); Dict keeps args, replaces kwargs; Nothing passes on.
    expected_after_dict = {"args": ["x", 1, 2], "kwargs": {"seen_args": ["x", 1, 2], "got": ["a", "b"]}}
    assert flow.result["args"] == ["x", 1, 2]
    assert flow.result["kwargs"]["results"] == [
        {"args": ["x", 1, 2], "kwargs": {"got": ["a", "b"]}}, expected_after_dict, expected_after_dict]
    assert flow.result["kwargs"]["position"] == 3
    assert flow.result["kwargs"]["flow_id"] == flow.id
    assert [r.state for r in api.flow_trace(flow.id)] == ["DONE"] * 4


def test_options_merge_under_kwargs_and_do_not_leak(paths: tuple[str, ...], worker_pool: Any) -> None:
    add("add5", "t.Add", paths, options={"n": 5, "unit": "W"})
    add("dict", "t.Dict", paths)
    catalog.save_routine("opts", ["add5", "add5", "dict"])
    flow = ended(api.submit_flow("opts", total=1, n=10).id)
    # First step: flow kwarg n=10 wins over option n=5; second step gets no n, so the option applies.
    assert flow.state == "DONE", flow.error
    assert flow.result["kwargs"]["total"] == 1 + 10 + 5
    # Options reach perform() but are not stored as the step's input (they may hold secrets).
    assert flow.result["kwargs"]["unit"] == "W"
    assert api.flow_trace(flow.id)[0].input == {"args": [], "kwargs": {"total": 1, "n": 10}}


# ---------------------------------------------------------------- failures

@pytest.mark.parametrize("script, needle", [
    ("t.Fail", "ValueError: sensor answered garbage"),
    ("t.NotJson", "not JSON-serialisable at 'kwargs.reading.when': object"),
    ("t.BadShape", "returned int; perform() must return (args, kwargs)"),
    ("broken.Anything", "task_broken.py, line 5: importing the script raised ImportError"),
])
def test_failing_steps_give_a_clear_error_and_never_stop_a_worker(
        paths: tuple[str, ...], worker_pool: Any, script: str, needle: str) -> None:
    if script.startswith("broken."):
        # catalog refuses scripts it cannot read; a script that breaks at import is
        # only found out when it runs, so store it directly.
        from flowd.store.models import Task, bump_definitions_version, write_transaction

        with write_transaction():
            Task.create(name="bad", script=script)
            bump_definitions_version()
    else:
        add("bad", script, paths)
    add("add", "t.Add", paths)
    catalog.save_routine("bad-r", ["add", "bad", "add"])
    flow = ended(api.submit_flow("bad-r").id)
    assert flow.state == "FAILED"
    assert flow.error.startswith("step 2/3 (bad) failed:")
    trace = api.flow_trace(flow.id)
    assert [(r.position, r.state) for r in trace] == [(0, "DONE"), (1, "FAILED")]
    assert needle in trace[1].error
    # The same workers still run a good flow.
    catalog.save_routine("good", ["add"])
    assert ended(api.submit_flow("good").id).state == "DONE"


def test_syntax_error_names_file_and_line(paths: tuple[str, ...], worker_pool: Any) -> None:
    with pytest.raises(InputError, match=r"task_syntax.py, line 6: syntax error"):
        add("oops", "syntax.Oops", paths)


def test_unknown_script_and_bad_references_are_refused(paths: tuple[str, ...]) -> None:
    with pytest.raises(InputError, match=r"no file task_nope\.py in the task folders"):
        add("x", "nope.Thing", paths)
    with pytest.raises(InputError, match=r"has no Task class Missing; it defines: t\.Add"):
        add("x", "t.Missing", paths)
    for reference in ("../etc.passwd", "os.path.join", "t", "t.Add.x", ""):
        with pytest.raises(InputError, match="not a task script reference"):
            add("x", reference, paths)


def test_unknown_routine_and_disabled_routine(paths: tuple[str, ...]) -> None:
    with pytest.raises(NotFoundError, match="routine 'ghost' does not exist"):
        api.submit_flow("ghost")
    add("add", "t.Add", paths)
    catalog.save_routine("off", ["add"], enabled=False)
    with pytest.raises(InputError, match="routine 'off' is disabled"):
        api.submit_flow("off")
    with pytest.raises(InputError, match="not JSON-serialisable"):
        api.submit_flow("off", when=object())
    assert Flow.select().count() == 0


def test_retries_are_counted_per_attempt_with_backoff(
        paths: tuple[str, ...], worker_pool: Any, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    add("flaky", "t.FailTimes", paths, retries=3, retry_delay=0.2, options={"counter": str(counter), "times": 2})
    catalog.save_routine("flaky-r", ["flaky"])
    flow = ended(api.submit_flow("flaky-r").id)
    assert flow.state == "DONE", flow.error
    assert attempts(flow.id) == [(0, 1, "FAILED"), (0, 2, "FAILED"), (0, 3, "DONE")]
    trace = api.flow_trace(flow.id)
    gap1 = (trace[1].started_at - trace[0].finished_at).total_seconds()
    gap2 = (trace[2].started_at - trace[1].finished_at).total_seconds()
    assert gap1 >= 0.2 and gap2 >= 0.4  # retry_delay doubles each attempt
    assert gap1 < 0.2 + 0.3 and gap2 < 0.4 + 0.3  # and on time (huey's own schedule was up to 1 s late)
    assert counter.read_text().splitlines() == ["attempt:1", "attempt:2", "attempt:3"]


def test_retries_run_out(paths: tuple[str, ...], worker_pool: Any) -> None:
    add("fail", "t.Fail", paths, retries=2, retry_delay=0.05)
    catalog.save_routine("fail-r", ["fail"])
    flow = ended(api.submit_flow("fail-r").id)
    assert flow.state == "FAILED"
    assert attempts(flow.id) == [(0, 1, "FAILED"), (0, 2, "FAILED"), (0, 3, "FAILED")]


@pytest.mark.parametrize("script", ["t.SleepForever", "t.SwallowAll"])
def test_step_timeout_stops_a_stuck_step(paths: tuple[str, ...], worker_pool: Any, script: str) -> None:
    add("stuck", script, paths, timeout=0.5, retries=1, retry_delay=0.05)
    catalog.save_routine("stuck-r", ["stuck"])
    flow = ended(api.submit_flow("stuck-r").id)
    assert flow.state == "FAILED"
    trace = api.flow_trace(flow.id)
    assert [(r.attempt, r.state) for r in trace] == [(1, "FAILED"), (2, "FAILED")]
    assert all("timed out after 0.5s" in r.error for r in trace)
    add("stuck", "t.Add", paths)
    catalog.save_routine("ok", ["stuck"])
    assert ended(api.submit_flow("ok").id).state == "DONE"


def test_routine_timeout_fails_the_flow(paths: tuple[str, ...], worker_pool: Any) -> None:
    add("sleep", "t.Sleep", paths, options={"seconds": 0.4})
    catalog.save_routine("slow", ["sleep", "sleep", "sleep", "sleep"], timeout=1.0)
    flow = ended(api.submit_flow("slow").id)
    assert flow.state == "FAILED"
    assert "routine 'slow' allows 1s for the whole flow" in flow.error
    assert sum(r.state == "DONE" for r in api.flow_trace(flow.id)) in (1, 2)


def test_cancel_a_running_flow_interrupts_its_step(paths: tuple[str, ...], worker_pool: Any) -> None:
    add("sleep", "t.Sleep", paths, options={"seconds": 30})
    add("add", "t.Add", paths)
    catalog.save_routine("long", ["add", "sleep", "add"])
    flow = api.submit_flow("long")
    wait_for(lambda: api.get_flow(flow.id).position == 1 and any(
        r.state == "RUNNING" for r in api.flow_trace(flow.id)), message="step 2 to run")
    started = time.monotonic()
    api.cancel_flow(flow.id)
    flow = api.get_flow(flow.id)
    assert flow.state == "CANCELLED" and flow.error == "cancelled by request"
    assert [r.state for r in api.flow_trace(flow.id)] == ["DONE", "CANCELLED"]
    # The worker was freed at once, not after the 30 s sleep.
    catalog.save_routine("quick", ["add"])
    quick = [api.submit_flow("quick").id for _ in range(2)]
    assert all(ended(q, 10).state == "DONE" for q in quick)
    assert time.monotonic() - started < 25
    with pytest.raises(InputError, match="already ended"):
        api.cancel_flow(flow.id)


def test_retry_resumes_from_the_failed_step(paths: tuple[str, ...], worker_pool: Any, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    add("count", "t.Count", paths, options={"counter": str(counter)})
    add("fail", "t.Fail", paths)
    catalog.save_routine("fix-me", ["count", "fail", "count"])
    flow = ended(api.submit_flow("fix-me").id)
    assert flow.state == "FAILED"
    assert counter.read_text().splitlines() == [f"run:{flow.id}:0"]
    add("fail", "t.Nothing", paths)  # the operator fixes the broken step
    with pytest.raises(InputError, match="only FAILED or CANCELLED"):
        api.retry_flow(ended(api.submit_flow("fix-me").id).id)
    api.retry_flow(flow.id)
    flow = ended(flow.id)
    assert flow.state == "DONE", flow.error
    # Step 1 did not run again; step 3 ran once.
    runs = [line for line in counter.read_text().splitlines() if line.endswith(f":{flow.id}:0")]
    assert runs == [f"run:{flow.id}:0"]
    assert f"run:{flow.id}:2" in counter.read_text().splitlines()
    assert attempts(flow.id) == [(0, 1, "DONE"), (1, 1, "FAILED"), (1, 2, "DONE"), (2, 1, "DONE")]
    results = Outbox.select().where(Outbox.topic == f"flow/{flow.id}/result").count()
    assert results == 2  # one result per ending


# ---------------------------------------------------------------- concurrency modes (SPEC 1)

def _long_routine(paths: tuple[str, ...], name: str, mode: str, max_: int = 10, seconds: float = 1.0) -> None:
    add(f"sleep-{name}", "t.Sleep", paths, options={"seconds": seconds})
    catalog.save_routine(name, [f"sleep-{name}"], mode=mode, max=max_)


def test_mode_single_refuses_while_one_runs(paths: tuple[str, ...], worker_pool: Any) -> None:
    _long_routine(paths, "single-r", "single")
    first = api.submit_flow("single-r")
    second = api.get_flow(api.submit_flow("single-r").id)
    assert second.state == "CANCELLED"
    assert second.error == f"routine 'single-r' runs in mode single and flow {first.id} is still running"
    assert Outbox.select().where(Outbox.topic == f"flow/{second.id}/result").count() == 1
    assert ended(first.id).state == "DONE"
    assert ended(api.submit_flow("single-r").id).state == "DONE"


def test_mode_queued_runs_one_at_a_time_in_order(paths: tuple[str, ...], worker_pool: Any) -> None:
    _long_routine(paths, "queued-r", "queued", max_=2, seconds=0.3)
    ids = [api.submit_flow("queued-r").id for _ in range(4)]
    refused = api.get_flow(ids[3])
    assert refused.state == "CANCELLED" and "queue is full (2 waiting)" in refused.error
    flows = [ended(i) for i in ids[:3]]
    assert [f.state for f in flows] == ["DONE"] * 3
    for earlier, later in itertools.pairwise(flows):
        assert later.started_at >= earlier.finished_at


def test_mode_restart_cancels_the_running_flow(paths: tuple[str, ...], worker_pool: Any) -> None:
    _long_routine(paths, "restart-r", "restart", seconds=20)
    first = api.submit_flow("restart-r")
    wait_for(lambda: api.get_flow(first.id).state == "RUNNING", message="first flow to run")
    second = api.submit_flow("restart-r")
    first = api.get_flow(first.id)
    assert first.state == "CANCELLED" and f"flow {second.id} replaced it" in first.error
    wait_for(lambda: api.get_flow(second.id).state == "RUNNING", message="second flow to run")
    api.cancel_flow(second.id)


def test_mode_parallel_caps_running_flows(paths: tuple[str, ...], worker_pool: Any) -> None:
    _long_routine(paths, "par-r", "parallel", max_=1, seconds=0.3)
    ids = [api.submit_flow("par-r").id for _ in range(3)]
    assert [api.get_flow(i).admitted for i in ids] == [True, False, False]
    flows = [ended(i) for i in ids]
    assert [f.state for f in flows] == ["DONE"] * 3
    for earlier, later in itertools.pairwise(flows):
        assert later.started_at >= earlier.finished_at


# ---------------------------------------------------------------- durability

def test_request_id_is_idempotent(paths: tuple[str, ...]) -> None:
    add("add", "t.Add", paths)
    catalog.save_routine("idem", ["add"])
    first = api.submit_flow("idem", request_id="r-17", n=1)
    again = api.submit_flow("idem", request_id="r-17", n=2)
    assert again.id == first.id
    assert Flow.select().count() == 1


def test_submit_from_another_process_without_daemon(db: Any, paths: tuple[str, ...]) -> None:
    add("add", "t.Add", paths)
    catalog.save_routine("ext", ["add"])
    code = ("from flowd import api; import sys; api.configure(sys.argv[1]); "
            "f = api.submit_flow('ext', 7, total=1, request_id='outside'); print(f.id)")
    out = subprocess.run([sys.executable, "-c", code, str(db.config.path)], capture_output=True, text=True,
                         env=flowd_env(), cwd=str(ROOT), timeout=60, check=True)
    flow = api.get_flow(int(out.stdout))
    assert (flow.state, flow.args, flow.kwargs, flow.trigger) == ("INIT", [7], {"total": 1}, "api")
    from flowd.queue.workers import WorkerPool

    pool = WorkerPool(db.config)
    pool.start()
    try:
        assert ended(flow.id).state == "DONE"
    finally:
        pool.stop(2)


def test_killed_worker_is_replaced_and_its_step_runs_again(
        paths: tuple[str, ...], worker_pool: Any, db: Any, tmp_path: Path) -> None:
    from flowd.engine.reaper import Reaper

    counter = tmp_path / "count"
    add("sleep", "t.Sleep", paths, options={"seconds": 30})
    add("count", "t.Count", paths, options={"counter": str(counter)})
    catalog.save_routine("victim", ["count", "sleep", "count"])
    flow = api.submit_flow("victim")
    running = wait_for(lambda: [r for r in api.flow_trace(flow.id) if r.state == "RUNNING" and r.position == 1],
                       message="step 2 running")
    os.kill(running[0].worker_pid, signal.SIGKILL)
    add("sleep", "t.Nothing", paths)
    reaper = Reaper(db.config, db)
    wait_for(lambda: reaper.run_once() or api.get_flow(flow.id).state in ENDED, 20, 0.2, "flow to finish")
    flow = api.get_flow(flow.id)
    assert flow.state == "DONE", flow.error
    assert attempts(flow.id) == [(0, 1, "DONE"), (1, 1, "FAILED"), (1, 2, "DONE"), (2, 1, "DONE")]
    assert "worker process" in api.flow_trace(flow.id)[1].error
    assert counter.read_text().splitlines() == [f"run:{flow.id}:0", f"run:{flow.id}:2"]


def test_reaper_kills_a_step_that_blocks_the_timer(
        paths: tuple[str, ...], worker_pool: Any, db: Any, tmp_path: Path) -> None:
    from flowd.engine.reaper import Reaper

    script = Path(paths[0]) / "task_deaf.py"
    script.write_text("import signal, time\nfrom flowd.task import Task\n\n\nclass Deaf(Task):\n"
                      "    def perform(self, **kwargs):\n"
                      "        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR1})\n"
                      "        time.sleep(60)\n")
    add("deaf", "deaf.Deaf", paths, timeout=0.5)
    catalog.save_routine("deaf-r", ["deaf"])
    flow = api.submit_flow("deaf-r")
    reaper = Reaper(db.config, db)
    wait_for(lambda: reaper.run_once() or api.get_flow(flow.id).state in ENDED, 20, 0.2, "reaper to stop it")
    flow = api.get_flow(flow.id)
    assert flow.state == "FAILED"
    assert "timed out after 0.5s (the worker was stopped)" in api.flow_trace(flow.id)[0].error
    add("ok", "t.Add", paths)
    catalog.save_routine("after", ["ok"])
    assert ended(api.submit_flow("after").id).state == "DONE"


def test_recovery_requeues_interrupted_flows_exactly_once(paths: tuple[str, ...], db: Any) -> None:
    from flowd.engine.recovery import recover

    add("add", "t.Add", paths)
    catalog.save_routine("rec", ["add", "add"])
    flows = [api.submit_flow("rec", total=i) for i in range(3)]
    # Simulate a crash: flow 0 mid-step (RUNNING attempt of a dead worker), 1 queued, 2 ended.
    step = db.claim(flows[0].id, api.get_flow(flows[0].id).dispatch_token, pid=999_999)
    assert step is not None
    db.cancel(flows[2].id)
    assert recover(db.config, db) == 2
    assert attempts(flows[0].id) == [(0, 1, "FAILED")]
    assert api.get_flow(flows[0].id).interruptions == 1
    from flowd.queue.queue import queued_flow_ids

    queued = queued_flow_ids()
    assert {(f.id, api.get_flow(f.id).dispatch_token) for f in flows[:2]} == queued


# ---------------------------------------------------------------- example task scripts

def test_http_fetch_digest_against_a_local_server(paths: tuple[str, ...], worker_pool: Any) -> None:
    import hashlib
    import http.server
    import threading

    body = json.dumps({"temp": 21.5, "hum": 40, "noise": "x"}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 200 if self.path == "/data" else 503
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if code == 200 else b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        add("fetch", "http.FetchDigest", paths, options={"url": url + "/data", "fields": ["temp", "hum"]})
        add("fetch-bad", "http.FetchDigest", paths, options={"url": url + "/down"}, retries=1, retry_delay=0.05)
        catalog.save_routine("scrape", ["fetch"])
        catalog.save_routine("scrape-bad", ["fetch-bad"])
        flow = ended(api.submit_flow("scrape").id)
        assert flow.state == "DONE", flow.error
        assert flow.result["kwargs"]["data"] == {"temp": 21.5, "hum": 40}
        assert flow.result["kwargs"]["sha256"] == hashlib.sha256(body).hexdigest()
        bad = ended(api.submit_flow("scrape-bad").id)
        assert bad.state == "FAILED" and "HTTP Error 503" in bad.error
        assert len(api.flow_trace(bad.id)) == 2
    finally:
        server.shutdown()


def test_file_append_and_publish_steps(paths: tuple[str, ...], worker_pool: Any, tmp_path: Path) -> None:
    log_file = tmp_path / "readings.jsonl"
    add("log", "file.AppendLine", paths, options={"path": str(log_file), "keys": ["temp"]})
    add("pub", "mqtt.Publish", paths, options={"topic": "sensors/kitchen"})
    catalog.save_routine("record", ["log", "pub"])
    flows = [ended(api.submit_flow("record", temp=t).id) for t in (20, 21)]
    assert [f.state for f in flows] == ["DONE", "DONE"]
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(line["temp"], line["flow"]) for line in lines] == [(20, flows[0].id), (21, flows[1].id)]
    published = [json.loads(r.payload) for r in Outbox.select().where(Outbox.topic == "sensors/kitchen")
                 .order_by(Outbox.id)]
    assert [p["kwargs"]["temp"] for p in published] == [20, 21]


def test_changed_script_is_picked_up_without_restart(paths: tuple[str, ...], worker_pool: Any) -> None:
    script = Path(paths[0]) / "task_live.py"
    script.write_text("from flowd.task import Task\n\nclass Version(Task):\n"
                      "    def perform(self, **kw):\n        return {'version': 1}\n")
    add("live", "live.Version", paths)
    catalog.save_routine("live-r", ["live"])
    assert ended(api.submit_flow("live-r").id).result["kwargs"] == {"version": 1}
    time.sleep(0.01)
    script.write_text("from flowd.task import Task\n\nclass Version(Task):\n"
                      "    def perform(self, **kw):\n        return {'version': 2, 'edited': True}\n")
    assert ended(api.submit_flow("live-r").id).result["kwargs"] == {"version": 2, "edited": True}


def test_prune_deletes_old_ended_flows_only(paths: tuple[str, ...], db: Any) -> None:
    add("add", "t.Add", paths)
    catalog.save_routine("p", ["add"])
    old = api.submit_flow("p")
    db.cancel(old.id)
    running = api.submit_flow("p")
    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=31)
    assert api.prune(30 * 86400, now=later) == 1
    assert Flow.get_or_none(Flow.id == old.id) is None
    assert TaskResult.select().where(TaskResult.flow == old.id).count() == 0
    assert api.get_flow(running.id).state == "INIT"


def test_the_reaper_asks_once_per_worker_whether_it_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    # A few workers hold every running step: one liveness check each per pass, and the
    # steps of the dead one are all failed as interrupted.
    from flowd.engine import reaper as reaper_module
    from flowd.store import Row

    now = dt.datetime(2026, 1, 1)
    attempts = [Row({"id": n, "flow_id": n, "position": 0, "task": "t", "worker_pid": 100 + n % 2, "started_at": now,
                     "routine": "r", "deadline": None, "timeout": None}) for n in range(10)]
    asked: list[int] = []
    failed: list[int] = []
    monkeypatch.setattr(reaper_module.store, "running_attempts", lambda node_id: attempts)
    monkeypatch.setattr(reaper_module, "is_process_alive", lambda pid: asked.append(pid) or pid == 100)

    class FakeEngine:
        node_id = None

        def fail_attempt(self, flow_id: int, attempt_id: int, *args: Any, **kwargs: Any) -> int:
            failed.append(flow_id)
            return 1

    reaper = reaper_module.Reaper.__new__(reaper_module.Reaper)
    reaper.engine = FakeEngine()  # type: ignore[assignment]
    assert reaper.stop_overdue_steps(now) == 5
    assert sorted(asked) == [100, 101] and failed == [1, 3, 5, 7, 9]
