"""``flowctl apply``: create or update tasks and routines from a TOML file (SPEC 6).

The whole file is checked before anything is written, and everything is written in
one transaction, so a file with one mistake changes nothing. Applying the same file
twice changes nothing the second time. Tasks and routines the file does not name are
left alone unless ``prune`` is set, in which case the file is the complete truth.

A key left out of a table means its default (so deleting ``timeout = 30`` from the
file removes the timeout), except a routine's ``enabled``: left out, an existing
routine keeps the state ``flowctl routine enable/disable`` gave it.

>>> report = apply_file("config/routines.toml", config.flowd.task_paths)
>>> report.tasks.created
['fetch', 'digest']
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowd.config import parse_duration
from flowd.errors import InputError, TaskScriptError

TASK_KEYS = ("script", "options", "retries", "retry_delay", "retry_backoff_max", "timeout")
ROUTINE_KEYS = ("tasks", "schedule", "timezone", "mode", "max", "mqtt", "timeout", "enabled", "jitter", "status")


class ApplyError(InputError):
    """The apply file has mistakes; nothing was written. One line naming every problem."""

    def __init__(self, path: str, problems: list[str]):
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        super().__init__(f"{path}: {count}, nothing applied: " + "; ".join(problems))
        self.path = path
        self.problems = problems


@dataclass
class Changes:
    """Names, by what happened to them."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass
