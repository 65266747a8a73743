"""The store's named operations, one contract run against each backend (SQLite file,
the machine's PostgreSQL): listings, traces, counts, the reaper's candidates, pruning,
the outbox publisher's reads and deletes, node heartbeats. Flows are made by the real
engine (no worker pool: they stay where the test puts them); the checks read back
through the store and, where the store must not be trusted, through the peewee models.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import peewee
import pytest
from conftest import create_pg_database, drop_pg_database

from flowd import api, catalog, store
from flowd.config import load_config
from flowd.errors import InputError
from flowd.store.models import Flow, Outbox, TaskResult, database, write_transaction

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, 250000)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: Any, config_file: Any) -> Iterator[Any]:
    """An engine on one database (the queue stays SqliteHuey: nothing here runs a step)."""
    sections: dict[str, Any] = {}
    dbname = None
    if request.param == "postgres":
        dbname = create_pg_database("flowd_store")
        sections = {"database": {"url": f"postgresql://postgres@127.0.0.1:5432/{dbname}"}}
    engine = api.configure(load_config(config_file(**sections)), create=True)
    paths = engine.config.flowd.task_paths
    catalog.save_task("add", "t.Add", task_paths=paths, timeout=7)
    catalog.save_task("plain", "t.Add", task_paths=paths)
    catalog.save_routine("pair", ["add", "plain"])
    catalog.save_routine("other", ["plain"])
    yield engine
    api.reset()
    if dbname:
        drop_pg_database(dbname)


def test_listings_traces_and_counts(engine: Any) -> None:
    ids = [engine.submit("pair", [n], now=NOW)[0].id for n in range(3)] + [engine.submit("other", now=NOW)[0].id]
    with write_transaction():
        Flow.update(state="DONE", finished_at=NOW).where(Flow.id == ids[0]).execute()
        Flow.update(parent=ids[1]).where(Flow.id.in_([ids[2], ids[3]])).execute()
        first, attempt = store.insert_result(ids[1], 0, "add", {"args": [1]}, 4242, NOW)
        store.update_result(first, state="FAILED", error="boom", finished_at=NOW)
        second, attempt2 = store.insert_result(ids[1], 0, "add", {"args": [1]}, 4242, NOW)
        store.insert_result(ids[1], 1, "plain", None, None, NOW)
    assert (attempt, attempt2) == (1, 2)

    listed = store.list_flows()
    assert [f.id for f in listed] == sorted(ids, reverse=True)
    assert isinstance(listed[0], store.Row) and listed[-1].args == [0] and listed[-1].created_at == NOW
    assert [f.id for f in store.list_flows(routine="pair", limit=2)] == [ids[2], ids[1]]
    assert [f.id for f in store.list_flows(state="DONE")] == [ids[0]]
    assert [f.id for f in api.list_flows("done", "pair")] == [ids[0]]
    with pytest.raises(InputError, match="unknown state 'FINISHED'"):
        api.list_flows("FINISHED")

    assert [(c.id, c.routine) for c in store.child_flows(ids[1])] == [(ids[2], "pair"), (ids[3], "other")]
    trace = api.flow_trace(ids[1])
    assert [(r.position, r.attempt, r.state, r.error) for r in trace] == [
        (0, 1, "FAILED", "boom"), (0, 2, "RUNNING", None), (1, 1, "RUNNING", None)]
    assert trace[0].input == {"args": [1]} and trace[0].finished_at == NOW and trace[0].id == first
    assert store.latest_attempt(ids[1], 0) == (2, "RUNNING")
    assert store.latest_attempt(ids[1], 5) == (0, None)
    counts = api.counts_by_state()
    assert counts == {"INIT": 3, "RUNNING": 0, "WAITING": 0, "DONE": 1, "FAILED": 0, "CANCELLED": 0}
    assert store.count_flows_by_state(["INIT", "WAITING"]) == {"INIT": 3, "WAITING": 0}
    assert second in {r.id for r in trace}


def test_the_reapers_candidates(engine: Any) -> None:
    held = engine.submit("pair", now=NOW)[0].id
    lost = engine.submit("pair", now=NOW)[0].id
    retrying = engine.submit("pair", now=NOW)[0].id
    fresh = engine.submit("other", now=NOW + dt.timedelta(minutes=5))[0].id
    deadline = NOW + dt.timedelta(seconds=30)
    with write_transaction():
        Flow.update(state="RUNNING", worker_pid=4242, node_id=engine.node_id, deadline=deadline
                    ).where(Flow.id == held).execute()
        Flow.update(next_attempt_at=NOW + dt.timedelta(minutes=2)).where(Flow.id == retrying).execute()
        attempt, _ = store.insert_result(held, 0, "add", None, 4242, NOW)
        store.insert_result(lost, 0, "add", None, None, NOW)  # no worker: not the reaper's to kill
    [running] = store.running_attempts(engine.node_id)
    assert (running.id, running.flow_id, running.position, running.task, running.worker_pid) == (
        attempt, held, 0, "add", 4242)
    assert (running.routine, running.deadline, running.timeout, running.started_at) == ("pair", deadline, 7.0, NOW)

    quiet = store.unheld_flows(NOW + dt.timedelta(minutes=1))
    assert [(f.id, f.dispatch_token) for f in quiet] == [(lost, 1)]  # held has a worker, retrying waits, fresh is new
    assert {f.id for f in store.unheld_flows(NOW + dt.timedelta(minutes=10))} == {lost, retrying, fresh}


def test_prune_removes_ended_flows_with_their_attempts_and_keeps_children(engine: Any) -> None:
    old, recent, running, child = (engine.submit("pair", now=NOW)[0].id for _ in range(4))
    with write_transaction():
        Flow.update(state="FAILED", finished_at=NOW - dt.timedelta(days=40)).where(Flow.id == old).execute()
        Flow.update(state="DONE", finished_at=NOW - dt.timedelta(days=1)).where(Flow.id == recent).execute()
        Flow.update(parent=old).where(Flow.id == child).execute()
        store.insert_result(old, 0, "add", None, None, NOW)
        store.insert_result(recent, 0, "add", None, None, NOW)
    assert api.prune(30 * 86400, now=NOW, dry_run=True) == store.count_ended_flows(NOW - dt.timedelta(days=30)) == 1
    assert store.count_failed_since(NOW - dt.timedelta(days=41)) == 1
    assert store.count_failed_since(NOW - dt.timedelta(days=39)) == 0
    assert api.prune(30 * 86400, now=NOW) == 1
    assert sorted(f.id for f in Flow.select()) == sorted([recent, running, child])
    assert [r.flow_id for r in TaskResult.select()] == [recent]
    assert Flow.get_by_id(child).parent_id is None
    assert api.prune(30 * 86400, now=NOW) == 0


def test_the_outbox_operations(engine: Any) -> None:
    with write_transaction():
        for n in range(5):
            store.insert_message(f"t/{n}", f'{{"n": {n}}}', n % 2, n == 3, "ab12" if n == 4 else None, NOW)
    rows = store.messages_after(0, 100)
    assert [(r[1], r[3], r[4], r[5]) for r in rows] == [
        ("t/0", 0, False, None), ("t/1", 1, False, None), ("t/2", 0, False, None), ("t/3", 1, True, None),
        ("t/4", 0, False, "ab12")]
    ids = [r[0] for r in rows]
    assert [r[0] for r in store.messages_after(ids[1], 2)] == ids[2:4]
    assert store.message_id_span() == (ids[0], ids[-1])
    assert store.count_messages() == 5 and store.has_messages()
    assert store.message_ids_up_to(ids[2]) == ids[:3]
    with write_transaction():
        assert store.drop_oldest_messages(2, keep={ids[0]}) == 2  # the handed-over oldest stays
    assert [o.id for o in Outbox.select().order_by(Outbox.id)] == [ids[0], ids[3], ids[4]]
    with write_transaction():
        store.delete_messages([ids[0], ids[4]])
    assert store.message_id_span() == (ids[3], ids[3])
    with write_transaction():
        store.delete_messages([ids[3]])
        assert store.drop_oldest_messages(3, keep=()) == 0
    assert not store.has_messages() and store.message_id_span() is None and store.count_messages() == 0


def test_deleting_messages_takes_those_named_and_no_other(engine: Any) -> None:
    # 3 and 5 ids: on SQLite the statement is written for 4 and 8 (the last id repeated).
    with write_transaction():
        for n in range(9):
            store.insert_message(f"t/{n}", "{}", 1, False, None, NOW)
    ids = [r[0] for r in store.messages_after(0, 100)]
    with write_transaction():
        store.delete_messages([ids[0], ids[2], ids[5]])
    assert [r[0] for r in store.messages_after(0, 100)] == [ids[1], ids[3], ids[4], ids[6], ids[7], ids[8]]
    with write_transaction():
        store.delete_messages([ids[1], ids[3], ids[4], ids[7], ids[8]])
    assert [r[0] for r in store.messages_after(0, 100)] == [ids[6]]


def test_node_heartbeats(engine: Any) -> None:
    later = NOW + dt.timedelta(seconds=30)
    with write_transaction():
        store.save_heartbeat("b-node", 11, "0.1.0", NOW, NOW, False)
        store.save_heartbeat("a-node", 12, "0.1.0", NOW, NOW, True)
    with write_transaction():
        store.mark_node_stopped("a-node", later)
    a, b = store.node_statuses()
    assert (a.node_id, a.pid, a.broker_connected, a.heartbeat_at, a.stopped_at) == ("a-node", 12, False, later, later)
    assert (b.node_id, b.broker_connected, b.started_at, b.stopped_at) == ("b-node", False, NOW, None)
    with write_transaction():  # a restart: the same row, running again
        store.save_heartbeat("a-node", 13, "0.2.0", later, later, True)
    a, _ = store.node_statuses()
    assert (a.pid, a.version, a.started_at, a.broker_connected, a.stopped_at) == (13, "0.2.0", later, True, None)


def test_a_recorded_run_is_stored_ended_with_its_attempts(engine: Any) -> None:
    later = NOW + dt.timedelta(seconds=2)
    with write_transaction():
        parent = store.insert_ended_flow(routine="pair", steps=["add", "plain"], state="DONE", position=2, args=[1],
                                         kwargs={"k": "v"}, trigger="cli", result={"n": 3}, error=None,
                                         started_at=NOW, finished_at=later, parent_id=None, depth=0)
        child = store.insert_ended_flow(routine="other", steps=["plain"], state="FAILED", position=0, args=[],
                                        kwargs={}, trigger="flow", result=None, error="boom", started_at=NOW,
                                        finished_at=later, parent_id=parent, depth=1)
        store.insert_ended_result(parent, 0, "add", 1, "DONE", {"args": [1]}, {"child": child}, None, NOW, later)
        store.insert_ended_result(child, 0, "plain", 1, "FAILED", None, None, "boom", NOW, later)
    flow = api.get_flow(parent)
    assert (flow.state, flow.result, flow.kwargs, flow.admitted, flow.finished_at) == ("DONE", {"n": 3}, {"k": "v"},
                                                                                       True, later)
    [attempt] = api.flow_trace(parent)
    assert (attempt.state, attempt.output, attempt.started_at) == ("DONE", {"child": child}, NOW)
    assert [(c.id, c.state, c.depth) for c in store.child_flows(parent)] == [(child, "FAILED", 1)]
    assert sorted(catalog.task_names()) == ["add", "plain"] and sorted(catalog.routine_names()) == ["other", "pair"]


def test_attempt_changes_work_out_each_duration_in_the_database(engine: Any) -> None:
    # /metrics reads thousands of attempts a minute: the duration comes from SQL, exact to
    # the microsecond, across a second boundary and with no fraction on one side.
    flow_id = engine.submit("pair", [1], now=NOW)[0].id
    cases = [(NOW, NOW + dt.timedelta(microseconds=1500)),
             (dt.datetime(2026, 5, 1, 12, 0, 0, 999999), dt.datetime(2026, 5, 1, 12, 0, 1)),
             (dt.datetime(2026, 5, 1, 23, 59, 59, 999999), dt.datetime(2026, 5, 2, 0, 0, 2, 500000))]
    with write_transaction():
        for attempt, (started, finished) in enumerate(cases, start=1):
            TaskResult.create(flow=flow_id, position=0, task="add", attempt=attempt, state="DONE",
                              started_at=started, finished_at=finished)
        TaskResult.create(flow=flow_id, position=1, task="plain", attempt=1, state="RUNNING", started_at=NOW)
    changes, _newest = api.attempt_changes(0)
    took = [t for _, fid, routine, _, t in changes if fid == flow_id and routine == "pair"]
    assert took[:3] == pytest.approx([0.0015, 0.000001, 2.500001], abs=1e-9)
    assert took[3] is None  # still running


def test_deferred_flow_writes_land_at_the_flush_each_flow_with_its_values(engine: Any) -> None:
    ids = [engine.submit("pair", [n], now=NOW)[0].id for n in range(4)]
    later = NOW + dt.timedelta(seconds=3)
    with write_transaction():
        flows = store.flows_by_id(ids)
        writes = store.FlowWrites()
        for flow_id in ids[:3]:  # the same values: one statement
            store.update_flow(flows[flow_id], defer=writes, worker_pid=77, updated_at=later)
        store.update_flow(flows[ids[3]], defer=writes, position=1, result={"a": [1]}, texts={"result": '{"a":[1]}'})
        assert flows[ids[0]].worker_pid == 77 and flows[ids[3]].position == 1  # the rows know at once
        assert Flow.get_by_id(ids[0]).worker_pid is None  # the database at the flush
        writes.flush()
        writes.flush()  # nothing left: writes nothing
    stored = {f.id: f for f in Flow.select().where(Flow.id.in_(ids))}
    assert [(stored[i].worker_pid, stored[i].updated_at) for i in ids[:3]] == [(77, later)] * 3
    assert (stored[ids[3]].worker_pid, stored[ids[3]].position, stored[ids[3]].result) == (None, 1, {"a": [1]})
    assert stored[ids[3]].updated_at == NOW


def test_deferred_first_attempts_get_their_ids_at_the_flush(engine: Any) -> None:
    ids = [engine.submit("pair", [n], now=NOW)[0].id for n in range(3)]

    class Target:
        task_result_id = 0

    targets = [Target() for _ in ids]
    with write_transaction():
        writes = store.FlowWrites()
        for n, (flow_id, target) in enumerate(zip(ids, targets, strict=True)):
            writes.insert_result(target, flow_id, n % 2, "add", f'{{"args":[{n}]}}', 4242, NOW, None)
        assert TaskResult.select().count() == 0 and {t.task_result_id for t in targets} == {0}
        writes.flush()
    stored = {r.id: r for r in TaskResult.select()}
    assert len(stored) == 3
    for n, (flow_id, target) in enumerate(zip(ids, targets, strict=True)):
        row = stored[target.task_result_id]
        assert (row.flow_id, row.position, row.attempt, row.state, row.input, row.worker_pid, row.started_at) == (
            flow_id, n % 2, 1, "RUNNING", {"args": [n]}, 4242, NOW)


@pytest.mark.parametrize("update_from", [True, False], ids=["update-from", "old-sqlite"])
def test_held_attempts_are_recorded_together_only_where_the_worker_still_holds_them(
        engine: Any, update_from: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store.flows, "_SQLITE_UPDATE_FROM", update_from)  # SQLite before 3.35: a row at a time
    ids = [engine.submit("pair", [n], now=NOW)[0].id for n in range(5)]
    later, ran = NOW + dt.timedelta(seconds=2), NOW + dt.timedelta(seconds=1)
    with write_transaction():
        Flow.update(state="RUNNING", worker_pid=4242, node_id="n1", dispatch_token=3).where(Flow.id.in_(ids)).execute()
        Flow.update(dispatch_token=4).where(Flow.id == ids[1]).execute()  # taken over: a new token
        Flow.update(state="CANCELLED").where(Flow.id == ids[2]).execute()
        Flow.update(worker_pid=99).where(Flow.id == ids[3]).execute()  # another worker's
        results = [store.insert_result(flow_id, 0, "add", {"args": [n]}, 4242, NOW)[0]
                   for n, flow_id in enumerate(ids)]
        store.update_result(results[4], state="FAILED")  # an attempt no longer running
    steps = [SimpleNamespace(flow=object(), task_result_id=result_id, started_at=ran if n == 0 else None,
                             flow_id=flow_id, token=3)
             for n, (result_id, flow_id) in enumerate(zip(results, ids, strict=True))]
    texts = [f'{{"n":{n}}}' for n in range(5)]
    with write_transaction():
        recorded = store.finish_held_results(steps, texts, later, 4242, "n1")  # type: ignore[arg-type]
        assert store.finish_held_results([], [], later, 4242, "n1") == set()
        if not isinstance(database.obj, peewee.SqliteDatabase):
            assert _row_locked(ids[0]) and not _row_locked(ids[1])  # the held flow, as finish_held_result
    assert recorded == {results[0]}
    stored = {r.id: r for r in TaskResult.select()}
    first = stored[results[0]]
    assert (first.state, first.output, first.started_at, first.finished_at) == ("DONE", {"n": 0}, ran, later)
    assert [(stored[r].state, stored[r].output, stored[r].finished_at) for r in results[1:]] == [
        ("RUNNING", None, None)] * 3 + [("FAILED", None, None)]
    assert all(stored[r].started_at == NOW for r in results[1:])  # no started_at given: left as it was


def _row_locked(flow_id: int) -> bool:
    """Whether another PostgreSQL session finds the flow's row locked."""
    import psycopg2
    import psycopg2.errors

    other = psycopg2.connect(dbname=database.obj.database, user="postgres", host="127.0.0.1", port=5432)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT id FROM flow WHERE id = %s FOR UPDATE NOWAIT", (flow_id,))
            return False
    except psycopg2.errors.LockNotAvailable:
        return True
    finally:
        other.close()


