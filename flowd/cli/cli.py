"""flowctl: the command line of flowd (SPEC 6).

Parses a command, calls the catalog, the engine or the models, prints for people (or
JSON with ``--json``; display.py builds both) and turns flowd's errors into exit
codes. It works whether or not the daemon runs: a submitted flow waits in the queue
until workers take it.

Start-up time matters on a Pi, so nothing heavy is imported before a command needs
it: ``--help`` loads argparse only, read-only commands load peewee but never huey,
paho or APScheduler.

Exit codes:
  0    success
  1    the flow ended FAILED or CANCELLED (``submit --wait``, ``flow wait``, ``run``)
  2    bad usage or bad input (one line on stderr)
  3    the database or the queue cannot be used (one line on stderr); ``db check``: a
       file is damaged (the report says which and how, on stdout)
  124  ``--timeout S`` of ``submit --wait`` or ``flow wait``: S passed before the flow ended (it goes on)
  130  Ctrl-C (while waiting it stops the waiting, never the flow)

With ``--json`` every command prints JSON on stdout; an error is still one line on
stderr, and also ``{"error": "...", "exit_code": N}`` on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

from flowd.errors import ConfigError, InputError, StoreUnavailable, TaskScriptError

# typing, json, datetime, shutil and sqlite3 cost ~20 ms together on a PC, several
# times that on a Pi: --help needs none of them, so they are imported where used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence
    from typing import Any, NoReturn

    from flowd.config import Config
    from flowd.engine.engine import Engine

EXIT_OK, EXIT_FLOW_FAILED, EXIT_USAGE, EXIT_STORE = 0, 1, 2, 3
EXIT_WAIT_TIMEOUT, EXIT_INTERRUPTED = 124, 130
HEARTBEAT_STALE_S = 90.0
STATES = ("INIT", "RUNNING", "WAITING", "DONE", "FAILED", "CANCELLED")


class UsageError(InputError):
    """The command line itself is wrong (argparse's complaints end up here)."""


# --------------------------------------------------------------------------- parsing helpers
def parse_value(text: str) -> Any:
    """A ``k=v`` value or a positional argument: JSON when it parses, else the string.

    NaN and Infinity stay strings: they cannot travel as JSON.
    """
    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    import json

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def parse_pairs(pairs: Sequence[str] | None, option: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; raises UsageError for a pair without '='."""
    result: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} {pair!r} is not key=value; write it like {option} city=Oslo "
                             f"or {option} 'limits={{\"max\": 3}}'")
        result[key.strip()] = parse_value(value)
    return result


def _duration(text: str) -> float:
    from flowd.config import parse_duration

    try:
        return parse_duration(parse_value(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _flow_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a flow id is a whole number (see 'flowctl flows'), not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a flow id is a positive number, not {value}")
    return value


def _state(text: str) -> str:
    if text.upper() not in STATES:
        raise argparse.ArgumentTypeError(f"unknown state {text!r}; states are {', '.join(STATES)}")
    return text.upper()


# --------------------------------------------------------------------------- context
class Context:
    """What every command needs: the parsed arguments, the config, the database."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.json: bool = bool(args.json)
        self._config: Config | None = None
        self.fresh = False  # no database yet: reads show an empty one
        self.created: Any = None  # the database this command made (a Path)

    @property
    def config(self) -> Config:
        if self._config is None:
            from flowd.config import load_config

            self._config = load_config(self.args.config)
        return self._config

    def open_database(self, *, create: bool = False) -> None:
        """Open the database without the queue (reads; catalog changes).

        A SQLite file that is not there yet (flowd never ran with this configuration) is
        never made silently: ``create`` (a command that stores a task or routine) makes it
        and says so on stderr; a read answers from an empty database in memory, so there
        is simply nothing to list (``self.fresh``).
        """
        from flowd import api
        from flowd.store.models import sqlite_path

        path = sqlite_path(self.config.database.url)
        if path is not None and not path.exists():
            if not create:
                from flowd.config import DatabaseSection

                self.fresh = True
                api.open_database(DatabaseSection(url="sqlite:///:memory:"), create=True)
                return
            self.created = path
        api.open_database(self.config.database, create=create)

    def finish(self, succeeded: bool) -> None:
        """Say that the command made the database, or take back the one it made for nothing."""
        if self.created is None:
            return
        if succeeded:
            print(f"flowctl: note: created the database {self.created} (flowd has not run with this "
                  "configuration yet)", file=sys.stderr)
            return
        from flowd.store.models import database

        if database.obj is not None:
            database.obj.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.created}{suffix}")
            except FileNotFoundError:
                pass

    def engine(self) -> Engine:
        """Open the database and the queue (submitting, cancelling, retrying)."""
        from flowd import api

        return api.configure(self.config)

    def emit(self, data: Any, text: str) -> None:
        if self.json:
            import json

            print(json.dumps(data, ensure_ascii=False, indent=2))
        elif text:
            print(text)


# --------------------------------------------------------------------------- commands
def cmd_status(ctx: Context) -> int:
    """Daemon, broker, queue depth, flows by state, outbox size."""
    from flowd import api, store
    from flowd.cli import hints
    from flowd.cli.display import human_duration, iso, local_time, parse_iso, span
    from flowd.store.models import utcnow
    from flowd.store.nodes import list_nodes

    ctx.open_database()
    now = utcnow()
    nodes: list[dict[str, Any]] = []
    leases = {lease.node_id: lease for lease in list_nodes()}  # several nodes on one database (SPEC 10)
    for node in store.node_statuses():
        lease = leases.get(node.node_id)
        alive = is_node_alive(node, now, ctx.config.flowd.node_id, lease.online if lease else None)
        nodes.append({
            "node_id": node.node_id, "running": alive, "pid": node.pid, "version": node.version,
            "started_at": iso(node.started_at), "heartbeat_at": iso(node.heartbeat_at),
            "stopped_at": iso(node.stopped_at), "broker_connected": bool(node.broker_connected) if alive else None,
            "heartbeat_age": span(node.heartbeat_at, now),
            "last_seen": iso(lease.renewed_at) if lease else None,
            "running_steps": lease.running if lease else None,
        })
    counts = api.counts_by_state()
    outbox = store.count_messages()
    depth, queue_error = None, None
    try:
        from flowd.queue import queue

        if not ctx.fresh:  # no database: no queue either, and none is made here
            queue.configure_queue(ctx.config)
        depth = queue.queue_depth() if not ctx.fresh else 0
    except Exception as exc:
        # status is how people diagnose: report the queue's trouble and show the rest.
        queue_error = str(exc) if isinstance(exc, (StoreUnavailable, OSError)) else store_failure(exc, "the queue")
        if queue_error is None:
            raise
    data = {"node_id": ctx.config.flowd.node_id, "nodes": nodes,
            "daemon_running": any(n["running"] for n in nodes if n["node_id"] == ctx.config.flowd.node_id),
            "queue_depth": depth, "queue_error": queue_error, "flows": counts, "outbox": outbox,
            "database": redact(ctx.config.database.url), "database_exists": not ctx.fresh, "config": ctx.config.path}
    lines = []
    if not nodes:
        lines.append(f"{'daemon':<9} not running (never started with this database)")
    for n in nodes:
        label = "daemon" if n["node_id"] == ctx.config.flowd.node_id else "node"
        if n["running"]:
            since = local_time(parse_iso(n["started_at"]))
            steps = f", {n['running_steps']} running step(s)" if n["running_steps"] is not None else ""
            lines.append(f"{label:<9} running on {n['node_id']} (pid {n['pid']}, flowd {n['version']}{steps}) "
                         f"since {since}")
            lines.append(f"{'broker':<9} {'connected' if n['broker_connected'] else hints.broker_hint(ctx.config)}")
        elif n["stopped_at"]:
            lines.append(f"{label:<9} stopped on {n['node_id']} at {local_time(parse_iso(n['stopped_at']))}")
        elif n["last_seen"]:
            seen = human_duration(span(parse_iso(n["last_seen"]), now))
            lines.append(f"{label:<9} offline: {n['node_id']} (last seen {seen} ago; its lease expired, the other "
                         "nodes take over its flows)")
        else:
            lines.append(f"{label:<9} not running on {n['node_id']} (last heartbeat "
                         f"{human_duration(n['heartbeat_age'])} ago, pid {n['pid']})")
    lines.append(f"{'queue':<9} " + (f"{depth} waiting" if queue_error is None else f"unreachable: {queue_error}"))
    lines.append(f"{'flows':<9} " + "  ".join(f"{state} {counts[state]}" for state in STATES))
    lines.append(f"{'outbox':<9} {outbox} message{'s' if outbox != 1 else ''} to publish")
    lines.append(f"{'database':<9} {redact(ctx.config.database.url)}"
                 + (" (not there yet: flowd has not run with this configuration)" if ctx.fresh else ""))
    lines.append(f"{'config':<9} {ctx.config.path or '(none found: defaults)'}")
    ctx.emit(data, "\n".join(lines))
    return EXIT_STORE if queue_error else EXIT_OK


def any_daemon_alive(local_node_id: str) -> bool:
    """True when some flowd writes fresh heartbeats into this database."""
    from flowd import store
    from flowd.store.models import utcnow

    now = utcnow()
    return any(is_node_alive(node, now, local_node_id) for node in store.node_statuses())


def is_node_alive(node: Any, now: dt.datetime, local_node_id: str, lease_valid: bool | None = None) -> bool:
    """A daemon is alive when it has not stopped, its heartbeat is recent and, on this
    machine, its pid still exists. On a shared database its lease decides (renewed every
    few seconds, judged by the database's clock), never a process id."""
    if node.stopped_at is not None:
        return False
    if lease_valid is not None:
        return lease_valid
    if (now - node.heartbeat_at).total_seconds() > HEARTBEAT_STALE_S:
        return False
    if node.node_id == local_node_id:
        try:
            os.kill(node.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by another user
    return True


def cmd_scripts(ctx: Context) -> int:
    """Every Task class in the task folders; a file that cannot be read is listed with its error."""
    from pathlib import Path

    from flowd import loader
    from flowd.cli.display import table

    data: list[dict[str, Any]] = []
    seen: set[str] = set()
    for folder in ctx.config.flowd.task_paths:
        try:
            names = sorted(n for n in os.listdir(folder) if n.startswith("task_") and n.endswith(".py"))
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            try:
                # list_scripts stops at the first broken file; one file at a time keeps the others listed.
                loader.check_inside(Path(path), ctx.config.flowd.task_paths)
                classes = loader._task_classes(Path(path))
            except TaskScriptError as exc:
                data.append({"script": None, "path": path, "doc": "", "error": str(exc)})
                continue
            for class_name, doc in classes:
                reference = f"{name[len('task_'):-3]}.{class_name}"
                if reference not in seen:
                    seen.add(reference)
                    data.append({"script": reference, "path": path, "doc": doc, "error": None})
    if not data:
        text = f"no task scripts (task_*.py) in {', '.join(ctx.config.flowd.task_paths)}"
    else:
        rows = [(d["script"] or "(broken)", os.path.basename(d["path"]),
                 d["doc"] if d["script"] else d["error"].removeprefix(d["path"]).lstrip(", :"))
                for d in data]
        text = table(("SCRIPT", "FILE", "DESCRIPTION"), rows, flex=2)
    ctx.emit(data, text)
    return EXIT_OK


def cmd_task_add(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import task_dict

    a = ctx.args
    options = parse_pairs(a.option, "--option") if a.option is not None else None
    ctx.open_database(create=True)
    existing_task = catalog.find_task(a.name)
    existed = existing_task is not None
    if existing_task is not None and not a.replace:
        raise UsageError(f"task '{a.name}' exists already ({existing_task.script}); add --replace to change it "
                         "(options left out keep their values), or keep tasks in a file for 'flowctl apply'")
    task, changed = catalog.save_task(a.name, a.script, options=options, retries=a.retries,
                                      retry_delay=a.retry_delay, timeout=a.timeout,
                                      task_paths=ctx.config.flowd.task_paths)
    what = "updated" if existed and changed else "unchanged" if existed else "created"
    ctx.emit({"action": what, "task": task_dict(task)}, f"task {task.name} {what} ({task.script})")
    return EXIT_OK


def cmd_task_list(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import human_duration, table, task_dict

    ctx.open_database()
    tasks = [task_dict(t) for t in catalog.list_tasks()]
    rows = [(t["name"], t["script"], t["retries"], human_duration(t["timeout"]), ", ".join(t["routines"]))
            for t in tasks]
    text = table(("NAME", "SCRIPT", "RETRIES", "TIMEOUT", "USED BY"), rows, flex=4) if tasks else \
        "no tasks; add one with 'flowctl task add NAME SCRIPT' or 'flowctl apply FILE.toml'"
    ctx.emit(tasks, text)
    return EXIT_OK


def cmd_task_show(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import compact, human_duration, local_time, parse_iso, task_dict, terminal_width

    ctx.open_database()
    t = task_dict(catalog.get_task(ctx.args.name))
    width = terminal_width() - 15
    lines = [f"task {t['name']}",
             f"  script       {t['script']}",
             f"  options      {compact(t['options'], width)}",
             f"  retries      {t['retries']} (delay {t['retry_delay']:g}s, doubling up to "
             f"{t['retry_backoff_max']:g}s)",
             f"  timeout      {human_duration(t['timeout']) if t['timeout'] else 'none'}",
             f"  used by      {', '.join(t['routines']) or 'no routine'}",
             f"  updated      {local_time(parse_iso(t['updated_at']))}"]
    ctx.emit(t, "\n".join(lines))
    return EXIT_OK


def cmd_task_remove(ctx: Context) -> int:
    from flowd import catalog

    ctx.open_database()
    catalog.remove_task(ctx.args.name)
    ctx.emit({"action": "removed", "task": ctx.args.name}, f"task {ctx.args.name} removed")
    return EXIT_OK


def cmd_routine_add(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import routine_dict

    a = ctx.args
    ctx.open_database(create=True)
    existing = catalog.find_routine(a.name)
    if existing is not None and not a.replace:
        raise UsageError(f"routine '{a.name}' exists already ({' -> '.join(existing.task_names())}); add --replace "
                         "to replace its definition, or keep routines in a file for 'flowctl apply'")
    routine, changed = catalog.save_routine(
        a.name, list(a.tasks), schedule=a.schedule, timezone=a.timezone, jitter=a.jitter, mqtt=not a.no_mqtt,
        mode=a.mode, max=a.max, timeout=a.timeout, enabled=existing.enabled if existing is not None else True,
        status=a.status)
    what = "updated" if existing is not None and changed else "unchanged" if existing is not None else "created"
    ctx.emit({"action": what, "routine": routine_dict(routine)},
             f"routine {routine.name} {what}: {' -> '.join(routine.task_names())}")
    return EXIT_OK


def cmd_routine_list(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import routine_dict, table

    ctx.open_database()
    routines = [routine_dict(r) for r in catalog.list_routines()]
    rows = [(r["name"], "yes" if r["enabled"] else "no", r["mode"], r["status"], r["schedule"],
             " -> ".join(r["tasks"])) for r in routines]
    text = table(("NAME", "ENABLED", "MODE", "STATUS", "SCHEDULE", "TASKS"), rows, flex=5) if routines else \
        "no routines; add one with 'flowctl routine add NAME TASK...' or 'flowctl apply FILE.toml'"
    ctx.emit(routines, text)
    return EXIT_OK


def cmd_routine_show(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import STATUS_TEXT, human_duration, local_time, parse_iso, routine_dict

    ctx.open_database()
    r = routine_dict(catalog.get_routine(ctx.args.name))
    schedule = r["schedule"] or "none (started by MQTT or flowctl only)"
    if r["schedule"]:
        schedule += f" ({r['timezone'] or 'system time zone'})" + (f", jitter {r['jitter']:g}s" if r["jitter"] else "")
    lines = [f"routine {r['name']} ({'enabled' if r['enabled'] else 'DISABLED'})",
             f"  tasks        {' -> '.join(r['tasks'])}",
             f"  schedule     {schedule}",
             f"  mode         {r['mode']} (max {r['max']})",
             f"  mqtt         {'may start it' if r['mqtt'] else 'may not start it'}",
             f"  timeout      {human_duration(r['timeout']) if r['timeout'] else 'none'}",
             f"  status       {STATUS_TEXT.get(r['status'], r['status'])}",
             f"  last run     {local_time(parse_iso(r['last_scheduled_run']))} (schedule)",
             f"  updated      {local_time(parse_iso(r['updated_at']))}"]
    ctx.emit(r, "\n".join(lines))
    return EXIT_OK


def cmd_routine_remove(ctx: Context) -> int:
    from flowd import catalog

    ctx.open_database()
    catalog.remove_routine(ctx.args.name)
    ctx.emit({"action": "removed", "routine": ctx.args.name}, f"routine {ctx.args.name} removed")
    return EXIT_OK


def cmd_routine_enable(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import routine_dict

    enabled = ctx.args.routine_command == "enable"
    ctx.open_database()
    routine = catalog.set_routine_enabled(ctx.args.name, enabled)
    word = "enabled" if enabled else "disabled"
    ctx.emit({"action": word, "routine": routine_dict(routine)}, f"routine {routine.name} {word}")
    return EXIT_OK


def cmd_apply(ctx: Context) -> int:
    from flowd.apply import apply_file

    ctx.open_database(create=True)
    report = apply_file(ctx.args.file, ctx.config.flowd.task_paths, prune=ctx.args.prune)
    ctx.emit(report.as_dict(), report.summary())
    return EXIT_OK


def cmd_submit(ctx: Context) -> int:
    from flowd.cli.display import flow_dict

    a = ctx.args
    args = [parse_value(v) for v in a.args]
    kwargs = parse_pairs(a.kw, "--kw")
    if a.request_id is not None and not a.request_id:
        raise UsageError("--request-id must not be empty")
    from flowd.api import check_flow_input

    check_flow_input(args, kwargs)  # e.g. bytes of another encoding in an argument: not UTF-8
    engine = ctx.engine()
    flow, created = engine.submit(a.routine, args, kwargs, request_id=a.request_id, trigger="cli")
    if not a.wait:
        if created:
            text = f"flow {flow.id} submitted ({flow.routine}, {flow.state})"
        else:
            text = f"flow {flow.id} already exists for request id {a.request_id!r} ({flow.state})"
        ctx.emit({**flow_dict(flow), "created": created}, text)
        return EXIT_OK
    return wait_for_flow(ctx, flow.id, a.timeout)


def wait_for_flow(ctx: Context, flow_id: int, timeout: float | None) -> int:
    """Follow a flow until it ends; the exit code is its outcome (see cli_run.follow_flow)."""
    from flowd.cli.run import follow_flow

    return follow_flow(ctx, flow_id, timeout)


def cmd_flows(ctx: Context) -> int:
    from flowd import api
    from flowd.cli.display import human_duration, iso, local_time, span, table
    from flowd.store.models import utcnow

    a = ctx.args
    ctx.open_database()
    flows = api.list_flows(a.state, a.routine, a.limit)
    now = utcnow()
    data = [{"id": f.id, "routine": f.routine, "state": f.state, "position": f.position, "steps": len(f.steps or []),
             "trigger": f.trigger, "request_id": f.request_id, "created_at": iso(f.created_at),
             "started_at": iso(f.started_at), "finished_at": iso(f.finished_at), "error": f.error} for f in flows]
    rows = [(f.id, f.routine, f.state, f"{min(f.position + 1, len(f.steps or []))}/{len(f.steps or [])}", f.trigger,
             local_time(f.created_at), human_duration(span(f.started_at, f.finished_at, now)))
            for f in flows]
    text = table(("ID", "ROUTINE", "STATE", "STEP", "TRIGGER", "CREATED", "TIME"), rows, flex=1) if flows \
        else "no flows" + (" match" if a.state or a.routine else " yet")
    if len(flows) == a.limit:
        text += f"\n(the {a.limit} newest; --limit N shows more)"
    ctx.emit(data, text)
    return EXIT_OK


def cmd_flow_show(ctx: Context) -> int:
    from flowd import api
    from flowd.cli.display import attempt_dict, flow_dict, render_flow

    ctx.open_database()
    flow = api.get_flow(ctx.args.id)
    data = {**flow_dict(flow), "trace": [attempt_dict(r) for r in api.flow_trace(flow.id)]}
    ctx.emit(data, render_flow(data))
    return EXIT_OK


def cmd_flow_cancel(ctx: Context) -> int:
    from flowd import api
    from flowd.cli.display import flow_dict

    ctx.engine()
    flow = api.cancel_flow(ctx.args.id, reason="cancelled with flowctl")
    ctx.emit(flow_dict(flow), f"flow {flow.id} ({flow.routine}) {flow.state}")
    return EXIT_OK


def cmd_flow_retry(ctx: Context) -> int:
    from flowd import api
    from flowd.cli.display import flow_dict

    ctx.engine()
    flow = api.retry_flow(ctx.args.id)
    steps = len(flow.steps or [])
    ctx.emit(flow_dict(flow), f"flow {flow.id} ({flow.routine}) {flow.state} again from step "
                              f"{flow.position + 1}/{steps} ({flow.steps[flow.position]})")
    return EXIT_OK


def cmd_prune(ctx: Context) -> int:
    from flowd import api
    from flowd.cli.display import human_age

    older_than = ctx.args.older_than if ctx.args.older_than is not None else ctx.config.flowd.retention
    ctx.engine()
    dry_run = ctx.args.dry_run
    removed = api.prune(older_than, dry_run=dry_run)
    flows = f"{removed} flow{'s' if removed != 1 else ''} ended more than {human_age(older_than)} ago"
    ctx.emit({"removed": 0 if dry_run else removed, "would_remove": removed if dry_run else None,
              "older_than": older_than, "dry_run": dry_run},
             f"would prune {flows} (--dry-run: nothing deleted)" if dry_run else f"pruned {flows}")
    return EXIT_OK


def cmd_db_check(ctx: Context) -> int:
    """SQLite's quick_check (integrity_check with --full) of the database and the queue file."""
    from flowd.cli.display import db_check_text
    from flowd.store import integrity

    results = integrity.check_files(ctx.config, full=ctx.args.full)
    damaged = any(r.ok is False for r in results)
    ctx.emit({"ok": not damaged, "files": [r.as_dict() for r in results]}, db_check_text(results))
    return EXIT_STORE if damaged else EXIT_OK


def cmd_db_recover(ctx: Context) -> int:
    """Salvage a damaged database into a new file; the damaged one is kept beside it."""
    from flowd.cli.display import recovery_text
    from flowd.store import dbrecover

    report = dbrecover.recover_database(ctx.config, force=ctx.args.force)
    ctx.emit(report.as_dict(), recovery_text(report))
    return EXIT_OK


# --------------------------------------------------------------------------- argument parser
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so flowctl owns the output."""

    def error(self, message: str) -> NoReturn:
        from flowd.cli.hints import explain_invalid_choice

        raise UsageError(f"{explain_invalid_choice(message)} (see '{self.prog} --help')")


COMMANDS = {
    "status": "daemon, broker, queue depth, flows by state",
    "scripts": "task scripts found in the task folders",
    "task": "add, list, show or remove stored tasks",
    "routine": "add, list, show, remove, enable or disable routines",
    "apply": "create or update tasks and routines from a TOML file; idempotent",
    "submit": "start a flow of a routine",
    "flows": "list flows, newest first",
    "flow": "show, cancel or retry one flow",
    "prune": "delete ended flows and their results now",
    "run": "run a routine in the foreground, in this process, without the daemon or the broker",
    "nodes": "every flowd node seen on the broker, with version, since and counts",
    "db": "check the database file, or salvage a damaged one",
}


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (skipping global options), to build only its parser."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--config":
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """flowctl's parser; with ``command`` only that command's arguments are built.

    Every sub-parser costs ~0.4 ms here (several on a Pi), and flowctl has thirty.
    """
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $FLOWD_CONFIG, /etc/flowd/flowd.toml, ./config/flowd.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON on stdout (errors too, as {\"error\": ...})")
    parser = _Parser(prog="flowctl", description="Manage flowd: tasks, routines and flows.",
                     epilog="exit codes: 0 ok, 1 flow FAILED/CANCELLED (submit --wait, flow wait, run), "
                            "2 bad usage or input, 3 database, queue or broker unreachable (db check: damaged), "
                            "124 --timeout ran out while waiting, 130 Ctrl-C while waiting")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="config file (default: $FLOWD_CONFIG, /etc/flowd/flowd.toml, ./config/flowd.toml)")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print JSON on stdout, for programs (also after the command)")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    parser.usage = "flowctl [--config PATH] [--json] COMMAND ..."  # after: sub-commands read it for their prog

    def add(sub: Any, name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    def group(name: str, dest: str) -> Any:
        p = commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], parents=[common])
        return p.add_subparsers(dest=dest, metavar="ACTION", required=True, parser_class=_Parser)

    for name, help_text in COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=help_text, add_help=False)
            continue
        if name == "status":
            add(commands, "status", cmd_status, help_text)
        elif name == "scripts":
            add(commands, "scripts", cmd_scripts, help_text)
        elif name == "task":
            _add_task_parsers(group("task", "task_command"), add)
        elif name == "routine":
            _add_routine_parsers(group("routine", "routine_command"), add)
        elif name == "apply":
            p = add(commands, "apply", cmd_apply, help_text)
            p.add_argument("file", metavar="FILE.toml")
            p.add_argument("--prune", action="store_true", help="also remove tasks and routines the file does not name")
        elif name == "submit":
            p = add(commands, "submit", cmd_submit, help_text)
            p.add_argument("routine", metavar="ROUTINE")
            p.add_argument("args", metavar="ARG", nargs="*", default=[], help="positional arguments (JSON or strings)")
            p.add_argument("--kw", action="append", metavar="K=V",
                           help="keyword argument (repeatable; V is JSON or a string)")
            p.add_argument("--request-id", metavar="ID", help="idempotency key: a repeat returns the existing flow")
            p.add_argument("--wait", action="store_true", help="follow the flow and exit with its outcome")
            p.add_argument("--timeout", type=_duration, metavar="S", help="with --wait: stop waiting after S seconds")
        elif name == "flows":
            p = add(commands, "flows", cmd_flows, help_text)
            p.add_argument("--state", type=_state, metavar="S", help=f"one of {', '.join(STATES)}")
            p.add_argument("--routine", metavar="R")
            p.add_argument("--limit", type=_positive, default=20, metavar="N", help="at most N flows (default 20)")
        elif name == "flow":
            flow_cmds = group("flow", "flow_command")
            for action, func, text in (
                    ("show", cmd_flow_show, "every step and attempt of a flow"),
                    ("cancel", cmd_flow_cancel, "cancel a flow that has not ended"),
                    ("retry", cmd_flow_retry, "resume a FAILED or CANCELLED flow from its failed step")):
                add(flow_cmds, action, func, text).add_argument("id", metavar="ID", type=_flow_id)
            from flowd.cli import run as cli_run

            cli_run.add_flow_wait_parser(flow_cmds, add, _flow_id, _duration)
        elif name in ("run", "nodes"):
            from flowd.cli import run as cli_run

            (cli_run.add_run_parser if name == "run" else cli_run.add_nodes_parser)(commands, add, help_text)
        elif name == "prune":
            p = add(commands, "prune", cmd_prune, help_text)
            p.add_argument("--older-than", type=_duration, metavar="AGE",
                           help="e.g. 30d, 12h (default: the retention)")
            p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
        elif name == "db":
            db_cmds = group("db", "db_command")
            p = add(db_cmds, "check", cmd_db_check, "check the database and the queue file (exit 3: damaged); "
                                                    "read-only, safe while flowd runs")
            p.add_argument("--full", action="store_true", help="integrity_check (every index too) instead of "
                                                                "quick_check")
            p = add(db_cmds, "recover", cmd_db_recover, "with flowd stopped: salvage a damaged database into a new "
                                                        "file, keep the damaged one beside it, say what was lost")
            p.add_argument("--force", action="store_true", help="rebuild the file even when it passes the check")
    return parser


def _add_task_parsers(task_cmds: Any, add: Any) -> None:
    p = add(task_cmds, "add", cmd_task_add, "create a task (--replace: update an existing one in place)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--replace", action="store_true", help="change the task if it exists (else: refused)")
    p.add_argument("script", metavar="SCRIPT", help="module.Class, e.g. example.VeryLong")
    p.add_argument("--retries", type=_count, metavar="N")
    p.add_argument("--retry-delay", type=_duration, metavar="S", help="seconds before the first retry (doubles)")
    p.add_argument("--timeout", type=_duration, metavar="S", help="seconds one attempt may run")
    p.add_argument("--option", action="append", metavar="K=V",
                   help="default keyword argument (repeatable; V is JSON or a string)")
    add(task_cmds, "list", cmd_task_list, "list tasks")
    add(task_cmds, "show", cmd_task_show, "show one task").add_argument("name", metavar="NAME")
    add(task_cmds, "remove", cmd_task_remove, "remove a task no routine uses").add_argument("name", metavar="NAME")


def _add_routine_parsers(routine_cmds: Any, add: Any) -> None:
    p = add(routine_cmds, "add", cmd_routine_add, "create a routine (--replace: replace an existing one's definition)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--replace", action="store_true", help="replace the routine if it exists (else: refused)")
    p.add_argument("tasks", metavar="TASK", nargs="+")
    p.add_argument("--schedule", metavar="CRON", help="'*/5 * * * *' or '@every 30s'")
    p.add_argument("--timezone", metavar="TZ", help="IANA zone of the schedule (default: the system's)")
    p.add_argument("--jitter", type=_duration, metavar="S", help="spread scheduled runs by up to S seconds")
    p.add_argument("--no-mqtt", action="store_true", help="MQTT may not start this routine")
    p.add_argument("--mode", choices=("parallel", "queued", "single", "restart"), default="parallel")
    p.add_argument("--max", type=_positive, default=10, metavar="N", help="concurrency limit of the mode")
    p.add_argument("--timeout", type=_duration, metavar="S", help="seconds the whole flow may take")
    p.add_argument("--status", choices=("steps", "states", "off"), default="steps",
                   help="flow/<id>/status messages: each state change and finished step (steps, the default), "
                        "state changes only (states), or none (off)")
    add(routine_cmds, "list", cmd_routine_list, "list routines")
    for name, func, text in (("show", cmd_routine_show, "show one routine"),
                             ("remove", cmd_routine_remove, "remove a routine (its flows stay)"),
                             ("enable", cmd_routine_enable, "let schedules, MQTT and flowctl start it"),
                             ("disable", cmd_routine_enable, "stop schedules, MQTT and flowctl from starting it")):
        add(routine_cmds, name, func, text).add_argument("name", metavar="NAME")


def _version() -> str:
    from flowd import __version__

    return f"flowctl {__version__}"


# --------------------------------------------------------------------------- main
def redact(url: str) -> str:
    """A database URL without its password (``postgresql://u:***@host/db``)."""
    from flowd.config import redact_url

    return redact_url(url)


def store_failure(exc: BaseException, database: str = "the database") -> str | None:
    """A sentence, when ``exc`` says the database or the queue cannot be used (locked,
    read-only, not a database, driver missing, Redis away); None for anything else (a
    bug, which keeps its traceback)."""
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


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``submit`` also takes ARGs after its options (``submit r --kw a=1 x y``)."""
    command = command_of(argv)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if command in ("submit", "run") and not any(token.startswith("-") for token in extra):
        args.args = [*args.args, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one flowctl command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    ctx: Context | None = None
    try:
        args = parse_arguments(argv)
        ctx = Context(args)
        want_json = ctx.json
        code = int(args.func(ctx))
        ctx.finish(succeeded=True)
        return code
    except (ConfigError, InputError, TaskScriptError) as exc:
        from flowd.cli.hints import with_suggestion

        if ctx is not None:
            ctx.finish(succeeded=False)
        return _fail(with_suggestion(exc), EXIT_USAGE, want_json)
    except StoreUnavailable as exc:
        if ctx is not None:
            ctx.finish(succeeded=False)
        return _fail(damage_hint(exc, str(exc)), EXIT_STORE, want_json)
    except KeyboardInterrupt:
        print("flowctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `flowctl flows | head -3`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        where = redact(ctx.config.database.url) if ctx is not None and ctx._config is not None else "the database"
        reason = store_failure(exc, where) if "peewee" in sys.modules else None
        if reason is None:
            raise
        return _fail(reason, EXIT_STORE, want_json)


def _fail(message: str, code: int, want_json: bool) -> int:
    print(f"flowctl: {message}", file=sys.stderr)
    if want_json:
        import json

        print(json.dumps({"error": message, "exit_code": code}))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
