"""flowctl end to end: the real command as a subprocess against a real SQLite file.

Each test drives flowctl like a user or a script would, then reads its exit code,
its --json output and, for mistakes, its one stderr line (never a traceback).
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, flowd_env, wait_for

Run = Callable[..., subprocess.CompletedProcess[str]]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def data(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout)


def refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """A refusal: the exit code, one line on stderr naming the problem, no traceback."""
    assert result.returncode == code, f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flowctl: ")
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cli(flowctl: Run) -> Run:
    return flowctl


@pytest.fixture
def with_routine(cli: Run) -> Run:
    """Tasks ``add`` (t.Add, n=2) and ``echo``, routine ``sum`` = add -> echo -> add."""
    ok(cli("task", "add", "add", "t.Add", "--option", "n=2"))
    ok(cli("task", "add", "echo", "example.Echo"))
    ok(cli("routine", "add", "sum", "add", "echo", "add"))
    return cli


def db_path(config_file: Callable[..., Path]) -> Path:
    from flowd.config import load_config

    return Path(load_config(config_file()).database.url[len("sqlite:///"):])


# --------------------------------------------------------------------------- usage and start-up
def test_help_lists_every_command(cli: Run) -> None:
    out = ok(cli("--help")).stdout
    for command in ("status", "scripts", "task", "routine", "apply", "submit", "flows", "flow", "prune"):
        assert f"    {command} " in out
    assert "exit codes" in out
    for sub in (("task", "add"), ("routine", "add"), ("submit",), ("flow", "show"), ("prune",)):
        assert "usage: flowctl" in ok(cli(*sub, "--help")).stdout


def test_help_and_reading_flows_import_no_mqtt_scheduler_or_queue(cli: Run, config_file: Callable[..., Path]
                                                                    ) -> None:
    # On a Pi every import costs: --help and a read-only listing must not load paho,
    # APScheduler or huey.
    ok(cli("task", "add", "echo", "example.Echo"))
    probe = ("import atexit, sys\n"
             "def report():\n"
             "    heavy = sorted({m.split('.')[0] for m in sys.modules} & {'paho', 'apscheduler', 'huey'})\n"
             "    print('HEAVY', heavy, file=sys.stderr)\n"
             "atexit.register(report)\n"
             "from flowd.cli.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    for args in (["--help"], ["flows"], ["task", "list"], ["routine", "list"], ["flow", "show", "1"]):
        proc = subprocess.run([sys.executable, "-c", probe, "--config", str(config_file()), *args],
                              capture_output=True, text=True, env=flowd_env(), cwd=str(ROOT), timeout=60)
        assert "HEAVY []" in proc.stderr, (args, proc.stderr)


@pytest.mark.parametrize("argv, words", [
    ([], ["required", "COMMAND"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["task"], ["required", "ACTION"]),
    (["task", "add", "x"], ["required", "SCRIPT"]),
    (["task", "add", "x", "t.Add", "--retries", "-1"], ["--retries", "must not be negative"]),
    (["task", "add", "x", "t.Add", "--timeout", "soon"], ["--timeout"]),
    (["task", "add", "x", "t.Add", "--option", "novalue"], ["--option 'novalue' is not key=value"]),
    (["task", "add", "x", "t.Add", "--option", "=3"], ["is not key=value"]),
    (["routine", "add", "r"], ["required", "TASK"]),
    (["routine", "add", "r", "t", "--mode", "often"], ["--mode", "often"]),
    (["routine", "add", "r", "t", "--max", "0"], ["--max", "at least 1"]),
    (["submit"], ["required", "ROUTINE"]),
    (["submit", "sum", "--kw", "city"], ["--kw 'city' is not key=value"]),
    (["flows", "--state", "sleeping"], ["unknown state 'sleeping'", "DONE"]),
    (["flows", "--limit", "zero"], ["--limit", "whole number"]),
    (["flow", "show", "abc"], ["flow id is a whole number"]),
    (["flow", "cancel"], ["required", "ID"]),
    (["prune", "--older-than", "soon"], ["--older-than"]),
    (["apply"], ["required", "FILE.toml"]),
    (["flows", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["submit", "sum", "x", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["status", "extra"], ["unrecognized arguments: extra"]),
])
def test_bad_usage_exits_2_with_one_line(cli: Run, argv: list[str], words: list[str]) -> None:
    refused(cli(*argv), 2, *words)


def test_json_errors_are_also_json_on_stdout(cli: Run) -> None:
    result = cli("--json", "flow", "show", "abc")
    refused(result, 2)
    assert json.loads(result.stdout) == {"error": result.stderr.strip().removeprefix("flowctl: "), "exit_code": 2}


def test_global_options_work_after_the_command(cli: Run, with_routine: Run) -> None:
    before = data(cli("--json", "routine", "list"))
    after = data(cli("routine", "list", "--json"))
    assert before == after and [r["name"] for r in after] == ["sum"]


# --------------------------------------------------------------------------- configuration and database
def test_config_mistakes_exit_2(cli: Run, tmp_path: Path) -> None:
    refused(cli("flows", config=tmp_path / "nowhere.toml"), 2, "does not exist", "nowhere.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[flowd]\nworkerz = 2\n")
    refused(cli("status", config=bad), 2, "flowd.workerz", "bad.toml")
    bad.write_text("[flowd\n")
    refused(cli("status", config=bad), 2, "not valid TOML")
    refused(cli("status", config=tmp_path), 2, "is a folder")
    bad.write_bytes(b"\xff\xfe[flowd]")
    refused(cli("status", config=bad), 2, "not UTF-8")


def test_config_found_through_flowd_config(cli: Run, config_file: Callable[..., Path], tmp_path: Path) -> None:
    # SPEC 8: without --config, $FLOWD_CONFIG names the file.
    path = config_file()
    ok(cli("task", "add", "echo", "example.Echo"))
    proc = subprocess.run([sys.executable, "-m", "flowd.cli.cli", "--json", "task", "list"], capture_output=True,
                          text=True, env=flowd_env({"FLOWD_CONFIG": str(path)}), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [t["name"] for t in json.loads(proc.stdout)] == ["echo"]


def test_reads_on_a_state_folder_flowd_never_ran_in_list_nothing(cli: Run, config_file: Callable[..., Path]) -> None:
    # flowctl works whether or not the daemon ever ran: nothing to list is the answer
    # (exit 0), and no read creates the database (nor the queue file).
    path = db_path(config_file)
    assert not path.exists()
    assert json.loads(ok(cli("--json", "routine", "list")).stdout) == []
    assert json.loads(ok(cli("--json", "task", "list")).stdout) == []
    assert json.loads(ok(cli("--json", "flows")).stdout) == []
    assert "no flows yet" in ok(cli("flows")).stdout
    status = ok(cli("status"))
    assert "never started with this database" in status.stdout and "not there yet" in status.stdout
    assert json.loads(ok(cli("--json", "status")).stdout)["database_exists"] is False
    refused(cli("routine", "show", "nope"), 2, "routine 'nope' does not exist")
    assert not path.exists() and not (path.parent / "queue.db").exists()
    refused(cli("task", "add", "x", "nosuch.Thing"), 2, "no file task_nosuch.py")  # a refused change leaves none
    assert not path.exists()
    added = ok(cli("task", "add", "echo", "example.Echo"))  # a change does, and says so
    assert path.exists() and f"created the database {path}" in added.stderr
    assert "created the database" not in ok(cli("task", "add", "echo2", "example.Echo")).stderr


def test_not_a_database_exits_3(cli: Run, config_file: Callable[..., Path]) -> None:
    path = db_path(config_file)
    path.write_bytes(b"this is not sqlite" * 100)
    refused(cli("flows"), 3, "not a database")
    refused(cli("task", "add", "echo", "example.Echo"), 3)


def test_permission_denied_exits_3(cli: Run, config_file: Callable[..., Path]) -> None:
    ok(cli("task", "add", "echo", "example.Echo"))
    state = db_path(config_file).parent
    for leftover in state.glob("flowd.db-*"):
        leftover.unlink()
    if os.geteuid() == 0:
        # root ignores file modes; the immutable flag (ext4) denies even root.
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(state)]).returncode != 0:
            pytest.skip("cannot take write access away from root here (no chattr +i)")
        undo = ["chattr", "-i", str(state)]
    else:
        state.chmod(0o500)
        undo = ["chmod", "700", str(state)]
    try:
        refused(cli("task", "add", "other", "example.Echo"), 3, "cannot be used")
        refused(cli("task", "list"), 3, "cannot be used")
    finally:
        subprocess.run(undo, check=True)


def test_unreachable_queue_and_database_servers_exit_3(cli: Run, config_file: Callable[..., Path]) -> None:
    # Nothing listens on port 1: a Redis queue or a PostgreSQL database there cannot be
    # reached (or its driver is not installed); either way exit 3, and never a password.
    redis_config = config_file(queue={"backend": "redis", "url": "redis://127.0.0.1:1/0"})
    ok(cli("task", "add", "echo", "example.Echo", config=redis_config))
    ok(cli("routine", "add", "r", "echo", config=redis_config))
    refused(cli("submit", "r", config=redis_config), 3, "queue")
    status = cli("--json", "status", config=redis_config)
    assert status.returncode == 3 and "Traceback" not in status.stderr
    assert json.loads(status.stdout)["queue_error"]

    pg_config = config_file(database={"url": "postgresql://flowd:s3cret@127.0.0.1:1/flowd"})
    for args in (["flows"], ["task", "add", "echo", "example.Echo"]):
        result = cli(*args, config=pg_config)
        refused(result, 3, "postgresql://flowd:***@127.0.0.1:1/flowd")
        assert "s3cret" not in result.stderr + result.stdout


def test_locked_database_exits_3_after_the_busy_timeout(cli: Run, config_file: Callable[..., Path]) -> None:
    # Another program holds the write lock longer than the busy timeout (15 s in models.py).
    ok(cli("task", "add", "echo", "example.Echo"))
    holder = sqlite3.connect(db_path(config_file), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        refused(cli("task", "add", "other", "example.Echo", timeout=90), 3, "database is locked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    ok(cli("task", "add", "other", "example.Echo"))


# --------------------------------------------------------------------------- scripts, tasks, routines
def test_scripts_lists_task_classes_and_broken_files(cli: Run) -> None:
    found = data(cli("--json", "scripts"))
    refs = {s["script"] for s in found}
    assert {"example.VeryLong", "http.FetchDigest", "mqtt.Publish", "file.AppendLine", "t.Add"} <= refs
    broken = [s for s in found if s["script"] is None]
    assert [Path(s["path"]).name for s in broken] == ["task_syntax.py"]
    assert "line 6" in broken[0]["error"]
    text = ok(cli("scripts")).stdout
    assert "example.VeryLong" in text and "(broken)" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_task_add_list_show_update_remove(cli: Run) -> None:
    added = data(cli("--json", "task", "add", "fetch", "http.FetchDigest", "--retries", "3", "--retry-delay", "5",
                     "--timeout", "30s", "--option", "url=http://127.0.0.1:9/x", "--option", "fields=[\"t\"]",
                     "--option", "max_text=200", "--option", "note=plain words"))
    assert added["action"] == "created"
    task = added["task"]
    assert task["options"] == {"url": "http://127.0.0.1:9/x", "fields": ["t"], "max_text": 200,
                               "note": "plain words"}
    assert (task["retries"], task["retry_delay"], task["timeout"]) == (3, 5.0, 30.0)

    assert [t["name"] for t in data(cli("--json", "task", "list"))] == ["fetch"]
    assert data(cli("--json", "task", "show", "fetch"))["script"] == "http.FetchDigest"
    assert "http.FetchDigest" in ok(cli("task", "show", "fetch")).stdout

    refused(cli("task", "add", "fetch", "example.Echo"), 2, "task 'fetch' exists already (http.FetchDigest)",
            "--replace")
    assert data(cli("--json", "task", "show", "fetch"))["script"] == "http.FetchDigest"  # nothing changed
    assert data(cli("--json", "task", "add", "fetch", "http.FetchDigest", "--retries", "3",
                    "--replace"))["action"] == "unchanged"
    updated = data(cli("--json", "task", "add", "fetch", "http.FetchDigest", "--retries", "1", "--replace"))
    assert updated["action"] == "updated" and updated["task"]["retries"] == 1
    assert updated["task"]["timeout"] == 30.0  # a flag left out keeps its value

    assert data(cli("--json", "task", "remove", "fetch")) == {"action": "removed", "task": "fetch"}
    refused(cli("task", "show", "fetch"), 2, "task 'fetch' does not exist")
    refused(cli("task", "remove", "fetch"), 2, "task 'fetch' does not exist")


@pytest.mark.parametrize("script, words", [
    ("nosuch.Thing", ["no file task_nosuch.py"]),
    ("example.Nope", ["has no Task class Nope", "example.VeryLong"]),
    ("justaname", ["is not a task script reference"]),
    ("syntax.Oops", ["line 6", "syntax error"]),
])
def test_task_add_refuses_unknown_scripts(cli: Run, script: str, words: list[str]) -> None:
    refused(cli("task", "add", "x", script), 2, *words)
    assert data(cli("--json", "task", "list")) == []


def test_routine_commands(cli: Run, with_routine: Run) -> None:
    shown = data(cli("--json", "routine", "show", "sum"))
    assert shown["tasks"] == ["add", "echo", "add"] and shown["enabled"] is True and shown["mqtt"] is True
    assert shown["status"] == "steps"
    made = data(cli("--json", "routine", "add", "timed", "echo", "--schedule", "*/5 * * * *", "--timezone",
                    "Europe/Oslo", "--no-mqtt", "--mode", "queued", "--max", "3", "--timeout", "2m",
                    "--jitter", "10", "--status", "states"))
    r = made["routine"]
    assert made["action"] == "created"
    assert (r["schedule"], r["timezone"], r["mqtt"], r["mode"], r["max"], r["timeout"], r["jitter"], r["status"]) == (
        "*/5 * * * *", "Europe/Oslo", False, "queued", 3, 120.0, 10.0, "states")
    assert [x["name"] for x in data(cli("--json", "routine", "list"))] == ["sum", "timed"]
    text = ok(cli("routine", "list")).stdout
    assert "*/5 * * * *" in text and "add -> echo -> add" in text and "STATUS" in text
    assert "status       states (state changes only)" in ok(cli("routine", "show", "timed")).stdout

    assert data(cli("--json", "routine", "disable", "sum"))["routine"]["enabled"] is False
    refused(cli("submit", "sum"), 2, "disabled", "flowctl routine enable sum")
    # Adding an existing routine is refused (the user would lose its steps) unless
    # --replace; replacing keeps the disabled state; only enable turns it on.
    refused(cli("routine", "add", "sum", "add"), 2, "routine 'sum' exists already (add -> echo -> add)", "--replace")
    assert data(cli("--json", "routine", "show", "sum"))["tasks"] == ["add", "echo", "add"]
    assert data(cli("--json", "routine", "add", "sum", "add", "--replace"))["routine"]["enabled"] is False
    assert data(cli("--json", "routine", "enable", "sum"))["routine"]["enabled"] is True

    refused(cli("task", "remove", "echo"), 2, "used by routine(s)", "timed")
    ok(cli("routine", "remove", "timed"))
    refused(cli("routine", "show", "timed"), 2, "routine 'timed' does not exist")
    refused(cli("routine", "enable", "timed"), 2, "routine 'timed' does not exist")


@pytest.mark.parametrize("extra, words", [
    (["ghost"], ["task 'ghost' does not exist"]),
    (["add", "--schedule", "61 * * * *"], ["61"]),
    (["add", "--schedule", "every day"], ["schedule"]),
    (["add", "--schedule", "@every 5m", "--timezone", "Mars/Olympus"], ["Mars/Olympus"]),
    (["add", "--timezone", "Nowhere/Town"], ["Nowhere/Town"]),
    (["add", "--status", "all"], ["--status", "'all'", "steps", "states", "off"]),
])
def test_routine_add_refusals(cli: Run, with_routine: Run, extra: list[str], words: list[str]) -> None:
    refused(cli("routine", "add", "bad", *extra), 2, *words)
    assert [r["name"] for r in data(cli("--json", "routine", "list"))] == ["sum"]


def test_bad_routine_name_exits_2(cli: Run, with_routine: Run) -> None:
    refused(cli("routine", "add", "bad name", "add"), 2, "not valid")


# --------------------------------------------------------------------------- apply
def test_apply_is_idempotent_and_prunes_on_request(cli: Run, tmp_path: Path) -> None:
    path = tmp_path / "defs.toml"
    shutil.copy(ROOT / "config" / "routines.toml", path)
    first = data(cli("--json", "apply", str(path)))
    assert first["changed"] is True
    assert set(first["routines"]["created"]) == {"read-sensor", "slow-demo", "heartbeat"}
    second = data(cli("--json", "apply", str(path)))
    assert second["changed"] is False and not second["tasks"]["created"] and not second["routines"]["updated"]
    assert "nothing changed" in ok(cli("apply", str(path))).stdout

    ok(cli("task", "add", "extra", "example.Echo"))
    kept = data(cli("--json", "apply", str(path)))
    assert kept["changed"] is False and "extra" in [t["name"] for t in data(cli("--json", "task", "list"))]
    pruned = data(cli("--json", "apply", str(path), "--prune"))
    assert pruned["tasks"]["removed"] == ["extra"]


def test_apply_refuses_a_bad_file_whole(cli: Run, tmp_path: Path) -> None:
    path = tmp_path / "defs.toml"
    path.write_text('[tasks.ok]\nscript = "example.Echo"\n\n[routines.r]\ntasks = ["ok"]\nschedule = "* * 32 * *"\n')
    line = refused(cli("apply", str(path)), 2, str(path), "[routines.r] schedule", "32")
    assert "nothing applied" in line
    assert data(cli("--json", "task", "list")) == []
    refused(cli("apply", str(tmp_path / "none.toml")), 2, "does not exist")


# --------------------------------------------------------------------------- submitting and flows
def test_submit_without_daemon_queues_the_flow(cli: Run, with_routine: Run) -> None:
    flow = data(cli("--json", "submit", "sum", "7", "word", "[1,2]", "--kw", "n=3", "--kw", 'x={"a": 1}',
                    "--kw", "city=Oslo", "--kw", "flag=true", "--kw", "big=NaN"))
    assert flow["created"] is True and flow["state"] == "INIT" and flow["trigger"] == "cli"
    assert flow["args"] == [7, "word", [1, 2]]
    assert flow["kwargs"] == {"n": 3, "x": {"a": 1}, "city": "Oslo", "flag": True, "big": "NaN"}
    assert flow["steps"] == ["add", "echo", "add"]
    assert f"flow {flow['id'] + 1} submitted (sum, INIT)" in ok(cli("submit", "sum")).stdout
    mixed = data(cli("--json", "submit", "sum", "1", "--kw", "n=3", "2", "three"))
    assert mixed["args"] == [1, 2, "three"] and mixed["kwargs"] == {"n": 3}

    first = data(cli("--json", "submit", "sum", "--request-id", "r-17"))
    again = data(cli("--json", "submit", "sum", "--request-id", "r-17", "--kw", "n=9"))
    assert again["id"] == first["id"] and again["created"] is False
    assert "already exists for request id 'r-17'" in ok(cli("submit", "sum", "--request-id", "r-17")).stdout

    refused(cli("submit", "nosuch"), 2, "routine 'nosuch' does not exist")


def test_flows_flow_show_cancel_retry_prune(cli: Run, with_routine: Run) -> None:
    ok(cli("routine", "add", "other", "echo"))
    ids = [data(cli("--json", "submit", name))["id"] for name in ("sum", "sum", "other")]
    listed = data(cli("--json", "flows"))
    assert [f["id"] for f in listed] == ids[::-1]
    assert [f["id"] for f in data(cli("--json", "flows", "--routine", "other"))] == [ids[2]]
    assert [f["id"] for f in data(cli("--json", "flows", "--limit", "1"))] == [ids[2]]
    assert "(the 2 newest; --limit N shows more)" in ok(cli("flows", "--limit", "2")).stdout
    assert data(cli("--json", "flows", "--state", "done")) == []
    text = ok(cli("flows")).stdout
    assert text.splitlines()[0].split() == ["ID", "ROUTINE", "STATE", "STEP", "TRIGGER", "CREATED", "TIME"]
    assert "no flows match" in ok(cli("flows", "--state", "FAILED")).stdout

    shown = data(cli("--json", "flow", "show", str(ids[0])))
    assert shown["state"] == "INIT" and shown["trace"] == [] and shown["steps"] == ["add", "echo", "add"]
    text = ok(cli("flow", "show", str(ids[0]))).stdout
    assert text.count("not run") == 3 and max(len(line) for line in text.splitlines()) <= 80
    refused(cli("flow", "show", "999"), 2, "flow '999' does not exist")

    cancelled = data(cli("--json", "flow", "cancel", str(ids[0])))
    assert cancelled["state"] == "CANCELLED" and cancelled["error"] == "cancelled with flowctl"
    refused(cli("flow", "cancel", str(ids[0])), 2, "already ended")
    refused(cli("flow", "retry", str(ids[1])), 2, "only FAILED or CANCELLED")
    assert data(cli("--json", "flows", "--state", "cancelled"))[0]["id"] == ids[0]
    assert data(cli("--json", "prune", "--older-than", "1d"))["removed"] == 0
    assert data(cli("--json", "prune", "--older-than", "0"))["removed"] == 1
    refused(cli("flow", "show", str(ids[0])), 2, "does not exist")

    ok(cli("flow", "cancel", str(ids[1])))
    retried = data(cli("--json", "flow", "retry", str(ids[1])))
    assert retried["state"] == "INIT" and retried["error"] is None


def test_wait_timeout_stops_waiting_not_the_flow(cli: Run, with_routine: Run) -> None:
    # No workers run: the flow stays queued, --timeout gives up waiting with 124.
    result = cli("submit", "sum", "--wait", "--timeout", "0.5")
    assert result.returncode == 124, result
    assert "Traceback" not in result.stderr
    assert "queued, waiting for a worker" in result.stdout
    assert "goes on" in result.stderr and "flowctl flow show" in result.stderr
    assert data(cli("--json", "flows"))[0]["state"] == "INIT"


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
def test_ctrl_c_stops_waiting_not_the_flow(with_routine: Run, config_file: Callable[..., Path], sigint: Any) -> None:
    # Also when flowctl starts with SIGINT ignored (nohup, `&` in a script, CI runners).
    proc = subprocess.Popen([sys.executable, "-m", "flowd.cli.cli", "--config", str(config_file()), "submit", "sum",
                             "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=flowd_env(),
                            cwd=str(ROOT), preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "queued, waiting for a worker" in first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "stopped waiting" in err and "flowctl flow show" in err
    flows = data(with_routine("--json", "flows"))
    assert flows[0]["state"] == "INIT"


# --------------------------------------------------------------------------- with real workers
def test_submit_wait_follows_the_flow_to_done(cli: Run, with_routine: Run, worker_pool: Any) -> None:
    result = ok(cli("submit", "sum", "--kw", "total=1", "--wait", "--timeout", "30", timeout=90))
    lines = result.stdout.strip().splitlines()
    assert any("DONE after" in line for line in lines)
    assert '"total":5' in result.stdout
    final = data(cli("--json", "submit", "sum", "--wait"))
    assert final["state"] == "DONE" and final["result"]["kwargs"]["total"] == 4

    trace = data(cli("--json", "flow", "show", str(final["id"])))["trace"]
    assert [(t["position"], t["task"], t["attempt"], t["state"]) for t in trace] == [
        (0, "add", 1, "DONE"), (1, "echo", 1, "DONE"), (2, "add", 1, "DONE")]
    assert trace[0]["input"] == {"args": [], "kwargs": {}} and trace[2]["output"]["kwargs"]["total"] == 4
    text = ok(cli("flow", "show", str(final["id"]))).stdout
    assert "in " in text and "out " in text and max(len(line) for line in text.splitlines()) <= 80


def test_submit_wait_exits_1_when_the_flow_fails(cli: Run, worker_pool: Any, tmp_path: Path) -> None:
    counter = tmp_path / "runs.txt"
    ok(cli("task", "add", "flaky", "t.FailTimes", "--retries", "1", "--retry-delay", "1",
           "--option", f"counter={counter}", "--option", "times=5"))
    ok(cli("routine", "add", "flaky", "flaky"))
    result = cli("submit", "flaky", "--wait", "--timeout", "30", timeout=90)
    assert result.returncode == 1, result
    assert "FAILED after" in result.stdout and "failing on purpose" in result.stdout
    assert "try 1/2 failed, retrying" in result.stdout  # the retry showed as a change of its own
    flow = data(cli("--json", "flows"))[0]
    trace = data(cli("--json", "flow", "show", str(flow["id"])))["trace"]
    assert [t["state"] for t in trace] == ["FAILED", "FAILED"]
    assert "RuntimeError: failing on purpose" in trace[-1]["error"]
    assert "failing on purpose" in ok(cli("flow", "show", str(flow["id"]))).stdout

    ok(cli("task", "add", "flaky", "t.FailTimes", "--option", f"counter={counter}", "--option", "times=0", "--replace"))
    assert data(cli("--json", "flow", "retry", str(flow["id"])))["state"] in ("INIT", "RUNNING", "DONE")
    wait_for(lambda: data(cli("--json", "flows"))[0]["state"] in ("DONE", "FAILED"), timeout=30,
             message="the retried flow to end")
    again = data(cli("--json", "flow", "show", str(flow["id"])))
    assert again["state"] == "DONE", again
    assert [t["attempt"] for t in again["trace"]] == [1, 2, 3]  # retry resumed the step as a new attempt


def test_waiting_flows_and_sub_flows_are_shown(cli: Run, with_routine: Run, worker_pool: Any) -> None:
    # A step that waits for an MQTT message parks its flow WAITING: --wait says on what,
    # flow show shows the topic and match. A SubFlow step links parent and child.
    ok(cli("task", "add", "door", "t.WaitFor", "--option", "topic=sensors/door/+",
           "--option", 'match={"open": true}'))
    ok(cli("routine", "add", "door", "door", "echo"))
    result = cli("submit", "door", "--wait", "--timeout", "3")
    assert result.returncode == 124, result
    assert "WAITING step 1/2 door, waiting for a message on 'sensors/door/+'" in result.stdout
    flow = data(cli("--json", "flows"))[0]
    shown = data(cli("--json", "flow", "show", str(flow["id"])))
    assert shown["state"] == "WAITING"
    assert shown["waiting_for"] == {"topic": "sensors/door/+", "match": {"open": True}, "until": None}
    text = ok(cli("flow", "show", str(flow["id"]))).stdout
    assert "waiting    for a message on 'sensors/door/+' matching {\"open\":true}" in text
    assert data(cli("--json", "flow", "cancel", str(flow["id"])))["state"] == "CANCELLED"

    ok(cli("task", "add", "spawn", "t.Spawn", "--option", "child=sum"))
    ok(cli("routine", "add", "parent", "spawn", "echo"))
    parent = data(cli("--json", "submit", "parent", "--kw", "total=10", "--wait", "--timeout", "30", timeout=90))
    assert parent["state"] == "DONE" and parent["result"]["kwargs"]["total"] == 14
    assert len(parent["children"]) == 1 and parent["children"][0]["routine"] == "sum"
    child_id = parent["children"][0]["id"]
    child = data(cli("--json", "flow", "show", str(child_id)))
    assert child["parent"] == parent["id"] and child["trigger"] == "flow"
    assert f"child      flow {child_id} (sum, DONE)" in ok(cli("flow", "show", str(parent["id"]))).stdout
    assert f"parent     flow {parent['id']}" in ok(cli("flow", "show", str(child_id))).stdout


def test_wait_redraws_one_line_on_a_terminal(with_routine: Run, worker_pool: Any,
                                             config_file: Callable[..., Path]) -> None:
    ok(with_routine("task", "add", "nap", "t.Sleep", "--option", "seconds=0.6"))
    ok(with_routine("routine", "add", "naps", "nap", "nap"))
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flowd.cli.cli", "--config", str(config_file()), "submit", "naps",
                             "--wait"], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                            env=flowd_env({"COLUMNS": "80"}), cwd=str(ROOT))
    os.close(terminal)
    chunks = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        proc.wait(10)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
    out = b"".join(chunks).decode()
    assert proc.returncode == 0, out
    assert "\r" in out and "\x1b[K" in out
    assert "step 2/2 nap" in out and "DONE after" in out


# --------------------------------------------------------------------------- status
def test_status_without_and_with_a_daemon_heartbeat(cli: Run, with_routine: Run,
                                                    config_file: Callable[..., Path]) -> None:
    ok(cli("submit", "sum"))
    status = data(cli("--json", "status"))
    assert status["daemon_running"] is False and status["nodes"] == []
    assert status["flows"]["INIT"] == 1 and status["queue_depth"] == 1
    assert status["outbox"] >= 0
    text = ok(cli("status")).stdout
    assert "not running" in text and "1 waiting" in text
    # Every line fits 80 columns but the database's and the config file's paths, shown whole.
    assert max(len(line) for line in text.splitlines() if not line.startswith(("database", "config"))) <= 80

    # What the daemon writes about itself: this test process stands in for its pid.
    from flowd.store.models import utcnow

    conn = sqlite3.connect(db_path(config_file))
    now = utcnow().isoformat(sep=" ")
    with conn:
        conn.execute("INSERT INTO node_status (node_id, pid, version, started_at, heartbeat_at, broker_connected)"
                     " VALUES ('testnode', ?, '0.1.0', ?, ?, 1)", (os.getpid(), now, now))
    status = data(cli("--json", "status"))
    assert status["daemon_running"] is True and status["nodes"][0]["broker_connected"] is True
    assert "running on testnode" in ok(cli("status")).stdout
    with conn:
        conn.execute("UPDATE node_status SET pid = 999999999")
    assert data(cli("--json", "status"))["daemon_running"] is False
    conn.close()


def test_status_and_wait_with_the_real_daemon(cli: Run, with_routine: Run, broker: Any,
                                              config_file: Callable[..., Path], flowd_proc: Any) -> None:
    # flowd runs with its broker: status shows it alive and connected, a flow submitted
    # with --wait runs to DONE; the broker goes away and status says so; SIGTERM leaves
    # the daemon "stopped".
    path = config_file(broker=broker)
    daemon = flowd_proc(path)

    def status() -> Any:
        return data(cli("--json", "status", config=path))

    wait_for(lambda: status()["daemon_running"] and status()["nodes"][0]["broker_connected"], timeout=30,
             message="flowctl status to see the daemon connected")
    node = status()["nodes"][0]
    assert node["node_id"] == "testnode" and node["pid"] == daemon.pid
    text = ok(cli("status", config=path)).stdout
    assert "running on testnode" in text and "connected" in text

    done = data(cli("--json", "submit", "sum", "--wait", "--timeout", "30", config=path, timeout=90))
    assert done["state"] == "DONE" and done["result"]["kwargs"]["total"] == 4

    broker.stop()
    wait_for(lambda: status()["nodes"][0]["broker_connected"] is False, timeout=30,
             message="status to show the broker link down")
    down = ok(cli("status", config=path)).stdout
    assert f"NOT connected to 127.0.0.1:{broker.port}" in down
    assert f"mosquitto_pub -h 127.0.0.1 -p {broker.port}" in down
    assert "systemctl start mosquitto" in down
    assert daemon.terminate() == 0
    stopped = status()
    assert stopped["daemon_running"] is False and stopped["nodes"][0]["stopped_at"]
    assert "stopped on testnode" in ok(cli("status", config=path)).stdout