@pytest.mark.parametrize("update_from", [True, False], ids=["update-from", "old-sqlite"])
def test_deferred_flow_writes_with_values_of_their_own_are_one_statement_per_column_set(
        engine: Any, update_from: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store.flows, "_SQLITE_UPDATE_FROM", update_from)  # SQLite before 3.35: a statement per value
    ids = [engine.submit("pair", [n], now=NOW)[0].id for n in range(4)]
    times = [NOW + dt.timedelta(seconds=n + 1) for n in range(4)]
    with write_transaction():
        flows = store.flows_by_id(ids)
        writes = store.FlowWrites()
        for n, flow_id in enumerate(ids):  # the same columns, some with values of their own
            store.update_flow(flows[flow_id], defer=writes, state="FAILED", position=n % 2 + 1, updated_at=times[n],
                              result={"n": n}, admitted=False, worker_pid=10 + n, error="e",
                              texts={"result": f'{{"n":{n}}}'} if n < 2 else None)
        assert Flow.get_by_id(ids[0]).state == "INIT"  # the database at the flush
        statements: list[str] = []
        sqlite = isinstance(database.obj, peewee.SqliteDatabase)
        if sqlite:
            database.obj.connection().set_trace_callback(statements.append)
        writes.flush()
        if sqlite:
            database.obj.connection().set_trace_callback(None)
            assert len([s for s in statements if s.startswith("UPDATE flow")]) == (1 if update_from else 4)
    stored = {f.id: f for f in Flow.select().where(Flow.id.in_(ids))}
    assert [(stored[i].state, stored[i].position, stored[i].updated_at, stored[i].result, stored[i].admitted,
             stored[i].worker_pid, stored[i].error) for i in ids] == [
        ("FAILED", n % 2 + 1, times[n], {"n": n}, False, 10 + n, "e") for n in range(4)]


