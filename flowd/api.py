"""The Python API (SPEC 3): submit, inspect, cancel and retry flows from any process.

Works with the daemon stopped: a submitted flow is stored and queued, and runs when
workers are there. The first call configures this process from the default config
lookup; call :func:`configure` first to choose the file or pass a Config.

>>> from flowd import api
>>> flow = api.submit_flow("fetch-weather", "arg0", city="Oslo", request_id="r-17")
>>> api.get_flow(flow.id).state
'INIT'
>>> api.wait_flow(flow.id, timeout=30).state      # blocks until it ends (TimeoutError after 30 s)
'DONE'
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flowd import store
from flowd.config import Config, DatabaseSection, load_config
from flowd.errors import InputError, NotFoundError
from flowd.store import Row
from flowd.store.migrations import init_database
from flowd.store.models import FlowState, Routine, database, utcnow

TYPE_CHECKING = False
if TYPE_CHECKING:
    from flowd.engine.engine import Engine

_engine: Engine | None = None
_database_open = False


def configure(config: Config | str | None = None, *, create: bool = False) -> Engine:
    """Open the database and queue of ``config`` (a Config, a file path, or the default lookup).

    A SQLite database that does not exist yet is created only with ``create=True`` (the
    daemon does it at its first start); otherwise StoreUnavailable says where it was
    looked for, so a script run with the wrong configuration never makes an empty one.
    """
    global _engine
    from flowd.engine.engine import Engine
    from flowd.queue import queue

    cfg = config if isinstance(config, Config) else load_config(config)
    init_database(cfg.database, create=create)
    queue.configure_queue(cfg)
    _engine = Engine(cfg, enqueue=queue.enqueue_flow, enqueue_many=queue.enqueue_flows)
    return _engine


def open_database(section: DatabaseSection, *, create: bool = False) -> None:
    """Open only the database of ``section``: enough for reads (flows, traces, counts),
    without the queue or the engine (flowctl's read-only commands load neither)."""
    global _database_open
    init_database(section, create=create)
    _database_open = True


def engine() -> Engine:
    """This process's engine, configured on first use."""
    return _engine if _engine is not None else configure()


def _reading() -> None:
    """Reads need the database only; configure everything on first use, as before."""
    if _engine is None and not _database_open:
        configure()


def reset() -> None:
    """Close this process's database connection and forget the configuration."""
    global _engine, _database_open
    _engine = None
    _database_open = False
    if database.obj is not None and not database.obj.is_closed():
        database.obj.close()


def check_flow_input(args: Any, kwargs: dict[str, Any]) -> None:
    """Raise InputError when a flow's input cannot be stored as JSON (a set, NaN, a lone surrogate)."""
    from flowd.jsontext import check_json

    check_json({"args": list(args), "kwargs": kwargs}, "the flow's input", verb="contains", error=InputError)


def submit_flow(routine: str | Routine, *args: Any, request_id: str | None = None, reply_to: str | None = None,
                trigger: str = "api", **kwargs: Any) -> Row:
    """Store and queue a flow of ``routine``; returns at once. A repeated ``request_id``
    returns the flow already started with it."""
    check_flow_input(args, kwargs)
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        raise InputError(f"request_id must be a non-empty string, not {request_id!r}")
    row, _ = engine().submit(routine, args, kwargs, request_id=request_id, reply_to=reply_to, trigger=trigger)
    return row


def get_flow(flow_id: int) -> Row:
    """The flow with its current state, position, result and error."""
    _reading()
    flow = store.get_flow(flow_id)
    if flow is None:
        raise NotFoundError("flow", flow_id, "list flows with 'flowctl flows'")
    return flow


def flow_trace(flow_id: int) -> list[Row]:
    """Every attempt of every step of a flow, in order."""
    get_flow(flow_id)
    return store.flow_trace(flow_id)


def cancel_flow(flow_id: int, reason: str = "cancelled by request") -> Row:
    """Cancel a flow that has not ended (its running step is interrupted)."""
    return engine().cancel(flow_id, reason=reason)


def retry_flow(flow_id: int) -> Row:
    """Resume a FAILED or CANCELLED flow from the step that did not finish."""
    return engine().retry(flow_id)


def wait_flow(flow_id: int, timeout: float | None = None) -> Row:
    """Block until the flow ends (started anywhere: this process, flowctl, MQTT, another
    node); returns it. Raises FlowWaitTimeout (a TimeoutError) after ``timeout`` s, the
    flow going on. Woken by the flow's messages on the broker, with a slow check of the
    database when the broker is away (see flowd.engine.waiting)."""
    from flowd.engine.waiting import FlowWaiter

    config = engine().config
    get_flow(flow_id)
    with FlowWaiter(config, flow_id) as waiter:
        return waiter.wait(timeout)


def list_flows(state: str | None = None, routine: str | None = None, limit: int = 50,
               before: int | None = None) -> list[Row]:
    """Newest flows first, optionally filtered; ``before`` pages on (ids below it)."""
    if state and state.upper() not in FlowState.__members__:
        raise InputError(f"unknown state '{state}'; states are {', '.join(FlowState.__members__)}")
    _reading()
    return store.list_flows(state.upper() if state else None, routine, limit, before)


def counts_by_state() -> dict[str, int]:
    """How many flows are in each state."""
    _reading()
    return store.count_flows_by_state()


def prune(older_than: float, now: dt.datetime | None = None, *, dry_run: bool = False) -> int:
    """Delete flows that ended more than ``older_than`` seconds ago, with their results,
    and give the freed pages back to the file system (SPEC 9); how many. ``dry_run``
    only counts them."""
    _reading()
    cutoff = (now or utcnow()) - dt.timedelta(seconds=older_than)
    if dry_run:
        return store.count_ended_flows(cutoff)
    return store.prune_ended_flows(cutoff)


# --------------------------------------------------------------------------- for the web console (SPEC 11)
# Plain dicts and tuples, so the console (flowd/web) never touches a model, a row or a query.
HIDDEN = "•••"


def describe_flow(flow_id: int) -> dict[str, Any]:
    """A flow with its children, what it waits for and every attempt of every step, as
    ``flowctl --json flow show`` prints it, but with its tasks' option values masked
    wherever they were passed on (SPEC 11: options may hold secrets)."""
    from flowd import catalog
    from flowd.cli.display import attempt_dict, flow_dict

    data = {**flow_dict(get_flow(flow_id)), "trace": [attempt_dict(r) for r in flow_trace(flow_id)]}
    options = catalog.task_options(list(data["steps"]))
    if not options:
        return data
    texts = sorted({v for v in options.values() if isinstance(v, str) and len(v) >= 4}, key=len, reverse=True)
    # Not ``waiting_for``: that is flowd's own subscription, shown as flowctl and MQTT show it.
    for key in ("args", "kwargs", "result", "error"):
        data[key] = _mask(data[key], options, texts)
    for attempt in data["trace"]:
        for key in ("input", "output", "error"):
            attempt[key] = _mask(attempt[key], options, texts)
    return data


def _mask(value: Any, options: dict[str, Any], texts: list[str]) -> Any:
    """``value`` with every option's value hidden: under the option's own key, and as text."""
    if isinstance(value, dict):
        return {k: HIDDEN if k in options and v == options[k] else _mask(v, options, texts) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, options, texts) for v in value]
    if isinstance(value, str):
        for text in texts:
            value = value.replace(text, HIDDEN)
    return value


