"""Damaged SQLite files (SPEC 7): flowd refuses them, ``flowctl db check`` names the damage,
``flowctl db recover`` brings back every flow that can still be read.

Every file here is a real flowd database filled by flowd itself (flows run by real
workers), then damaged by overwriting bytes the way a failing SD card or a torn write
does. Each test first shows, with SQLite itself, that the file really is damaged.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, flowd_env, wait_for

from flowd import api, catalog
from flowd.store.models import Flow, FlowState

Run = Callable[..., subprocess.CompletedProcess[str]]
PAGE = 4096
STATUS = "flowd/testnode/status"


# --------------------------------------------------------------------------- building and damaging files
@pytest.fixture
def filled(db: Any, worker_pool: Any, task_dir: Path) -> Iterator[Path]:
    """flowd.db with 200 flows: 120 DONE and 30 FAILED (run by real workers), 50 still INIT."""
    paths = [str(task_dir)]
    catalog.save_task("add", "t.Add", options={"n": 2}, task_paths=paths)
    catalog.save_task("fail", "t.Fail", task_paths=paths)
    catalog.save_routine("sum", ["add", "add"], max=500)
    catalog.save_routine("bad", ["fail"], max=500)
    for i in range(150):
        api.submit_flow("sum" if i % 5 else "bad", i, note="x" * 150, request_id=f"r-{i}")
    wait_for(lambda: Flow.select().where(Flow.state.in_(["DONE", "FAILED"])).count() == 150, timeout=60,
             message="150 flows ended")
    worker_pool.stop(grace=2)
    for i in range(150, 200):
        api.submit_flow("sum", i, note="y" * 150, request_id=f"r-{i}")
    path = Path(db.config.database.url.removeprefix("sqlite:///"))
    api.reset()
    checkpoint(path)
    yield path


def checkpoint(path: Path) -> None:
    """Move every committed page from the WAL into the file, so the damage below is all there is."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)
    finally:
        conn.close()


def snapshot(path: Path) -> dict[int, tuple[Any, ...]]:
    """Every flow as flowd stored it, with its step results."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        flows = {row[0]: row[1:] for row in conn.execute(
            "SELECT id, uid, routine, state, position, args, kwargs, request_id, result, error FROM flow")}
        steps: dict[int, list[tuple[Any, ...]]] = {}
        for row in conn.execute("SELECT flow_id, position, attempt, state, output FROM task_result "
                                "ORDER BY flow_id, position, attempt"):
            steps.setdefault(row[0], []).append(row[1:])
    finally:
        conn.close()
    return {flow_id: (*values, tuple(steps.get(flow_id, []))) for flow_id, values in flows.items()}


def leaves(path: Path, table: str = "flow") -> list[tuple[int, list[int]]]:
    """(page, rowids on it) for each leaf of ``table``, in key order (SQLite's dbstat)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ids = [row[0] for row in conn.execute(f"SELECT rowid FROM {table} ORDER BY rowid")]
        found = conn.execute("SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path",
                             (table,)).fetchall()
    finally:
        conn.close()
    assert len(found) > 2 and sum(n for _, n in found) == len(ids)
    placed, start = [], 0
    for page, cells in found:
        placed.append((page, ids[start:start + cells]))
        start += cells
    return placed


def root_page(path: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0])
    finally:
        conn.close()


