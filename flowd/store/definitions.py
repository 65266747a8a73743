"""The routines and tasks a process runs with, re-read only when they change."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flowd.store.rows import execute


@dataclass(frozen=True)
class RoutineInfo:
    name: str
    steps: list[str]
    mode: str
    max: int
    timeout: float | None
    enabled: bool
    mqtt: bool
    status: str = "steps"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    script: str
    options: dict[str, Any]
    timeout: float | None
    retries: int
    retry_delay: float
    retry_backoff_max: float


def retry_delay(task: TaskInfo | None, failed: int) -> float:
    """Seconds before the attempt after ``failed`` failed ones: ``retry_delay`` doubling
    each time, up to ``retry_backoff_max``."""
    base = task.retry_delay if task else 1.0
    return float(min(base * (2 ** (failed - 1)), task.retry_backoff_max if task else base))


class Definitions:
    """Routines and tasks of this process, re-read only when the definitions version changes."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.routines: dict[str, RoutineInfo] = {}
        self.tasks: dict[str, TaskInfo] = {}

    def refresh(self) -> None:
        row = execute("SELECT value FROM meta WHERE key = 'definitions_version'").fetchone()
        version = int(row[0]) if row else 0
        if version == self.version:
            return
        tasks = {}
        for name, script, options, timeout, retries, delay, backoff in execute(
                "SELECT name, script, options, timeout, retries, retry_delay, retry_backoff_max FROM task"):
            tasks[name] = TaskInfo(name, script, json.loads(options) if options else {}, timeout, retries, delay,
                                   backoff)
        steps: dict[int, list[tuple[int, str]]] = {}
        for routine_id, position, task_name in execute(
                "SELECT s.routine_id, s.position, t.name FROM routine_step s JOIN task t ON t.id = s.task_id"):
            steps.setdefault(routine_id, []).append((position, task_name))
        routines = {}
        for routine_id, name, mode, limit, timeout, enabled, mqtt, status in execute(
                'SELECT id, name, mode, "max", timeout, enabled, mqtt, status FROM routine'):
            routines[name] = RoutineInfo(name, [t for _, t in sorted(steps.get(routine_id, []))], mode, limit,
                                         timeout, bool(enabled), bool(mqtt), status)
        self.tasks, self.routines, self.version = tasks, routines, version

    def timeout_text(self, routine: str) -> str:
        """Why a flow of ``routine`` failed at its routine's time limit."""
        info = self.routines.get(routine)
        limit = f"{info.timeout:g}s" if info and info.timeout else "its limit"
        return f"flow timed out: routine '{routine}' allows {limit} for the whole flow"
