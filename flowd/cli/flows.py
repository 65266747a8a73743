"""flowctl commands on flows and the daemon: status, submit, flows, flow show/cancel/retry,
prune, db check/recover (``flow wait``, ``run`` and ``nodes``: :mod:`flowd.cli.run`).
"""

from __future__ import annotations

from flowd.cli.common import (
    EXIT_OK,
    EXIT_STORE,
    Context,
    UsageError,
    parse_pairs,
    parse_value,
    redact,
)
from flowd.states import STATES

TYPE_CHECKING = False
if TYPE_CHECKING:
    pass



# --------------------------------------------------------------------------- commands
def cmd_status(ctx: Context) -> int:
    """Daemon, broker, queue depth, flows by state, outbox size."""
    from flowd import api
    from flowd.cli import hints
    from flowd.cli.display import human_duration, local_time, parse_iso, span

    ctx.open_database()
    now = api.now()
    report = api.status_report(ctx.config, fresh=ctx.fresh)
    nodes, queue_error, depth = report["nodes"], report["queue_error"], report["queue_depth"]
    counts, outbox = report["flows"], report["outbox"]
    data = {**report, "database": redact(ctx.config.database.url), "database_exists": not ctx.fresh,
            "config": ctx.config.path}
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
    """Follow a flow until it ends; the exit code is its outcome (see ``flowd.cli.run.follow_flow``)."""
    from flowd.cli.run import follow_flow

    return follow_flow(ctx, flow_id, timeout)


def cmd_flows(ctx: Context) -> int:
    from flowd import api
    from flowd.cli.display import human_duration, iso, local_time, span, table

    a = ctx.args
    ctx.open_database()
    flows = api.list_flows(a.state, a.routine, a.limit)
    now = api.now()
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
    from flowd import api
    from flowd.cli.display import db_check_text

    results = api.check_database(ctx.config, full=ctx.args.full)
    damaged = any(r.ok is False for r in results)
    ctx.emit({"ok": not damaged, "files": [r.as_dict() for r in results]}, db_check_text(results))
    return EXIT_STORE if damaged else EXIT_OK


def cmd_db_recover(ctx: Context) -> int:
    """Salvage a damaged database into a new file; the damaged one is kept beside it."""
    from flowd import api
    from flowd.cli.display import recovery_text

    report = api.recover_database(ctx.config, force=ctx.args.force)
    ctx.emit(report.as_dict(), recovery_text(report))
    return EXIT_OK


# --------------------------------------------------------------------------- argument parser