def test_rounds_of_any_size_write_only_their_own_rows_with_a_few_statement_texts(engine: Any) -> None:
    # A worker's round holds 1 to ~80 steps. On SQLite every multi-row statement is written
    # for a power of two rows (rows that change nothing added, INSERTs in runs: 19 = 16 + 2 + 1),
    # so a handful of texts is prepared once each; on PostgreSQL the rows are as they come.
    ids = [engine.submit("pair", [n], now=NOW)[0].id for n in range(25)]
    later = NOW + dt.timedelta(seconds=1)
    sqlite = isinstance(database.obj, peewee.SqliteDatabase)
    assert [store.rows.padded(n) for n in (0, 1, 2, 3, 5, 19, 64, 65)] == (
        [0, 1, 2, 4, 8, 32, 64, 128] if sqlite else [0, 1, 2, 3, 5, 19, 64, 65])
    assert [len(run) for run in store.rows.runs(list(range(19)), 64)] == ([16, 2, 1] if sqlite else [19])
    assert [len(run) for run in store.rows.runs(list(range(100)), 64)] == ([64, 32, 4] if sqlite else [64, 36])

    class Target:
        task_result_id = 0

    done = 0
    for size in (1, 3, 19):
        chosen = ids[done:done + size]
        targets = [Target() for _ in chosen]
        before = Outbox.select().count()
        with write_transaction():
            flows = store.flows_by_id(chosen)
            assert sorted(flows) == chosen
            writes = store.FlowWrites()
            for n, (flow_id, target) in enumerate(zip(chosen, targets, strict=True)):
                store.update_flow(flows[flow_id], defer=writes, position=n % 2 + 1, updated_at=later)  # VALUES
                store.update_flow(flows[flow_id], defer=writes, worker_pid=4242)  # all the same: IN (...)
                writes.add_outbox(f"t/{flow_id}", "{}", None, NOW)
                writes.insert_result(target, flow_id, 1, "plain", "{}", 4242, NOW, None)
            writes.flush()
        done += size
        stored = {f.id: f for f in Flow.select()}
        assert [(stored[i].position, stored[i].updated_at, stored[i].worker_pid) for i in chosen] == [
            (n % 2 + 1, later, 4242) for n in range(size)]
        assert all((stored[i].position, stored[i].worker_pid) == (0, None) for i in ids[done:])
        topics = [r.topic for r in Outbox.select().order_by(Outbox.id)][before:]
        assert topics == [f"t/{i}" for i in chosen]  # in the order added
        results = {r.id: r for r in TaskResult.select()}
        assert [(results[t.task_result_id].flow_id, results[t.task_result_id].position) for t in targets] == [
            (i, 1) for i in chosen]