class ApplyReport:
    """What :func:`apply_file` did to tasks and routines."""

    path: str
    tasks: Changes = field(default_factory=Changes)
    routines: Changes = field(default_factory=Changes)

    @property
    def changed(self) -> bool:
        return any(getattr(c, k) for c in (self.tasks, self.routines) for k in ("created", "updated", "removed"))

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.path, "changed": self.changed, "tasks": asdict(self.tasks),
                "routines": asdict(self.routines)}

    def summary(self) -> str:
        """A line per change (``task fetch: created``), then the counts."""
        lines: list[str] = []
        counts: list[str] = []
        for kind, changes in (("task", self.tasks), ("routine", self.routines)):
            for what in ("created", "updated", "removed"):
                lines.extend(f"{kind} {name}: {what}" for name in getattr(changes, what))
            parts = [f"{len(getattr(changes, w))} {w}" for w in ("created", "updated", "removed", "unchanged")
                     if getattr(changes, w)]
            counts.append(f"{kind}s: {', '.join(parts) or 'none'}")
        head = "" if self.changed else "nothing changed; "
        lines.append(f"{self.path}: {head}{'; '.join(counts)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    script: str
    options: dict[str, Any]
    retries: int
    retry_delay: float
    retry_backoff_max: float
    timeout: float | None


@dataclass(frozen=True)
class RoutineSpec:
    name: str
    tasks: list[str]
    schedule: str | None
    timezone: str | None
    mode: str
    max: int
    mqtt: bool
    timeout: float | None
    enabled: bool | None
    jitter: float | None
    status: str = "steps"


def read_file(path: str | Path) -> dict[str, Any]:
    """The parsed TOML document; InputError naming the file when it cannot be read."""
    where = str(path)
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{where}: the file does not exist") from None
    except PermissionError:
        raise InputError(f"{where}: the file cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise InputError(f"{where}: is a folder, not a TOML file") from None
    except UnicodeDecodeError:
        raise InputError(f"{where}: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{where}: not valid TOML: {exc}") from None


def check_document(doc: dict[str, Any], task_paths: Iterable[str], existing_tasks: Iterable[str] = (),
                   *, prune: bool = False) -> tuple[list[TaskSpec], list[RoutineSpec], list[str]]:
    """Check a parsed apply file without touching the database; returns the tasks,
    the routines and the problems found (each naming its table and key)."""
    from flowd.store.models import MODES, STATUS_MODES, Routine, Task

    problems: list[str] = []
    paths = tuple(task_paths)
    for key in doc:
        if key not in ("tasks", "routines"):
            problems.append(f"[{key}]: unknown table; an apply file has only [tasks.NAME] and [routines.NAME]")
    task_tables = _tables(doc, "tasks", problems)
    routine_tables = _tables(doc, "routines", problems)

    tasks: list[TaskSpec] = []
    for name, table in task_tables.items():
        before = len(problems)
        where = _check_entry("task", name, table, TASK_KEYS, problems)
        script = table.get("script")
        if script is None:
            problems.append(f"{where} script: missing; write it as module.Class, e.g. script = \"example.VeryLong\"")
        elif not isinstance(script, str):
            problems.append(f"{where} script: must be a string like \"example.VeryLong\", not {script!r}")
        else:
            from flowd.loader import check_reference

            try:
                check_reference(script, paths)
            except TaskScriptError as exc:
                problems.append(f"{where} script: {exc}")
        options = table.get("options", {})
        if not isinstance(options, dict):
            problems.append(f"{where} options: must be a table like {{ url = \"http://...\" }}, not {options!r}")
        else:
            try:
                json.dumps(options, allow_nan=False)
            except (TypeError, ValueError):
                problems.append(f"{where} options: every value must be JSON-like (string, number, boolean, list, "
                                "table); TOML dates/times and nan/inf are not")
        retries = _whole(table, "retries", where, problems, default=Task.retries.default, minimum=0)
        delay = _seconds(table, "retry_delay", where, problems, default=Task.retry_delay.default)
        backoff = _seconds(table, "retry_backoff_max", where, problems, default=Task.retry_backoff_max.default)
        timeout = _seconds(table, "timeout", where, problems, default=None, positive=True)
        if len(problems) == before:
            tasks.append(TaskSpec(name, script, options, retries, delay, backoff, timeout))  # type: ignore[arg-type]

    known_tasks = set(task_tables) if prune else set(task_tables) | set(existing_tasks)
    routines: list[RoutineSpec] = []
    for name, table in routine_tables.items():
        before = len(problems)
        where = _check_entry("routine", name, table, ROUTINE_KEYS, problems)
        steps = table.get("tasks")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            problems.append(f"{where} tasks: {'missing' if steps is None else f'{steps!r} is not valid'}; write "
                            "the task names in order, e.g. tasks = [\"fetch\", \"digest\"]")
            steps = []
        for step in dict.fromkeys(steps):
            if step not in known_tasks:
                hint = ("with --prune every task a routine uses must be in the file" if prune and step in
                        set(existing_tasks) else "define it in a [tasks.NAME] table or with 'flowctl task add'")
                problems.append(f"{where} tasks: task '{step}' does not exist; {hint}")
        timezone = _string(table, "timezone", where, problems)
        schedule = _string(table, "schedule", where, problems)
        from flowd.schedule import cron

        if schedule is not None:
            try:
                cron.validate_schedule(schedule, timezone)
            except InputError as exc:
                problems.append(f"{where} schedule: {exc}")
        elif timezone is not None:
            try:
                cron.resolve_timezone(timezone)
            except InputError as exc:
                problems.append(f"{where} timezone: {exc}")
        mode = table.get("mode", Routine.mode.default)
        if mode not in MODES:
            problems.append(f"{where} mode: {mode!r} is not one of {', '.join(MODES)}")
        limit = _whole(table, "max", where, problems, default=Routine.max.default, minimum=1)
        mqtt = _flag(table, "mqtt", where, problems, default=True)
        enabled = _flag(table, "enabled", where, problems, default=None)
        timeout = _seconds(table, "timeout", where, problems, default=None, positive=True)
        jitter = _seconds(table, "jitter", where, problems, default=None)
        status: str = table.get("status", STATUS_MODES[0])
        if status not in STATUS_MODES:
            problems.append(f"{where} status: {status!r} is not one of {', '.join(STATUS_MODES)} (steps: each state "
                            "change and each finished step; states: state changes only; off: none)")
        if len(problems) == before:
            routines.append(RoutineSpec(name, list(steps), schedule, timezone, mode, limit, mqtt,  # type: ignore
                                        timeout, enabled, jitter, status))
    return tasks, routines, problems


def apply_file(path: str | Path, task_paths: Iterable[str], prune: bool = False) -> ApplyReport:
    """Create or update the file's tasks and routines, all or nothing.

    Raises InputError (ApplyError listing every problem) before writing anything.
    The database must be open (``migrations.init_database``).
    """
    from flowd import catalog
    from flowd.store.models import Routine, Task, bump_definitions_version, utcnow, write_transaction

    where = str(path)
    doc = read_file(path)
    report = ApplyReport(where)
    with write_transaction():
        existing_tasks = {t.name for t in Task.select(Task.name)}
        tasks, routines, problems = check_document(doc, task_paths, existing_tasks, prune=prune)
        if problems:
            raise ApplyError(where, problems)
        try:
            for spec in tasks:
                task, changed = catalog.save_task(
                    spec.name, spec.script, options=spec.options, retries=spec.retries,
                    retry_delay=spec.retry_delay, retry_backoff_max=spec.retry_backoff_max, timeout=spec.timeout,
                    task_paths=task_paths)
                if spec.timeout is None and task.timeout is not None:
                    # save_task reads None as "keep"; a timeout taken out of the file means none.
                    Task.update(timeout=None, updated_at=utcnow()).where(Task.id == task.id).execute()
                    bump_definitions_version()
                    changed = True
                _record(report.tasks, spec.name, spec.name in existing_tasks, changed)
            existing_routines = {r.name: r.enabled for r in Routine.select(Routine.name, Routine.enabled)}
            for r in routines:
                enabled = r.enabled if r.enabled is not None else existing_routines.get(r.name, True)
                _, changed = catalog.save_routine(
                    r.name, r.tasks, schedule=r.schedule, timezone=r.timezone, jitter=r.jitter, mqtt=r.mqtt,
                    mode=r.mode, max=r.max, timeout=r.timeout, enabled=enabled, status=r.status)
                _record(report.routines, r.name, r.name in existing_routines, changed)
            if prune:
                keep_routines = {r.name for r in routines}
                for name in sorted(set(existing_routines) - keep_routines):
                    catalog.remove_routine(name)
                    report.routines.removed.append(name)
                for name in sorted(existing_tasks - {t.name for t in tasks}):
                    catalog.remove_task(name)
                    report.tasks.removed.append(name)
        except (InputError, TaskScriptError) as exc:
            # The checks above should catch everything; this names the file if the catalog disagrees.
            raise ApplyError(where, [str(exc)]) from exc
    return report


def _record(changes: Changes, name: str, existed: bool, changed: bool) -> None:
    if not existed:
        changes.created.append(name)
    elif changed:
        changes.updated.append(name)
    else:
        changes.unchanged.append(name)


def _tables(doc: dict[str, Any], kind: str, problems: list[str]) -> dict[str, dict[str, Any]]:
    section = doc.get(kind, {})
    if not isinstance(section, dict):
        problems.append(f"{kind}: must be tables like [{kind}.NAME], not {section!r}")
        return {}
    tables: dict[str, dict[str, Any]] = {}
    for name, table in section.items():
        if not isinstance(table, dict):
            problems.append(f"[{kind}.{name}]: must be a table of keys, not {table!r}")
        else:
            tables[name] = table
    return tables


def _check_entry(kind: str, name: str, table: dict[str, Any], known: tuple[str, ...], problems: list[str]) -> str:
    """Check a ``[tasks.NAME]`` or ``[routines.NAME]`` table's name and keys; its label."""
    from flowd.catalog import check_name

    where = f"[{kind}s.{name}]"
    try:
        check_name(kind, name)
    except InputError as exc:
        problems.append(f"{where}: {exc}")
    for key in table:
        if key not in known:
            problems.append(f"{where} {key}: unknown key; allowed keys are {', '.join(known)}")
    return where


def _whole(table: dict[str, Any], key: str, where: str, problems: list[str], *, default: int,
           minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{where} {key}: must be a whole number of at least {minimum}, not {value!r}")
        return default
    return value


def _seconds(table: dict[str, Any], key: str, where: str, problems: list[str], *, default: float | None,
             positive: bool = False) -> float | None:
    if key not in table:
        return default
    try:
        value = parse_duration(table[key], what=key)
    except ValueError as exc:
        problems.append(f"{where} {key}: {exc}")
        return default
    if not math.isfinite(value) or (positive and value <= 0):
        problems.append(f"{where} {key}: must be more than 0 seconds, not {table[key]!r}")
        return default
    return value


def _flag(table: dict[str, Any], key: str, where: str, problems: list[str], *, default: bool | None) -> bool | None:
    value = table.get(key, default)
    if value is not None and not isinstance(value, bool):
        problems.append(f"{where} {key}: must be true or false, not {value!r}")
        return default
    return value


def _string(table: dict[str, Any], key: str, where: str, problems: list[str]) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        problems.append(f"{where} {key}: must be a string, not {value!r}")
        return None
    return value
