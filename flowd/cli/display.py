"""flowctl's output: tables, durations, local times, the --json dicts, flow traces.

Everything that turns rows into text or JSON-ready dicts lives here, so cli.py keeps
to parsing arguments, running commands and choosing exit codes. Like cli.py it
imports nothing heavy at the top: each helper loads what it needs when called.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence
    from typing import Any

    from flowd.store import Row
    from flowd.store.dbrecover import RecoveryReport
    from flowd.store.integrity import CheckResult
    from flowd.store.models import Routine, Task


# --------------------------------------------------------------------------- times and durations
def iso(value: dt.datetime | None) -> str | None:
    """A database time as the ISO text --json prints (UTC, ``Z``)."""
    from flowd.store.models import isoformat

    return isoformat(value)


def local_time(value: dt.datetime | None) -> str:
    """A naive-UTC database time shown in the machine's time zone, to the second."""
    if value is None:
        return "-"
    import datetime as dt

    return value.replace(tzinfo=dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def human_duration(seconds: float | None) -> str:
    """``4.2s``, ``42s``, ``7m05s``, ``3h20m``, ``5d2h``: short enough for a table column."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24}h"


def human_age(seconds: float) -> str:
    """An age a person gave (``--older-than 7d``) said back in words: ``7 days``, ``12 hours``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count = seconds / size
        if count >= 1 and count == int(count):
            return f"{int(count)} {unit}{'s' if count != 1 else ''}"
    return human_duration(seconds)


def span(start: dt.datetime | None, end: dt.datetime | None, now: dt.datetime | None = None) -> float | None:
    """Seconds from ``start`` to ``end`` (or ``now``, for what still runs); None before it starts."""
    if start is None:
        return None
    from flowd.store.models import utcnow

    return max(((end or now or utcnow()) - start).total_seconds(), 0.0)


def parse_iso(text: str | None) -> dt.datetime | None:
    """An ISO time from a --json dict back to a naive-UTC datetime (None stays None)."""
    import datetime as dt

    return dt.datetime.fromisoformat(text.rstrip("Z")) if text else None


# --------------------------------------------------------------------------- text and tables
def shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters, cut with an ellipsis."""
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def compact(value: Any, width: int) -> str:
    """A JSON value on one line, cut to ``width`` with an ellipsis."""
    import json

    return shorten(json.dumps(value, separators=(",", ":"), ensure_ascii=False), width)


def terminal_width() -> int:
    """Columns of the terminal: $COLUMNS, else the terminal's width, else 80 (piped)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.stdout.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return max(columns, 40)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], flex: int, width: int | None = None) -> str:
    """Left-aligned columns; column ``flex`` is cut so a line fits ``width`` (80 columns by default)."""
    width = (width or terminal_width()) - 1
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    over = sum(widths) + 2 * (len(widths) - 1) - width
    if over > 0:
        widths[flex] = max(widths[flex] - over, len(headers[flex]), 6)
    lines = []
    for row in cells:
        parts = [shorten(cell, widths[i]).ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- dicts for --json
def flow_dict(flow: Row) -> dict[str, Any]:
    """A flow for --json, with its children and what it waits for."""
    steps = list(flow.steps or [])
    from flowd import store

    children = [{"id": c.id, "routine": c.routine, "state": c.state} for c in store.child_flows(flow.id)]
    waiting = None
    if flow.wait_topic:
        waiting = {"topic": flow.wait_topic, "match": flow.wait_match, "until": iso(flow.wait_until)}
    return {
        "id": flow.id, "uid": flow.uid, "routine": flow.routine, "state": flow.state,
        "position": flow.position, "steps": steps,
        "task": steps[flow.position] if 0 <= flow.position < len(steps) else None,
        "args": flow.args, "kwargs": flow.kwargs, "request_id": flow.request_id, "trigger": flow.trigger,
        "reply_to": flow.reply_to, "result": flow.result, "error": flow.error,
        "created_at": iso(flow.created_at), "started_at": iso(flow.started_at),
        "finished_at": iso(flow.finished_at), "parent": flow.parent_id,
        "children": children,
        "waiting_for": waiting,
    }


def attempt_dict(result: Row) -> dict[str, Any]:
    """One attempt of one step for --json (``flow show`` trace)."""
    return {
        "position": result.position, "task": result.task, "attempt": result.attempt, "state": result.state,
        "input": result.input, "output": result.output, "error": result.error,
        "started_at": iso(result.started_at), "finished_at": iso(result.finished_at),
        "duration": span(result.started_at, result.finished_at),
    }


def task_dict(task: Task) -> dict[str, Any]:
    """A task for --json, with the routines that use it."""
    from flowd import catalog

    users = catalog.routines_using(task)
    return {
        "name": task.name, "script": task.script, "options": task.options, "retries": task.retries,
        "retry_delay": task.retry_delay, "retry_backoff_max": task.retry_backoff_max, "timeout": task.timeout,
        "routines": users, "created_at": iso(task.created_at), "updated_at": iso(task.updated_at),
    }


STATUS_TEXT = {"steps": "steps (each state change and each finished step)",
               "states": "states (state changes only)", "off": "off (no status messages; the result still goes out)"}


def routine_dict(routine: Routine) -> dict[str, Any]:
    """A routine for --json."""
    return {
        "name": routine.name, "tasks": routine.task_names(), "schedule": routine.schedule,
        "timezone": routine.timezone, "jitter": routine.jitter, "mqtt": routine.mqtt, "mode": routine.mode,
        "max": routine.max, "timeout": routine.timeout, "enabled": routine.enabled, "status": routine.status,
        "last_scheduled_run": iso(routine.last_scheduled_run),
        "created_at": iso(routine.created_at), "updated_at": iso(routine.updated_at),
    }


# --------------------------------------------------------------------------- flow progress and trace
def progress_line(flow: Row, task_name: str, attempt: int, attempt_state: str | None, retries: int) -> str:
    """``flow 12 (fetch-weather) RUNNING step 2/3 digest, try 2/4``: changes only when
    something happens, so piped output gets one line per change."""
    head = f"flow {flow.id} ({flow.routine}) {flow.state}"
    if flow.state == "INIT" and not flow.admitted:
        return f"{head}: waiting for its turn (the routine's mode limits how many run)"
    if flow.state == "INIT" and attempt == 0 and flow.position == 0:
        return f"{head}: queued, waiting for a worker"
    line = f"{head} step {flow.position + 1}/{len(flow.steps)} {task_name}"
    if attempt_state == "FAILED" and flow.state in ("RUNNING", "INIT"):
        line += f", try {attempt}/{retries + 1} failed, retrying"
    elif attempt > 1:
        line += f", try {attempt}/{retries + 1}"
    if flow.state == "WAITING":
        line += f", waiting for a message on '{flow.wait_topic}'" if flow.wait_topic else ", waiting for a sub-flow"
    return line


def render_flow(data: dict[str, Any]) -> str:
    """The flow and every attempt of every step, readable on an 80-column terminal."""
    width = terminal_width() - 1
    value_width = width - 13
    at = parse_iso
    took = span(at(data["started_at"]), at(data["finished_at"]))
    lines = [f"flow {data['id']}  {data['routine']}  {data['state']}"
             + (f"  step {min(data['position'] + 1, len(data['steps']))}/{len(data['steps'])}"
                if data["state"] not in ("DONE",) else ""),
             f"  uid        {data['uid']}",
             f"  trigger    {data['trigger']}" + (f"   request id {data['request_id']}" if data["request_id"] else "")
             + (f"   reply to {data['reply_to']}" if data["reply_to"] else ""),
             f"  created    {local_time(at(data['created_at']))}"
             + (f"   took {human_duration(took)}" if data["finished_at"] else ""),
             f"  input      {compact({'args': data['args'], 'kwargs': data['kwargs']}, value_width)}"]
    if data["result"] is not None:
        lines.append(f"  result     {compact(data['result'], value_width)}")
    if data["error"]:
        lines.append(f"  error      {shorten(data['error'].strip().splitlines()[-1], value_width)}")
    if data["waiting_for"]:
        w = data["waiting_for"]
        until = f" until {local_time(at(w['until']))}" if w["until"] else ""
        lines.append(f"  waiting    for a message on '{w['topic']}'"
                     + (f" matching {compact(w['match'], 40)}" if w["match"] else "") + until)
    if data["parent"]:
        lines.append(f"  parent     flow {data['parent']} (flowctl flow show {data['parent']})")
    for child in data["children"]:
        lines.append(f"  child      flow {child['id']} ({child['routine']}, {child['state']})")
    lines.append("")
    lines.append(" #  TASK                 TRY  STATE      TIME     STARTED")
    seen = set()
    for r in data["trace"]:
        seen.add(r["position"])
        lines.append(f"{r['position'] + 1:>2}  {shorten(r['task'], 20):<20} {r['attempt']:>3}  {r['state']:<9}  "
                     f"{human_duration(r['duration']):<7}  {local_time(at(r['started_at']))}")
        if r["attempt"] == 1 or r["position"] == 0:
            lines.append(f"      in    {compact(r['input'], width - 12)}")
        if r["output"] is not None:
            lines.append(f"      out   {compact(r['output'], width - 12)}")
        if r["error"]:
            lines.append(f"      error {shorten(r['error'].rstrip().splitlines()[-1], width - 12)}")
            where = script_frame(r["error"])
            if where:
                lines.append(f"      at    {shorten(where, width - 12)}")
    if any(r["error"] for r in data["trace"]):
        lines.append(f"(whole tracebacks: flowctl --json flow show {data['id']})")
    for position, name in enumerate(data["steps"]):
        if position not in seen:
            lines.append(f"{position + 1:>2}  {shorten(name, 20):<20}   -  not run")
    return "\n".join(lines)


def script_frame(error: str) -> str | None:
    """``task_http.py:21 in perform``: the innermost traceback frame in a task script."""
    import re

    found = re.findall(r'File "[^"]*?([^"/]*task_[^"/]+\.py)", line (\d+), in (\S+)', error)
    return f"{found[-1][0]}:{found[-1][1]} in {found[-1][2]}" if found else None


# --------------------------------------------------------------------------- db check / db recover
def human_size(size: int) -> str:
    """``812 B``, ``196 KiB``, ``12.4 MiB``."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KiB"
    return f"{size / 1024 / 1024:.1f} MiB"


def id_ranges(ids: Sequence[int], limit: int = 12) -> str:
    """``[3, 4, 5, 9]`` -> ``3-5, 9``, with ``(N more)`` past ``limit`` ranges."""
    ranges: list[str] = []
    start = prev = None
    for n in sorted(ids):
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            ranges.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = n
    if start is not None:
        ranges.append(f"{start}-{prev}" if prev != start else str(start))
    more = f" ({len(ranges) - limit} more)" if len(ranges) > limit else ""
    return ", ".join(ranges[:limit]) + more


def db_check_text(results: Sequence[CheckResult]) -> str:
    """``flowctl db check``: one line per file, its problems under it, what to do."""
    lines = []
    for r in results:
        label = f"{r.what:<10} {r.path}:"
        if r.ok is None:
            lines.append(f"{label} {r.note}")
        elif r.ok:
            lines.append(f"{label} ok ({r.check}, {human_size(r.size)}, {r.seconds:.2f}s)")
        else:
            lines.append(f"{label} DAMAGED ({r.check} found {len(r.problems)} problem"
                         f"{'s' if len(r.problems) != 1 else ''})")
            lines.extend(f"  {shorten(problem, terminal_width() - 3)}" for problem in r.problems[:10])
            if len(r.problems) > 10:
                lines.append(f"  ... {len(r.problems) - 10} more (--json lists them all)")
            if r.what == "database":
                lines.append("  -> flowd refuses to run on it: stop flowd, then 'flowctl db recover' salvages it "
                             "into a new file (the damaged one is kept)")
            else:
                lines.append("  -> flowd sets it aside and starts a new one at its next start; no flow is lost "
                             "(they are queued again from the database)")
    return "\n".join(lines)


def recovery_text(report: RecoveryReport) -> str:
    """``flowctl db recover``: what was saved, what was lost, where the damaged file is."""
    if report.action != "recovered":
        return (f"the database {report.database} passes {report.check.check}: nothing to recover "
                "(--force rebuilds it anyway)")
    lines = [f"recovered {report.database} in {report.seconds:.1f}s",
             f"  the damaged file is kept as {report.kept_as} (with its -wal/-shm, if it had them)"]
    if report.header_damaged:
        lines.append(f"  its header was damaged: read with page size {report.page_size}, found from the pages")
    if report.wal_frames:
        lines.append(f"  {report.wal_frames} committed page(s) read from its write-ahead log")
    if report.bad_pages:
        pages = sorted(report.bad_pages)
        first = report.bad_pages[pages[0]]
        lines.append(f"  unreadable page(s): {id_ranges(pages)} (first: page {pages[0]}, {first})")
    rows = []
    for name, t in report.tables.items():
        rows.append((name, t.seen, t.saved, len(t.lost_ids), t.adopted or "", t.dropped or "",
                     id_ranges(t.lost_ids, 6) if t.lost_ids else ""))
    lines.append("")
    lines.append(table(("TABLE", "SEEN", "SAVED", "LOST", "RE-LINKED", "DROPPED", "LOST IDS"), rows, flex=6))
    lines.append("  SEEN: rows the damaged file still showed in the table or in one of its indexes; rows on a")
    lines.append("  destroyed page that no index lists cannot be counted. RE-LINKED: found on pages cut off")
    lines.append("  from their table. DROPPED: read but unusable (damaged values, or they refer to lost rows).")
    lines.append("")
    states = ("INIT", "RUNNING", "WAITING", "DONE", "FAILED", "CANCELLED")

    def by_state(counts: dict[str, int]) -> str:
        order = [s for s in states if s in counts] + sorted(s for s in counts if s not in states)
        return "  ".join(f"{s} {counts[s]}" for s in order) or "none"

    if report.flows_before:
        lines.append(f"  flows before (state index): {by_state(report.flows_before)}")
    lines.append(f"  flows now:                  {by_state(report.flows_after)}")
    if report.lost_flows:
        lines.append(f"  flows lost, by last state:  {by_state(report.lost_flows)}")
    if report.flows_missing_steps:
        lines.append(f"  flows saved without some step records: {id_ranges(report.flows_missing_steps)} "
                     "('flowctl flow show ID' lists what is left)")
    if report.lost_and_found:
        lines.append(f"  {report.lost_and_found} row(s) whose table could not be told are in "
                     f"{report.lost_and_found_file} (table lost_and_found)")
    if report.disabled_routines:
        lines.append(f"  routine(s) disabled because a step's task was lost: {', '.join(report.disabled_routines)}"
                     " (re-create the task, then 'flowctl routine enable NAME')")
    if report.queue_kept_as:
        lines.append(f"  the queue file was damaged too: kept as {report.queue_kept_as}; flowd starts a new one")
    lines.append("  next: start flowd (systemctl start flowd); flows that were RUNNING resume at their step")
    return "\n".join(lines)
