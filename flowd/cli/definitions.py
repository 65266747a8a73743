"""flowctl commands on definitions: scripts, task, routine, apply."""

from __future__ import annotations

import os

from flowd.cli.common import EXIT_OK, Context, UsageError, parse_pairs
from flowd.errors import TaskScriptError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any



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
