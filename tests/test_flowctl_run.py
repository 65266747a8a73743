"""``flowctl run``: a routine in the foreground, in the flowctl process, with no daemon
and no broker (the config points at a port where nothing listens).

Each test defines tasks and routines with the real ``flowctl`` (as the README does),
then runs ``flowctl run`` as a subprocess and reads what it printed, its exit code and
the database file afterwards.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

Flowctl = Callable[..., subprocess.CompletedProcess[str]]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


@pytest.fixture
def greenhouse(flowctl: Flowctl) -> Flowctl:
    """The README's greenhouse routine, defined exactly as the README says."""
    ok(flowctl("task", "add", "reading", "greenhouse.Reading", "--option", "offset=-0.5"))
    ok(flowctl("task", "add", "alarm", "greenhouse.Alarm", "--option", "limit=28", "--retries", "2"))
    ok(flowctl("routine", "add", "greenhouse", "reading", "alarm"))
    return flowctl


def database_state(state_dir: Path) -> tuple[str, int, int, int]:
    """A digest of every row of the database and the rows flowctl run must not add
    (the file's bytes change when SQLite checkpoints its WAL on close; its rows must not)."""
    with sqlite3.connect(f"file:{state_dir / 'flowd.db'}?mode=ro", uri=True) as db:
        digest = hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
        counts = [db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("flow", "task_result",
                                                                                         "outbox")]
    return digest, counts[0], counts[1], counts[2]


def test_run_prints_each_step_and_the_publish_and_stores_nothing(greenhouse: Flowctl, state_dir: Path) -> None:
    # No daemon, no broker. flowctl run greenhouse --kw raw=312: step 1 turns 312 into
    # 30.7 degrees (offset -0.5), step 2 is over its limit 28 and would publish the alarm.
    before = database_state(state_dir)
    result = greenhouse("run", "greenhouse", "--kw", "raw=312")
    out = ok(result)
    assert "step 1/2 reading (greenhouse.Reading)" in out
    assert 'input    {"args":[],"kwargs":{"raw":312}}' in out
    assert 'options  {"offset":-0.5}' in out
    assert 'output   {"args":[],"kwargs":{"celsius":30.7}}' in out
    assert "step 2/2 alarm (greenhouse.Alarm)" in out
    assert 'publish  greenhouse/alarm {"celsius":30.7} (qos 1; not sent' in out
    assert "greenhouse DONE" in out and "nothing stored" in out
    assert out.index("step 1/2") < out.index("step 2/2") < out.index("publish") < out.index("greenhouse DONE")
    assert database_state(state_dir) == before  # not a byte written: no flow, no attempt, no outbox row
    assert before[1:] == (0, 0, 0)


def test_a_failing_step_exits_1_with_the_tasks_error(greenhouse: Flowctl, state_dir: Path) -> None:
    # Without raw, Reading.perform() raises TypeError: the run ends FAILED at step 1
    # (no retries for 'reading'), exit code 1, the task's error on the output.
    before = database_state(state_dir)
    result = greenhouse("run", "greenhouse")
    assert result.returncode == 1, result.stderr
    assert "FAILED   TypeError: Reading.perform() missing 1 required keyword-only argument: 'raw'" in result.stdout
    assert "error: step 1/2 (reading) failed: TypeError" in result.stdout
    assert "step 2/2" not in result.stdout
    assert "Traceback" not in result.stderr  # the task's traceback is output, flowctl's own never
    assert database_state(state_dir) == before


def test_json_output_has_every_attempt_and_the_publish(greenhouse: Flowctl) -> None:
    data = json.loads(ok(greenhouse("--json", "run", "greenhouse", "--kw", "raw=312")))
    assert data["state"] == "DONE"
    assert data["result"] == {"args": [], "kwargs": {"celsius": 30.7}}
    assert [(a["task"], a["attempt"], a["output"]) for a in data["attempts"]] == [
        ("reading", 1, {"args": [], "kwargs": {"celsius": 30.7}}),
        ("alarm", 1, {"args": [], "kwargs": {"celsius": 30.7}})]
    assert data["published"] == [{"topic": "greenhouse/alarm", "payload": {"celsius": 30.7}, "qos": 1,
                                  "retain": False, "position": 1, "task": "alarm"}]
    assert data["recorded_flow"] is None


def test_retries_follow_the_task_and_record_stores_the_flow(flowctl: Flowctl, tmp_path: Path) -> None:
    # A task failing twice with retries=2 and retry_delay 0.1: three attempts, then DONE.
    # --record stores it as an ended flow that flowctl flow show then shows.
    counter = tmp_path / "runs.txt"
    ok(flowctl("task", "add", "flaky", "t.FailTimes", "--retries", "2", "--retry-delay", "0.1",
               "--option", f"counter={json.dumps(str(counter))}", "--option", "times=2"))
    ok(flowctl("routine", "add", "flaky", "flaky"))
    data = json.loads(ok(flowctl("--json", "run", "flaky", "--record")))
    assert data["state"] == "DONE"
    assert [(a["attempt"], a["retry_in"]) for a in data["attempts"]] == [(1, 0.1), (2, 0.2), (3, None)]
    assert counter.read_text().splitlines() == ["attempt:1", "attempt:2", "attempt:3"]
    flow_id = data["recorded_flow"]
    shown = json.loads(ok(flowctl("--json", "flow", "show", str(flow_id))))
    assert shown["state"] == "DONE" and shown["trigger"] == "cli"
    assert shown["result"]["kwargs"]["runs"] == 3
    assert [(t["attempt"], t["state"]) for t in shown["trace"]] == [(1, "FAILED"), (2, "FAILED"), (3, "DONE")]