def overwrite(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xa5" * length)
        handle.flush()
        os.fsync(handle.fileno())


def sqlite_says(path: Path, pragma: str = "quick_check") -> str:
    """What SQLite itself says of the file: 'ok', its findings, or the error it raises."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(str(row[0]) for row in conn.execute(f"PRAGMA {pragma}"))
    except sqlite3.DatabaseError as exc:
        return f"error: {exc}"
    finally:
        conn.close()


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def retained_status(mqtt_client: Any) -> list[Any]:
    """The retained status a newcomer gets: subscribe, then wait for a marker sent after it."""
    client = mqtt_client()
    client.subscribe(STATUS)
    client.subscribe("test/marker")
    client.publish("test/marker", {"marker": True})
    wait_for(lambda: client.json_on("test/marker"), message="the marker")
    return list(client.json_on(STATUS))


@pytest.fixture
def cli(flowctl: Run) -> Run:
    return flowctl


# --------------------------------------------------------------------------- the daemon refuses
def test_flowd_refuses_a_damaged_database_with_one_line_and_exit_4(
        filled: Path, broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        mqtt_client: Any, cli: Run) -> None:
    # A leaf page of the flow table is garbage. flowd run says so in one line naming the
    # file and what to run, exits 4 (flowd.service: RestartPreventExitStatus=4), and never
    # connects: no retained "online" for anyone, no status message at all.
    page, _ = leaves(filled)[5]
    overwrite(filled, (page - 1) * PAGE, PAGE)
    assert "malformed" in sqlite_says(filled)

    watcher = session_client(["flowd/#"])
    proc = flowd_proc(config_file(broker=broker))
    assert proc.proc.wait(30) == 4
    log = proc.log_text()
    assert "Traceback" not in log
    [line] = error_lines(log)
    assert f"the database {filled} is damaged" in line and "malformed" in line
    assert "'flowctl db check'" in line and "'flowctl db recover'" in line
    assert "worker pool started" not in log and "MQTT: connecting" not in log
    assert watcher.json_on(STATUS) == []
    assert retained_status(mqtt_client) == []

    # flowctl: db check reports the damage (exit 3, SPEC 6: the database cannot be used)...
    check = cli("db", "check")
    assert check.returncode == 3, check.stderr
    assert f"{filled}: DAMAGED" in check.stdout and "flowctl db recover" in check.stdout
    assert f"page {page}, table flow: not a b-tree page" in check.stdout  # flowd's reader names page and table
    report = json.loads(cli("--json", "db", "check").stdout)
    assert report["ok"] is False
    assert report["files"][0]["ok"] is False and report["files"][1]["ok"] is True
    # ...and another command that reads the damaged page says what to do.
    flows = cli("flows", "--limit", "500")
    assert flows.returncode == 3 and "flowctl db recover" in flows.stderr and "Traceback" not in flows.stderr


def test_recover_brings_back_every_flow_that_can_be_read(
        filled: Path, broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        cli: Run) -> None:
    # One leaf page of the flow table is destroyed: the flows on it are gone, every other
    # flow comes back exactly as it was (state, data, result, every step), the report
    # names the lost ids and their states (read from the state index), the damaged file
    # is kept, and flowd then starts on the new file and finishes the flows left INIT.
    before = snapshot(filled)
    assert len(before) == 200
    page, on_page = leaves(filled)[8]
    overwrite(filled, (page - 1) * PAGE, PAGE)
    assert "malformed" in sqlite_says(filled)
    damaged_bytes = filled.read_bytes()

    result = cli("--json", "db", "recover")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["action"] == "recovered"
    after = snapshot(filled)
    assert set(after) == set(before) - set(on_page)
    assert all(after[i] == before[i] for i in after)
    assert report["tables"]["flow"]["lost_ids"] == on_page
    assert report["tables"]["flow"]["seen"] == 200 and report["tables"]["flow"]["saved"] == 200 - len(on_page)
    lost_states: dict[str, int] = {}
    for flow_id in on_page:
        lost_states[before[flow_id][2]] = lost_states.get(before[flow_id][2], 0) + 1
    assert report["lost_flows"] == lost_states
    assert sum(report["flows_after"].values()) == 200 - len(on_page)
    # The step results of the lost flows pointed at nothing: dropped, and counted.
    lost_steps = sum(len(before[i][-1]) for i in on_page)
    assert report["tables"]["task_result"]["dropped"] == lost_steps
    assert sqlite_says(filled, "integrity_check") == "ok"
    assert sqlite_says(filled, "foreign_key_check") == ""
    kept = Path(report["kept_as"])
    assert kept.parent == filled.parent and kept.name.startswith("flowd.db.damaged-")
    assert kept.read_bytes() == damaged_bytes

    text = cli("db", "recover", "--force").stdout
    assert "recovered" in text  # --force rebuilds a healthy file too
    assert cli("db", "recover").stdout.startswith(f"the database {filled} passes integrity_check")
    check = cli("db", "check", "--full")
    assert check.returncode == 0 and f"{filled}: ok (integrity_check" in check.stdout

    watcher = session_client(["flowd/#", "flow/+/result"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: any(m["state"] == "online" for m in watcher.json_on(STATUS)), timeout=30,
             message=f"flowd online on the recovered file; log:\n{proc.log_text()}")
    waiting = [i for i, flow in after.items() if flow[2] == FlowState.INIT.value]
    assert waiting
    wait_for(lambda: {m["flow_id"] for m in watcher.json_on("flow/+/result")} >= set(waiting), timeout=60,
             message="the INIT flows finished")
    assert proc.terminate() == 0


def test_recover_says_which_flows_lost_step_records(filled: Path, cli: Run) -> None:
    # A leaf page of task_result is destroyed: every flow is saved, the lost step records
    # are counted, and the report names the flows they belonged to (the flow_id index
    # still lists them).
    before = snapshot(filled)
    page, on_page = leaves(filled, "task_result")[4]
    conn = sqlite3.connect(f"file:{filled}?mode=ro", uri=True)
    owners = sorted({row[0] for row in conn.execute(
        f"SELECT flow_id FROM task_result WHERE id IN ({','.join(map(str, on_page))})")})
    conn.close()
    overwrite(filled, (page - 1) * PAGE, PAGE)
    assert "malformed" in sqlite_says(filled)
    report = json.loads(cli("--json", "db", "recover").stdout)
    after = snapshot(filled)
    assert set(after) == set(before)
    assert all(after[i][:-1] == before[i][:-1] for i in after)
    assert report["tables"]["task_result"]["lost_ids"] == on_page
    assert report["flows_missing_steps"] == owners
    assert {i for i in after if after[i][-1] != before[i][-1]} == set(owners)


def test_recover_relinks_the_rows_of_a_damaged_interior_page(filled: Path, cli: Run) -> None:
    # The flow table's root (an interior page) is destroyed: SQLite reaches none of its
    # 200 rows, but the leaf pages are intact and the pointer map still names their
    # parent, so every flow comes back.
    before = snapshot(filled)
    overwrite(filled, (root_page(filled, "flow") - 1) * PAGE, PAGE)
    assert "malformed" in sqlite_says(filled)
    report = json.loads(cli("--json", "db", "recover").stdout)
    assert snapshot(filled) == before
    assert report["tables"]["flow"]["adopted"] == 200 and report["tables"]["flow"]["lost_ids"] == []
    assert report["lost_and_found"] == 0


def test_damaged_header_is_refused_then_recovered(
        filled: Path, config_file: Callable[..., Path], flowd_proc: Any, cli: Run) -> None:
    # The first 100 bytes (the header) are overwritten: SQLite does not even see a
    # database. flowd refuses with that reason; db recover reads the pages without the
    # header (page size found from the pages) and brings back everything.
    before = snapshot(filled)
    overwrite(filled, 0, 100)
    assert sqlite_says(filled) == "error: file is not a database"

    proc = flowd_proc(config_file())
    assert proc.proc.wait(30) == 4
    [line] = error_lines(proc.log_text())
    assert "file is not a database" in line
    check = cli("db", "check")
    assert check.returncode == 3 and "the file header (first 100 bytes) is damaged" in check.stdout

    result = cli("db", "recover")
    assert result.returncode == 0, result.stderr
    assert "its header was damaged: read with page size 4096" in result.stdout
    assert snapshot(filled) == before


def test_recover_reads_committed_pages_from_the_write_ahead_log(filled: Path, cli: Run) -> None:
    # A writer was killed (-9) after committing: its pages are only in flowd.db-wal. Then
    # the header of flowd.db is damaged. The salvage replays the WAL's committed frames,
    # so the last commit is there too.
    code = (f"import os, sqlite3\nc = sqlite3.connect({str(filled)!r})\n"
            "c.execute(\"UPDATE flow SET state = 'CANCELLED', error = 'by the test' WHERE id = 3\")\n"
            "c.commit()\nos.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code], check=False, timeout=30)
    assert Path(f"{filled}-wal").stat().st_size > 0
    before = snapshot(filled)
    assert before[3][2] == "CANCELLED"
    overwrite(filled, 0, 100)
    assert sqlite_says(filled) == "error: file is not a database"
    report = json.loads(cli("--json", "db", "recover").stdout)
    assert report["wal_frames"] > 0
    assert snapshot(filled) == before
    assert Path(f"{report['kept_as']}-wal").stat().st_size > 0  # kept with the damaged file


def test_recover_refuses_while_flowd_runs(
        filled: Path, broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        cli: Run) -> None:
    watcher = session_client(["flowd/#"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: any(m["state"] == "online" for m in watcher.json_on(STATUS)), timeout=30,
             message="flowd online")
    result = cli("db", "recover", "--force")
    assert result.returncode == 3
    assert f"flowd (pid {proc.pid}) is running" in result.stderr and "stop it first" in result.stderr
    check = cli("db", "check")  # read-only: fine while it runs
    assert check.returncode == 0 and ": ok (quick_check" in check.stdout
    assert proc.terminate() == 0


# --------------------------------------------------------------------------- the queue file
def test_damaged_queue_file_is_set_aside_and_rebuilt_at_start(
        db: Any, task_dir: Path, broker: Any, config_file: Callable[..., Path], flowd_proc: Any,
        session_client: Any, cli: Run) -> None:
    # Flows were submitted with the daemon down (their messages are in queue.db); then the
    # queue file's header is destroyed. flowd keeps the damaged file, starts a new one,
    # says so in one warning, and recovery queues the flows again: they all run to DONE.
    catalog.save_task("add", "t.Add", task_paths=[str(task_dir)])
    catalog.save_routine("sum", ["add", "add"], max=50)
    ids = [api.submit_flow("sum", i).id for i in range(20)]
    queue_file = Path(db.config.queue.path)
    api.reset()
    from flowd.queue import queue as flowd_queue

    flowd_queue.get_huey().storage.close()
    checkpoint(queue_file)
    overwrite(queue_file, 0, 100)
    assert sqlite_says(queue_file) == "error: file is not a database"
    check = cli("db", "check")
    assert check.returncode == 3 and "queue file" in check.stdout and "sets it aside" in check.stdout

    watcher = session_client(["flowd/#", "flow/+/result"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: {m["flow_id"] for m in watcher.json_on("flow/+/result")} >= set(ids), timeout=60,
             message=f"every flow finished; log:\n{proc.log_text()}")
    assert all(m["state"] == "DONE" for m in watcher.json_on("flow/+/result"))
    warnings = [line for line in proc.log_text().splitlines() if "the queue file" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "queued again" in warnings[0]
    kept = list(queue_file.parent.glob("queue.db.damaged-*"))
    assert [k for k in kept if not k.name.endswith(("-wal", "-shm"))]
    assert sqlite_says(queue_file) == "ok"
    assert proc.terminate() == 0


# --------------------------------------------------------------------------- damage while running
def test_damage_met_while_running_stops_the_daemon(
        filled: Path, broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any,
        mqtt_client: Any) -> None:
    # flowd runs, online. Then the outbox table's page goes bad under it. The outbox
    # publisher meets "database disk image is malformed": instead of retrying forever
    # (looking alive, doing nothing) flowd stops with one clear line and exit 4, and the
    # broker's Last Will turns the retained status to offline.
    watcher = session_client(["flowd/#"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: any(m["state"] == "online" for m in watcher.json_on(STATUS)), timeout=30,
             message="flowd online")
    wait_for(lambda: _is_idle(filled), timeout=60, message="every flow ended and the outbox drained")
    wait_for(lambda: _try_checkpoint(filled), timeout=30, message="a full checkpoint")
    conn = sqlite3.connect(filled)
    conn.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")  # readers drop their page caches
    conn.commit()
    conn.close()
    overwrite(filled, (root_page(filled, "outbox") - 1) * PAGE, PAGE)
    assert "malformed" in sqlite_says(filled)

    assert proc.proc.wait(60) == 4
    log = proc.log_text()
    assert "Traceback" not in log
    [line] = error_lines(log)
    assert f"the database {filled} is damaged" in line and "malformed" in line and "flowctl db recover" in line
    assert "unexpected error" not in log
    wait_for(lambda: retained_status(mqtt_client)[-1]["state"] == "offline", timeout=10,
             message="the Last Will")


def _is_idle(path: Path) -> bool:
    """No flow left to run and nothing left to publish: the daemon writes nothing to the outbox now."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        active = conn.execute("SELECT COUNT(*) FROM flow WHERE state IN ('INIT', 'RUNNING')").fetchone()[0]
        return bool(active == 0 and conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0)
    finally:
        conn.close()


def _try_checkpoint(path: Path) -> bool:
    conn = sqlite3.connect(path, timeout=5)
    try:
        return bool(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0))
    finally:
        conn.close()