def summarize_flows(state: str | None = None, routine: str | None = None, limit: int = 50,
                    before: int | None = None) -> list[dict[str, Any]]:
    """:func:`list_flows` as dicts: one line of a flow list each."""
    from flowd.cli.display import iso

    return [{"id": f.id, "routine": f.routine, "state": f.state, "position": f.position,
             "steps": len(f.steps or []), "trigger": f.trigger, "request_id": f.request_id,
             "created_at": iso(f.created_at), "started_at": iso(f.started_at),
             "finished_at": iso(f.finished_at), "error": f.error}
            for f in list_flows(state, routine, limit, before)]


def describe_routines() -> list[dict[str, Any]]:
    """Every routine with its steps (never options) and, when scheduled and enabled, its
    next run (ISO UTC)."""
    from flowd import catalog
    from flowd.cli.display import iso, routine_dict

    _reading()
    result = []
    for routine in catalog.list_routines():
        next_run, schedule_error = None, None
        if routine.enabled and routine.schedule:
            try:
                next_run = iso(_next_run(routine))
            except InputError as exc:
                schedule_error = str(exc)
        result.append({**routine_dict(routine), "steps": catalog.routine_steps(routine), "next_run": next_run,
                       "schedule_error": schedule_error})
    return result


def _next_run(routine: Routine) -> dt.datetime | None:
    from flowd.schedule.scheduler import Scheduler, to_db

    first = Scheduler(engine().config, engine()).plan(routine).first_fire
    return to_db(first) if first is not None else None