def test_the_tasks_log_lines_are_shown(flowctl: Flowctl) -> None:
    ok(flowctl("task", "add", "nap", "example.VeryLong", "--option", "seconds=0"))
    ok(flowctl("routine", "add", "nap", "nap"))
    assert "  log      INFO sleeping 0s" in ok(flowctl("run", "nap"))


def test_a_step_timeout_stops_the_step(flowctl: Flowctl) -> None:
    ok(flowctl("task", "add", "stuck", "t.SleepForever", "--timeout", "0.5"))
    ok(flowctl("routine", "add", "stuck", "stuck"))
    result = flowctl("run", "stuck", timeout=20)
    assert result.returncode == 1
    assert "timed out after 0.5s" in result.stdout


def test_wait_is_explained_and_an_event_lets_it_go_on(flowctl: Flowctl) -> None:
    # A Wait cannot be answered here: without --event the run stops WAITING (exit 1)
    # and says why; with a matching --event the next step gets it as kwargs["event"].
    ok(flowctl("task", "add", "door", "t.WaitFor", "--option", "topic=sensors/door",
               "--option", 'match={"open": true}', "--option", "wait_timeout=30"))
    ok(flowctl("task", "add", "pass", "t.Nothing"))
    ok(flowctl("routine", "add", "door", "door", "pass"))
    stopped = flowctl("run", "door", timeout=20)
    assert stopped.returncode == 1
    assert "wait     for a message on 'sensors/door' matching {\"open\":true}" in stopped.stdout
    assert "does not listen to the broker" in stopped.stdout and "--event" in stopped.stdout
    assert "step 2/2" not in stopped.stdout
    data = json.loads(ok(flowctl("--json", "run", "door", "--event", '{"open": true, "who": "cat"}')))
    assert data["state"] == "DONE"
    assert data["result"]["kwargs"]["event"] == {"open": True, "who": "cat"}
    refused = json.loads(flowctl("--json", "run", "door", "--event", '{"open": false}').stdout)
    assert refused["state"] == "FAILED" and "does not contain match" in refused["error"]


def test_a_subflow_runs_nested(flowctl: Flowctl) -> None:
    ok(flowctl("task", "add", "mark-child", "w.Mark", "--option", "label=child"))
    ok(flowctl("task", "add", "spawn", "w.Spawn", "--option", "child=child"))
    ok(flowctl("task", "add", "mark-parent", "w.Mark", "--option", "label=parent"))
    ok(flowctl("routine", "add", "child", "mark-child"))
    ok(flowctl("routine", "add", "parent", "spawn", "mark-parent"))
    result = flowctl("run", "parent")
    out = ok(result)
    assert "sub-flow routine child" in out
    assert "    step 1/1 mark-child (w.Mark)" in out  # indented: it runs inside step 1 of parent
    assert "parent DONE" in out
    data = json.loads(ok(flowctl("--json", "run", "parent")))
    assert data["result"]["kwargs"]["marks"] == ["child", "parent"]
    assert data["attempts"][0]["subflow"]["routine"] == "child"
    # A child that stops at a Wait stops its parent too, saying where.
    ok(flowctl("task", "add", "door", "t.WaitFor", "--option", "topic=sensors/door"))
    ok(flowctl("task", "add", "spawn-door", "w.Spawn", "--option", "child=door"))
    ok(flowctl("routine", "add", "door", "door"))
    ok(flowctl("routine", "add", "waits", "spawn-door", "mark-parent"))
    stopped = json.loads(flowctl("--json", "run", "waits").stdout)
    assert stopped["state"] == "WAITING"
    assert stopped["error"].startswith("step 1/2 (spawn-door) waits for its sub-flow (door): step 1/1 (door) waits "
                                       "for a message on 'sensors/door'")
    given = json.loads(ok(flowctl("--json", "run", "waits", "--event", '{"open": 1}')))
    assert given["result"]["kwargs"]["event"] == {"open": 1} and given["result"]["kwargs"]["marks"] == ["parent"]


def test_file_definitions_and_usage_errors(flowctl: Flowctl, tmp_path: Path) -> None:
    # --file takes the routines from an apply file; nothing needs to exist in the database.
    spec = tmp_path / "gh.toml"
    spec.write_text('[tasks.r]\nscript = "greenhouse.Reading"\n[routines.gh]\ntasks = ["r"]\n')
    data = json.loads(ok(flowctl("--json", "run", "gh", "--file", str(spec), "--kw", "raw=100")))
    assert data["result"] == {"args": [], "kwargs": {"celsius": 10.0}}
    unknown = flowctl("run", "nope", "--file", str(spec))
    assert unknown.returncode == 2 and "routine 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = flowctl("run", "gh", "--file", str(spec), "--kw", "raw")
    assert bad.returncode == 2 and "is not key=value" in bad.stderr


def test_positional_args_after_options(greenhouse: Flowctl) -> None:
    data = json.loads(ok(greenhouse("--json", "run", "greenhouse", "--kw", "raw=312", "x", "2")))
    assert data["result"]["args"] == ["x", 2]


def test_flowctl_run_help_lists_it(flowctl: Flowctl) -> None:
    out = ok(flowctl("--help"))
    assert "run" in out and "nodes" in out
    assert "--event" in ok(flowctl("run", "--help"))
    assert "--timeout" in ok(flowctl("flow", "wait", "--help"))
