"""Create, update and remove Tasks and Routines, refusing bad definitions up front.

Every change bumps the definitions version, which a running daemon watches to
rebuild its schedules without a restart.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from typing import Any

from flowd import loader
from flowd.errors import InputError, NotFoundError, TaskScriptError
from flowd.loader import check_reference
from flowd.store.models import (
    MODES,
    STATUS_MODES,
    Routine,
    RoutineStep,
    Task,
    bump_definitions_version,
    utcnow,
    write_transaction,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole string: fullmatch


def check_name(kind: str, name: object) -> str:
    """Names are 1-128 letters, digits, '_', '-', '.' (they appear in topics and commands)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"{kind} name {name!r} is not valid; use letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit (at most 128)")
    return name


def _number(what: str, value: Any, *, integer: bool = False, minimum: float = 0,
            allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise InputError(f"{what} must be {'a whole number' if integer else 'a number'}, not {value!r}")
    if value < minimum:
        raise InputError(f"{what} must be at least {minimum:g}, not {value!r}")
    return value


def save_task(name: str, script: str, *, options: dict[str, Any] | None = None, retries: int | None = None,
              retry_delay: float | None = None, retry_backoff_max: float | None = None,
              timeout: float | None = None, task_paths: Iterable[str]) -> tuple[Task, bool]:
    """Create the task or update it in place; returns (task, changed). None keeps a
    field as it is (or its default for a new task)."""
    check_name("task", name)
    try:
        check_reference(script, task_paths)
    except TaskScriptError as exc:
        raise InputError(f"task '{name}': {exc}") from None
    if options is not None and not isinstance(options, dict):
        raise InputError(f"task '{name}': options must be a table of key = value, not {options!r}")
    if options is not None:
        from flowd.jsontext import check_json

        check_json(options, f"task '{name}' options", verb="contain", error=InputError)
    fields: dict[str, Any] = {
        "script": script,
        "options": options,
        "retries": _number(f"task '{name}': retries", retries, integer=True),
        "retry_delay": _number(f"task '{name}': retry_delay", retry_delay),
        "retry_backoff_max": _number(f"task '{name}': retry_backoff_max", retry_backoff_max),
        "timeout": _number(f"task '{name}': timeout", timeout, minimum=0.001),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    with write_transaction():
        task = Task.get_or_none(Task.name == name)
        if task is None:
            task = Task.create(name=name, **fields)
            bump_definitions_version()
            return task, True
        changed = {k: v for k, v in fields.items() if getattr(task, k) != v}
        if changed:
            for key, value in changed.items():
                setattr(task, key, value)
            task.updated_at = utcnow()
            task.save()
            bump_definitions_version()
        return task, bool(changed)


def remove_task(name: str) -> None:
    """Remove a task no routine uses."""
    with write_transaction():
        task = get_task(name)
        users = sorted({step.routine.name for step in RoutineStep.select().where(RoutineStep.task == task)})
        if users:
            raise InputError(f"task '{name}' is used by routine(s) {', '.join(users)}; remove it from them first")
        task.delete_instance()
        bump_definitions_version()


def get_task(name: str) -> Task:
    task = Task.get_or_none(Task.name == name)
    if task is None:
        raise NotFoundError("task", name, "list them with 'flowctl task list'")
    return task


def get_routine(name: str) -> Routine:
    routine = Routine.get_or_none(Routine.name == name)
    if routine is None:
        raise NotFoundError("routine", name, "list them with 'flowctl routine list'")
    return routine


def save_routine(name: str, tasks: list[str], *, schedule: str | None = None, timezone: str | None = None,
                 jitter: float | None = None, mqtt: bool = True, mode: str = "parallel", max: int = 10,
                 timeout: float | None = None, enabled: bool = True, status: str = "steps"
                 ) -> tuple[Routine, bool]:
    """Create the routine or replace its definition; returns (routine, changed).

    ``status`` says which ``flow/<id>/status`` messages its flows send (SPEC 4.4)."""
    check_name("routine", name)
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise InputError(f"routine '{name}' needs a list of one or more task names")
    if mode not in MODES:
        raise InputError(f"routine '{name}': mode '{mode}' is not one of {', '.join(MODES)}")
    check_status_mode(name, status)
    _number(f"routine '{name}': max", max, integer=True, minimum=1, allow_none=False)
    _number(f"routine '{name}': timeout", timeout, minimum=0.001)
    _number(f"routine '{name}': jitter", jitter)
    if not isinstance(mqtt, bool) or not isinstance(enabled, bool):
        raise InputError(f"routine '{name}': mqtt and enabled must be true or false")
    if timezone is not None:
        _check_timezone(name, timezone)
    if schedule is not None:
        if not isinstance(schedule, str):
            raise InputError(f"routine '{name}': schedule must be a string like '*/5 * * * *' or '@every 30s'")
        from flowd.schedule.cron import validate_schedule

        validate_schedule(schedule, timezone)
    fields = {"schedule": schedule or None, "timezone": timezone, "jitter": jitter, "mqtt": mqtt, "mode": mode,
              "max": max, "timeout": timeout, "enabled": enabled, "status": status}
    with write_transaction():
        rows = []
        for task_name in tasks:
            task = Task.get_or_none(Task.name == task_name)
            if task is None:
                raise NotFoundError("task", task_name, f"add it before using it in routine '{name}'")
            rows.append(task)
        routine = Routine.get_or_none(Routine.name == name)
        if routine is None:
            routine = Routine.create(name=name, **fields)
            changed = True
        else:
            diff = {k: v for k, v in fields.items() if getattr(routine, k) != v}
            changed = bool(diff) or routine.task_names() != list(tasks)
            if diff:
                for key, value in diff.items():
                    setattr(routine, key, value)
            if changed:
                routine.updated_at = utcnow()
                routine.save()
        if changed:
            RoutineStep.delete().where(RoutineStep.routine == routine).execute()
            RoutineStep.insert_many([{"routine": routine.id, "position": i, "task": t.id}
                                     for i, t in enumerate(rows)]).execute()
            bump_definitions_version()
        return routine, changed


def check_status_mode(name: str, status: object) -> str:
    """A routine's ``status``: InputError naming the routine and the allowed values."""
    if status not in STATUS_MODES:
        raise InputError(f"routine '{name}': status {status!r} is not one of {', '.join(STATUS_MODES)} (steps: each "
                         "state change and each finished step; states: state changes only; off: none)")
    return str(status)


def _check_timezone(name: str, timezone: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InputError(f"routine '{name}': unknown time zone {timezone!r}; use an IANA name like "
                         "'Europe/Oslo'") from None


def remove_routine(name: str) -> None:
    """Remove a routine (its ended flows stay, they keep the routine's name)."""
    with write_transaction():
        get_routine(name).delete_instance()
        bump_definitions_version()


def set_routine_enabled(name: str, enabled: bool) -> Routine:
    """Enable or disable a routine (a disabled one is neither scheduled nor startable)."""
    with write_transaction():
        routine = get_routine(name)
        if routine.enabled != enabled:
            routine.enabled = enabled
            routine.updated_at = utcnow()
            routine.save()
            bump_definitions_version()
        return routine


def find_task(name: str) -> Task | None:
    """The task called ``name``, or None."""
    return Task.get_or_none(Task.name == name)


def list_tasks() -> list[Task]:
    """Every task, by name."""
    return list(Task.select().order_by(Task.name))


def find_routine(name: str) -> Routine | None:
    """The routine called ``name``, or None."""
    return Routine.get_or_none(Routine.name == name)


def list_routines() -> list[Routine]:
    """Every routine, by name."""
    return list(Routine.select().order_by(Routine.name))


def routines_using(task: Task) -> list[str]:
    """Names of the routines that have ``task`` as a step, sorted."""
    return sorted({r.name for r in Routine.select(Routine.name).join(RoutineStep).where(RoutineStep.task == task)})


def _scheduled() -> Any:
    return Routine.select().where(Routine.enabled & Routine.schedule.is_null(False) & (Routine.schedule != ""))


def scheduled_routines() -> list[Routine]:
    """Enabled routines that have a schedule."""
    return list(_scheduled())


def has_scheduled_routines() -> bool:
    """Whether some enabled routine has a schedule (the daemon then starts the scheduler)."""
    return bool(_scheduled().exists())


def mark_scheduled_run(name: str, slot: dt.datetime) -> None:
    """Record ``slot`` (naive UTC) as the routine's last scheduled run, unless a later one is recorded."""
    with write_transaction():
        (Routine.update(last_scheduled_run=slot)
         .where((Routine.name == name) & (Routine.last_scheduled_run.is_null() | (Routine.last_scheduled_run < slot)))
         .execute())


def task_names() -> list[str]:
    """Names of every task, as stored."""
    return [str(task.name) for task in Task.select(Task.name)]


def routine_names() -> list[str]:
    """Names of every routine, as stored."""
    return [str(routine.name) for routine in Routine.select(Routine.name)]


def routine_steps(routine: Routine) -> list[dict[str, Any]]:
    """A routine's steps in order: task, script, retries, timeout (never options: they may
    hold secrets, and the web console shows this)."""
    query = (RoutineStep.select(RoutineStep, Task).join(Task).where(RoutineStep.routine == routine)
             .order_by(RoutineStep.position))
    return [{"task": s.task.name, "script": s.task.script, "retries": s.task.retries, "timeout": s.task.timeout}
            for s in query]


def task_options(names: list[str]) -> dict[str, Any]:
    """The options of the tasks ``names``, merged (what the console masks in a trace)."""
    options: dict[str, Any] = {}
    for task in Task.select(Task.options).where(Task.name.in_(sorted(set(names)))):
        options.update(task.options or {})
    return options


def list_scripts(task_paths: Iterable[str]) -> list[loader.ScriptInfo]:
    """Every Task class in the task folders (read, not run), with each file that cannot
    be read listed in its place with its error: what ``flowctl scripts`` shows."""
    return loader.list_scripts(task_paths, broken=True)