def test_flows_ending_in_one_worker_round_free_their_slots_for_the_waiting_ones(engine: Any) -> None:
    # Their ends are written at the round's flush; admitting counts active flows in the database first.
    catalog.save_routine("two", ["plain"], max=2)
    ids = [engine.submit("two", [n])[0].id for n in range(5)]
    assert [Flow.get_by_id(i).admitted for i in ids] == [True, True, False, False, False]
    tokens = {f.id: f.dispatch_token for f in Flow.select().where(Flow.id.in_(ids[:2]))}
    steps = engine.claim_many([(i, tokens[i]) for i in ids[:2]], 4242)
    assert [s.flow_id for s in steps] == ids[:2]
    assert engine.finish_many([(s, {"args": [s.flow_id], "kwargs": {}}) for s in steps], 4242) == []
    stored = {f.id: f for f in Flow.select().where(Flow.id.in_(ids))}
    assert [(stored[i].state, stored[i].result) for i in ids[:2]] == [("DONE", {"args": [i], "kwargs": {}})
                                                                      for i in ids[:2]]
    assert [stored[i].admitted for i in ids[2:]] == [True, True, False]


def test_deferred_outbox_rows_land_at_the_flush_in_the_order_added(engine: Any) -> None:
    before = Outbox.select().count()
    with write_transaction():
        writes = store.FlowWrites()
        for n in range(3):
            writes.add_outbox(f"t/{n}", f'{{"n":{n}}}', "c" if n == 1 else None, NOW, "node-a")
        store.add_outbox("t/now", "{}", None, NOW)  # not deferred: in at once
        assert Outbox.select().count() == before + 1
        writes.flush()
    rows = list(Outbox.select().order_by(Outbox.id))[before:]
    assert [(r.topic, r.payload, r.qos, r.retain, r.correlation_data, r.created_at, r.node_id) for r in rows] == [
        ("t/now", "{}", 1, False, None, NOW, None)] + [
        (f"t/{n}", f'{{"n":{n}}}', 1, False, "c" if n == 1 else None, NOW, "node-a") for n in range(3)]