def set_routine_enabled(name: str, enabled: bool) -> None:
    """Enable or disable a routine (a disabled one is neither scheduled nor startable)."""
    from flowd import catalog

    _reading()
    catalog.set_routine_enabled(name, enabled)


def node_overview() -> dict[str, Any]:
    """This node at a glance: daemon and broker (from its heartbeat), queue depth, flows
    by state, outbox size, database size. Raises StoreUnavailable when the database
    cannot be read; a queue that cannot be read is reported in ``queue_error``."""
    from flowd.cli.display import iso
    from flowd.queue import queue

    cfg = engine().config
    node = next((n for n in store.node_statuses() if n.node_id == cfg.flowd.node_id), None)
    depth, queue_error = None, None
    try:
        depth = queue.queue_depth()
    except Exception as exc:  # the queue's own trouble is news, not a reason to show nothing
        queue_error = f"{type(exc).__name__}: {exc}"
    return {
        "node_id": cfg.flowd.node_id,
        "daemon": None if node is None else {
            "pid": node.pid, "version": node.version, "started_at": iso(node.started_at),
            "heartbeat_at": iso(node.heartbeat_at), "stopped_at": iso(node.stopped_at)},
        "broker_connected": bool(node is not None and node.stopped_at is None and node.broker_connected),
        "queue_depth": depth, "queue_error": queue_error,
        "flows": counts_by_state(), "outbox": store.count_messages(), "database_bytes": database_bytes(),
    }


def database_bytes() -> int | None:
    """Bytes the SQLite database takes on disk (with its write-ahead log); None on PostgreSQL."""
    from flowd.store.models import sqlite_path

    path = sqlite_path(engine().config.database.url)
    if path is None:
        return None
    total = 0
    for name in (path, path.with_name(path.name + "-wal")):
        try:
            total += name.stat().st_size
        except FileNotFoundError:
            pass
    return total


def flow_changes(after_id: int | None, watched: Iterable[int] = ()
                 ) -> tuple[list[tuple[int, str, str, str | None]], int]:
    """(id, routine, state, finished_at as stored) of every flow newer than ``after_id``,
    of the ``watched`` ones and of every flow not ended; with the newest id.
    ``after_id=None``: the flows not ended only. For ``/metrics``."""
    from flowd.store import console

    _reading()
    newest, _ = console.newest_ids()
    return console.flow_changes(after_id, watched), newest


def attempt_changes(after_id: int | None, watched: Iterable[int] = ()
                    ) -> tuple[list[tuple[int, int, str, str, float | None]], int]:
    """(id, flow id, routine, task, seconds it took or None while it runs) of every step
    attempt newer than ``after_id`` and of the ``watched`` ones; with the newest id.
    ``after_id=None``: the attempts still running only. For ``/metrics``."""
    from flowd.store import console

    _reading()
    _, newest = console.newest_ids()
    return console.attempt_changes(after_id, watched), newest


# --------------------------------------------------------------------------- daemons (flowctl status, run, nodes)
HEARTBEAT_STALE_S = 90.0


def now() -> dt.datetime:
    """The time as flowd stores it (naive UTC)."""
    return utcnow()


def is_node_alive(node: Any, at: dt.datetime, local_node_id: str, lease_valid: bool | None = None) -> bool:
    """A daemon is alive when it has not stopped, its heartbeat is recent and, on this
    machine, its pid still exists. On a shared database its lease decides (renewed every
    few seconds, judged by the database's clock), never a process id."""
    if node.stopped_at is not None:
        return False
    if lease_valid is not None:
        return lease_valid
    if (at - node.heartbeat_at).total_seconds() > HEARTBEAT_STALE_S:
        return False
    return node.node_id != local_node_id or is_process_alive(node.pid)


