"""kill -9 at any instant loses no flow and runs no finished step twice; upgrades keep data."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peewee
from conftest import Broker, wait_for

from flowd import api, catalog
from flowd.config import DatabaseSection, load_config
from flowd.store import migrations
from flowd.store.migrations import init_database
from flowd.store.models import Flow, Routine, TaskResult


def test_kill_9_mid_run_then_restart_finishes_every_flow_once(
        broker: Broker, config_file: Callable[..., Path], flowd_proc: Callable[..., Any], tmp_path: Path) -> None:
    # 20 three-step flows whose middle step sleeps; every process of flowd is killed with
    # SIGKILL while steps run, twice; after the last restart all 20 end DONE and no step
    # whose result was committed before a kill ran again (executions counted in a file).
    counter = tmp_path / "executions"
    path = config_file(broker, workers=2)
    engine = api.configure(load_config(path), create=True)
    paths = engine.config.flowd.task_paths
    catalog.save_task("first", "t.Count", task_paths=paths, options={"counter": str(counter), "label": "s"})
    catalog.save_task("middle", "t.Count", task_paths=paths,
                      options={"counter": str(counter), "label": "s", "sleep": 0.4})
    catalog.save_task("last", "t.Count", task_paths=paths, options={"counter": str(counter), "label": "s"})
    catalog.save_routine("crash3", ["first", "middle", "last"], max=20)
    ids = [api.submit_flow("crash3", n=i).id for i in range(20)]

    committed_before_kills: set[tuple[int, int]] = set()
    for _ in range(2):
        daemon = flowd_proc(path)
        wait_for(lambda: TaskResult.select().where((TaskResult.position == 1) & (TaskResult.state == "RUNNING"))
                 .exists(), 30, message="a middle step to be running")
        daemon.kill9()
        committed_before_kills |= {(r.flow_id, r.position) for r in
                                   TaskResult.select().where(TaskResult.state == "DONE")}
    assert committed_before_kills, "the kills came before any step finished"
    interrupted = TaskResult.select().where(TaskResult.state == "RUNNING").count()
    assert interrupted >= 1

    daemon = flowd_proc(path)
    wait_for(lambda: Flow.select().where(Flow.id.in_(ids) & (Flow.state == "DONE")).count() == 20, 60,
             0.1, "all 20 flows to finish")
    daemon.terminate()
    runs = Counter(tuple(int(x) for x in line.split(":")[1:]) for line in counter.read_text().splitlines())
    for flow_id in ids:
        for position in range(3):
            assert runs[(flow_id, position)] >= 1, f"flow {flow_id} step {position} never ran"
    twice = {key for key in committed_before_kills if runs[key] != 1}
    assert not twice, f"finished steps ran again after restart: {sorted(twice)}"
    # Interrupted attempts are on record and did not use up a retry (retries = 0 here).
    assert TaskResult.select().where(TaskResult.error.contains("interrupted")).count() >= interrupted


def test_schema_v1_database_upgrades_with_data_intact(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = peewee.SqliteDatabase(str(path))
    migrations.create_v1_schema(old)
    old.execute_sql("INSERT INTO task (name, script, options, retries, retry_delay, retry_backoff_max, created_at,"
                    " updated_at) VALUES ('fetch', 'http.FetchDigest', '{\"url\": \"http://x\"}', 3, 5, 300,"
                    " '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    old.execute_sql("INSERT INTO routine (name, mqtt, mode, max, enabled, created_at, updated_at)"
                    " VALUES ('weather', 1, 'single', 10, 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    old.execute_sql("INSERT INTO routine_step (routine_id, position, task_id) VALUES (1, 0, 1)")
    old.execute_sql("INSERT INTO flow (uid, routine, steps, state, position, args, kwargs, trigger, admitted,"
                    " dispatch_token, step_attempt, interruptions, result, created_at, updated_at) VALUES"
                    " ('u-1', 'weather', '[\"fetch\"]', 'DONE', 0, '[]', '{\"city\": \"Oslo\"}', 'mqtt', 1, 1, 0, 0,"
                    " '{\"args\": [], \"kwargs\": {\"t\": 3}}', '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    old.close()
    assert "wait_topic" not in {c.name for c in peewee.SqliteDatabase(str(path)).get_columns("flow")}

    db = init_database(DatabaseSection(url=f"sqlite:///{path}"))
    assert migrations.schema_version(db) == migrations.LATEST
    flow = Flow.get(Flow.uid == "u-1")
    assert (flow.routine, flow.state, flow.kwargs, flow.result) == (
        "weather", "DONE", {"city": "Oslo"}, {"args": [], "kwargs": {"t": 3}})
    assert (flow.depth, flow.parent_id, flow.wait_topic) == (0, None, None)
    assert Routine.get(Routine.name == "weather").task_names() == ["fetch"]
    assert Routine.get(Routine.name == "weather").status == "steps"  # v4
    # The upgraded file has exactly the columns the models describe.
    for model in (Flow, Routine, TaskResult):
        table = model._meta.table_name
        assert {c.name for c in db.get_columns(table)} == {f.column_name for f in model._meta.sorted_fields}
    # The upgraded file has exactly the indexes a new database gets.
    indexes = {i.name for i in db.get_indexes("flow")}
    assert "flow_routine" not in indexes and "flow_routine_state" in indexes
    assert "flow_uid" not in indexes  # v5: a random page written per new flow, for no query
    assert "task_result_flow_id" not in {i.name for i in db.get_indexes("task_result")}
    db.close()
    fresh = init_database(DatabaseSection(url=f"sqlite:///{tmp_path / 'new.db'}"))
    wanted = {table: {i.name for i in fresh.get_indexes(table)} for table in ("flow", "task_result", "outbox")}
    fresh.close()
    db = init_database(DatabaseSection(url=f"sqlite:///{path}"))
    assert {table: {i.name for i in db.get_indexes(table)} for table in wanted} == wanted
    # Opening it again is a no-op.
    db.close()
    db = init_database(DatabaseSection(url=f"sqlite:///{path}"))
    assert Flow.select().count() == 1
    db.close()


def test_database_is_wal_and_private(config: Any, db: Any) -> None:
    path = Path(config.database.url[len("sqlite:///"):])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert path.stat().st_mode & 0o077 == 0
    assert Path(config.queue.path).stat().st_mode & 0o077 == 0