def test_new_flows_store_every_value_with_its_encoding_as_peewee_reads_it(engine: Any) -> None:
    """insert_flow works out each column set's statement once and reuses a routine's
    steps JSON while its list is the same: flows of two routines, and of a routine whose
    steps changed in between, each keep their own values."""
    first = engine.submit("pair", [1, "x"], {"k": {"n": None}}, now=NOW)[0].id
    other = engine.submit("other", now=NOW)[0].id
    again = engine.submit("pair", [2], now=NOW, request_id="r-1")[0].id
    catalog.save_routine("pair", ["plain"])
    changed = engine.submit("pair", [3], now=NOW)[0].id
    stored = {f.id: f for f in Flow.select().where(Flow.id.in_([first, other, again, changed]))}
    assert [(stored[i].steps, stored[i].args, stored[i].request_id) for i in (first, other, again, changed)] == [
        (["add", "plain"], [1, "x"], None), (["plain"], [], None), (["add", "plain"], [2], "r-1"),
        (["plain"], [3], None)]
    assert stored[first].kwargs == {"k": {"n": None}} and stored[first].created_at == NOW
    assert stored[first].updated_at == NOW and stored[first].admitted is True
    uids = {stored[i].uid for i in stored}
    assert len(uids) == 4 and all(uuid.UUID(u).version == 4 and str(uuid.UUID(u)) == u for u in uids)


def test_flow_uids_are_uuid4_text_and_a_forked_child_never_hands_out_its_parents() -> None:
    made = [store.new_uid() for _ in range(3 * store.flows.UID_BATCH)]  # several refills of the pool
    assert len(set(made)) == len(made)
    assert all(uuid.UUID(u).version == 4 and uuid.UUID(u).variant == uuid.RFC_4122 and str(uuid.UUID(u)) == u
               for u in made)
    store.new_uid()  # the pool holds uids now: a child must not take them
    pending = list(store.flows._uids)
    assert pending
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its uids and leave at once
        os.close(read)
        os.write(write, "\n".join(store.new_uid() for _ in range(len(pending))).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as child:
        theirs = child.read().split("\n")
    os.waitpid(pid, 0)
    assert len(theirs) == len(pending) and not set(theirs) & set(pending)