def test_flowctl_db_needs_sqlite_and_an_existing_file(cli: Run, config_file: Callable[..., Path]) -> None:
    missing = cli("db", "check")
    assert missing.returncode == 3 and "does not exist yet" in missing.stderr
    assert cli("db", "recover").returncode == 3
    pg = config_file(database={"url": "postgresql://flowd:s3cret@127.0.0.1:1/flowd"})
    refused = cli("db", "recover", config=pg)
    assert refused.returncode == 2 and "SQLite" in refused.stderr and "s3cret" not in refused.stderr
    env = flowd_env()
    helped = subprocess.run([sys.executable, "-m", "flowd.cli.cli", "db", "--help"], capture_output=True, text=True,
                            env=env, cwd=str(ROOT), timeout=30)
    assert helped.returncode == 0 and "check" in helped.stdout and "recover" in helped.stdout


# --------------------------------------------------------------------------- flowd's page reader itself
@pytest.mark.parametrize(("page_size", "auto_vacuum"), [(4096, 2), (1024, 0), (65536, 1), (512, 2)])
def test_page_reader_reads_what_sqlite_reads(tmp_path: Path, page_size: int, auto_vacuum: int) -> None:
    # On a healthy file the salvage reader must see exactly the rows SQLite sees: every
    # value type, rows spilling over overflow pages, deleted rows that must not come back
    # (free pages), and a last commit that lives only in the WAL (the connection stays
    # open, so nothing is checkpointed).
    import random

    from flowd.store import salvage

    rng = random.Random(page_size)

    def value() -> Any:
        pick = rng.random()
        if pick < 0.1:
            return None
        if pick < 0.3:
            return rng.randint(-2**63, 2**63 - 1) if rng.random() < 0.3 else rng.randint(-300, 300)
        if pick < 0.4:
            return rng.random() * 1e6
        if pick < 0.7:
            return "é☃" * rng.randint(0, 3000)
        return rng.randbytes(rng.randint(0, 20000))

    path = tmp_path / "t.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute(f"PRAGMA auto_vacuum = {auto_vacuum}")
    conn.execute("PRAGMA journal_mode = wal")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a, b TEXT, c BLOB, d REAL)")
    conn.execute("CREATE INDEX t_b ON t (b)")
    conn.execute("CREATE TABLE u (k TEXT PRIMARY KEY, v)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)",
                     [(i, value(), "x" * rng.randint(0, 9000), rng.randbytes(rng.randint(0, 100)), rng.random())
                      for i in range(1, 600)])
    conn.executemany("INSERT INTO u VALUES (?, ?)", [(f"k{i}", value()) for i in range(300)])
    conn.commit()
    conn.execute("DELETE FROM t WHERE id % 7 = 0")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("UPDATE t SET a = 'after the checkpoint' WHERE id = 5")
    conn.commit()
    try:
        truth_t = {row[0]: [None, *row[1:]] for row in conn.execute("SELECT * FROM t")}
        truth_u = {row[0]: list(row[1:]) for row in conn.execute("SELECT rowid, * FROM u")}
        found = salvage.read_file(path)
    finally:
        conn.close()
    assert found.wal_frames > 0 and found.page_size == page_size
    assert found.rows["t"] == truth_t and found.rows["u"] == truth_u
    assert found.rows["t"][5][1] == "after the checkpoint"
    assert found.bad_pages == {} and found.lost_and_found == []
    assert set(found.indexed["t"]["t_b"]) == set(truth_t)