def is_process_alive(pid: int) -> bool:
    """A process with this id runs on this machine (perhaps another user's; not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def any_daemon_alive(local_node_id: str) -> bool:
    """True when some flowd writes fresh heartbeats into this database."""
    at = utcnow()
    return any(is_node_alive(node, at, local_node_id) for node in store.node_statuses())


def status_report(config: Config, *, fresh: bool) -> dict[str, Any]:
    """What ``flowctl status`` shows (the database open): every node with whether it
    runs, flows by state, outbox size, queue depth (or why the queue cannot be read;
    ``fresh``: no database yet, so no queue either)."""
    from flowd.cli.display import iso, span
    from flowd.errors import StoreUnavailable
    from flowd.store.nodes import list_nodes

    at = utcnow()
    nodes: list[dict[str, Any]] = []
    leases = {lease.node_id: lease for lease in list_nodes()}  # several nodes on one database (SPEC 10)
    for node in store.node_statuses():
        lease = leases.get(node.node_id)
        alive = is_node_alive(node, at, config.flowd.node_id, lease.online if lease else None)
        nodes.append({
            "node_id": node.node_id, "running": alive, "pid": node.pid, "version": node.version,
            "started_at": iso(node.started_at), "heartbeat_at": iso(node.heartbeat_at),
            "stopped_at": iso(node.stopped_at), "broker_connected": bool(node.broker_connected) if alive else None,
            "heartbeat_age": span(node.heartbeat_at, at),
            "last_seen": iso(lease.renewed_at) if lease else None,
            "running_steps": lease.running if lease else None,
        })
    depth, queue_error = None, None
    try:
        from flowd.queue import queue

        if not fresh:
            queue.configure_queue(config)
        depth = queue.queue_depth() if not fresh else 0
    except Exception as exc:
        # status is how people diagnose: report the queue's trouble and show the rest.
        queue_error = str(exc) if isinstance(exc, (StoreUnavailable, OSError)) else failure_reason(exc, "the queue")
        if queue_error is None:
            raise
    return {"node_id": config.flowd.node_id, "nodes": nodes,
            "daemon_running": any(n["running"] for n in nodes if n["node_id"] == config.flowd.node_id),
            "queue_depth": depth, "queue_error": queue_error, "flows": counts_by_state(),
            "outbox": store.count_messages()}


# --------------------------------------------------------------------------- the database files
def database_file(section: DatabaseSection) -> Path | None:
    """The SQLite file of ``section``; None on PostgreSQL."""
    from flowd.store.models import sqlite_path

    return sqlite_path(section.url)


def close_database() -> None:
    """Close this process's connection (flowctl, before removing a file it made for nothing)."""
    if database.obj is not None:
        database.obj.close()


def check_database(config: Config, *, full: bool = False) -> list[Any]:
    """SQLite's quick_check (``full``: integrity_check) of the database and the queue file."""
    from flowd.store import integrity

    return integrity.check_files(config, full=full)


def recover_database(config: Config, *, force: bool = False) -> Any:
    """Salvage a damaged database into a new file, the damaged one kept beside it (flowd stopped)."""
    from flowd.store import dbrecover

    return dbrecover.recover_database(config, force=force)


def failure_reason(exc: BaseException, database: str = "the database") -> str | None:
    """A sentence, when ``exc`` says the database or the queue cannot be used (locked,
    read-only, not a database, damaged, driver missing, Redis away); None for anything
    else (a bug, which keeps its traceback)."""
    import sys

    from flowd.store import unusable_reason
    from flowd.store.integrity import is_damage

    if is_damage(exc):
        return damage_hint(exc, f"{database} cannot be used: {exc}")
    reason = unusable_reason(exc, database)
    if reason is not None:
        return reason
    redis = sys.modules.get("redis.exceptions")
    if redis is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"the queue (Redis) cannot be reached: {exc}"
    huey = sys.modules.get("huey.exceptions")
    if huey is not None and isinstance(exc, huey.ConfigurationError):  # e.g. no redis module installed
        return f"the queue cannot be used: {exc}"
    return None


def damage_hint(exc: BaseException, message: str) -> str:
    """``message``, with what to do added when ``exc`` says a file is damaged."""
    from flowd.errors import DatabaseDamaged
    from flowd.store.integrity import is_damage

    if isinstance(exc, DatabaseDamaged) or not is_damage(exc):
        return message  # DatabaseDamaged's own sentence says it already
    return f"{message}; the file is damaged: see 'flowctl db check', then, with flowd stopped, 'flowctl db recover'"
