"""flowctl commands on definitions: scripts, task, routine, apply."""

from __future__ import annotations

import os

from flowd.cli.common import EXIT_OK, Context, UsageError, parse_pairs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any



def cmd_scripts(ctx: Context) -> int:
    """Every Task class in the task folders; a file that cannot be read is listed with its error."""
    from flowd import catalog
    from flowd.cli.display import table

    data: list[dict[str, Any]] = [
        {"script": s.reference or None, "path": s.path, "doc": s.doc, "error": s.error}
        for s in catalog.list_scripts(ctx.config.flowd.task_paths)]
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
    from flowd.cli.display import human_duration, task_dict

    ctx.open_database()
    tasks = [task_dict(t) for t in catalog.list_tasks()]
    rows = [(t["name"], t["script"], t["retries"], human_duration(t["timeout"]), ", ".join(t["routines"]))
            for t in tasks]
    return _listing(ctx, tasks, ("NAME", "SCRIPT", "RETRIES", "TIMEOUT", "USED BY"), rows,
                    "no tasks; add one with 'flowctl task add NAME SCRIPT' or 'flowctl apply FILE.toml'")


def cmd_task_show(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import compact, human_duration, local_time, parse_iso, task_dict, terminal_width

    ctx.open_database()
    t = task_dict(catalog.get_task(ctx.args.name))
    width = terminal_width() - 15
    ctx.emit(t, card(f"task {t['name']}", [
        ("script", t["script"]),
        ("options", compact(t["options"], width)),
        ("retries", f"{t['retries']} (delay {t['retry_delay']:g}s, doubling up to {t['retry_backoff_max']:g}s)"),
        ("timeout", human_duration(t["timeout"]) if t["timeout"] else "none"),
        ("used by", ", ".join(t["routines"]) or "no routine"),
        ("updated", local_time(parse_iso(t["updated_at"])))]))
    return EXIT_OK


def _listing(ctx: Context, data: list[dict[str, Any]], headers: tuple[str, ...], rows: list[tuple[Any, ...]],
             empty: str) -> int:
    """A ``list`` command's output: a table whose last column takes the spare width, or ``empty``."""
    from flowd.cli.display import table

    ctx.emit(data, table(headers, rows, flex=len(headers) - 1) if data else empty)
    return EXIT_OK


def card(title: str, fields: list[tuple[str, str]]) -> str:
    """A ``show`` command's text: the title, then one indented ``label  value`` line each."""
    return "\n".join([title, *(f"  {label:<12} {value}" for label, value in fields)])


def _remove(ctx: Context, kind: str, remove: Callable[[str], None]) -> int:
    ctx.open_database()
    remove(ctx.args.name)
    ctx.emit({"action": "removed", kind: ctx.args.name}, f"{kind} {ctx.args.name} removed")
    return EXIT_OK


def cmd_task_remove(ctx: Context) -> int:
    from flowd import catalog

    return _remove(ctx, "task", catalog.remove_task)


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
    from flowd.cli.display import routine_dict

    ctx.open_database()
    routines = [routine_dict(r) for r in catalog.list_routines()]
    rows = [(r["name"], "yes" if r["enabled"] else "no", r["mode"], r["status"], r["schedule"],
             " -> ".join(r["tasks"])) for r in routines]
    return _listing(ctx, routines, ("NAME", "ENABLED", "MODE", "STATUS", "SCHEDULE", "TASKS"), rows,
                    "no routines; add one with 'flowctl routine add NAME TASK...' or 'flowctl apply FILE.toml'")


def cmd_routine_show(ctx: Context) -> int:
    from flowd import catalog
    from flowd.cli.display import STATUS_TEXT, human_duration, local_time, parse_iso, routine_dict

    ctx.open_database()
    r = routine_dict(catalog.get_routine(ctx.args.name))
    schedule = r["schedule"] or "none (started by MQTT or flowctl only)"
    if r["schedule"]:
        schedule += f" ({r['timezone'] or 'system time zone'})" + (f", jitter {r['jitter']:g}s" if r["jitter"] else "")
    ctx.emit(r, card(f"routine {r['name']} ({'enabled' if r['enabled'] else 'DISABLED'})", [
        ("tasks", " -> ".join(r["tasks"])),
        ("schedule", schedule),
        ("mode", f"{r['mode']} (max {r['max']})"),
        ("mqtt", "may start it" if r["mqtt"] else "may not start it"),
        ("timeout", human_duration(r["timeout"]) if r["timeout"] else "none"),
        ("status", STATUS_TEXT.get(r["status"], r["status"])),
        ("last run", f"{local_time(parse_iso(r['last_scheduled_run']))} (schedule)"),
        ("updated", local_time(parse_iso(r["updated_at"])))]))
    return EXIT_OK


def cmd_routine_remove(ctx: Context) -> int:
    from flowd import catalog

    return _remove(ctx, "routine", catalog.remove_routine)


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
