"""Unit-test task scripts: run one task, or a whole routine, in the test's own process.

No daemon, database or broker: steps run as a worker runs them (see
:mod:`flowd.cli.foreground`): the options merged under the kwargs, the output rules and
JSON checks, retries and timeouts. ``self.publish`` is recorded in ``published``,
not sent. Example, in ``tests/test_greenhouse.py``::

    from flowd.testing import run_routine, run_task
    from task_greenhouse import Alarm     # or name it: run_task("greenhouse.Alarm", ...)

    def test_reading_applies_the_offset():
        run = run_task("greenhouse.Reading", kwargs={"raw": 312}, options={"offset": -0.5})
        assert run.result == {"args": [], "kwargs": {"celsius": 30.7}}

    def test_alarm_over_the_limit():
        run = run_task(Alarm, kwargs={"celsius": 31.0}, options={"limit": 28})
        assert [(m.topic, m.payload) for m in run.published] == [("greenhouse/alarm", {"celsius": 31.0})]

    def test_the_whole_routine():
        run = run_routine("greenhouse", kwargs={"raw": 312}, apply_file="config/routines.toml")
        assert run.ok, run.error

A failing task does not raise: the run is ``FAILED`` with the task's error (and its
traceback) in ``run.error`` and ``run.attempts[-1].error``. Each attempt keeps its
``self.log`` lines in ``logs`` as ``(level, message)``. Retries happen without
waiting their delay unless ``wait_retries=True``. Task scripts are found in
``task_paths`` (default ``./tasks``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flowd.cli.foreground import DONE, FAILED, WAITING, Definitions, ForegroundRunner, Published, Run
from flowd.loader import ScriptLoader
from flowd.store import RoutineInfo, TaskInfo
from flowd.task import Task

__all__ = ["DONE", "FAILED", "WAITING", "Published", "Run", "run_routine", "run_task"]

DEFAULT_TASK_PATHS = ("tasks",)


class _Loader(ScriptLoader):
    """The task folders, and Task classes handed over directly (by their reference)."""

    def __init__(self, task_paths: Iterable[str], classes: Mapping[str, type[Task]]):
        super().__init__(task_paths)
        self.classes = dict(classes)

    def load(self, reference: str) -> type[Task]:
        return self.classes.get(reference) or super().load(reference)


def run_task(task: str | type[Task], args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
             options: Mapping[str, Any] | None = None, retries: int = 0, retry_delay: float = 1.0,
             timeout: float | None = None, events: Iterable[Any] = (), task_paths: Iterable[str] | None = None,
             wait_retries: bool = False) -> Run:
    """Run one task as a one-step routine; ``task`` is a reference (``"greenhouse.Reading"``)
    or the Task class itself. ``events`` resume a ``Wait`` the task returns."""
    classes: dict[str, type[Task]] = {}
    if isinstance(task, type):
        if not issubclass(task, Task) or task is Task:
            raise TypeError(f"{task.__name__} is not a subclass of flowd.task.Task")
        reference = f"{task.__module__}.{task.__qualname__}"
        classes[reference] = task
    else:
        reference = task
    name = reference.rsplit(".", 1)[-1]
    definitions = Definitions(
        {name: TaskInfo(name, reference, dict(options or {}), timeout, retries, retry_delay, 300.0)},
        {name: RoutineInfo(name, [name], "parallel", 10, None, True, True)})
    return _runner(definitions, task_paths, classes, events, wait_retries).run_routine(name, args, kwargs)


def run_routine(routine: str | list[str], args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                tasks: Mapping[str, Mapping[str, Any]] | None = None,
                routines: Mapping[str, Mapping[str, Any]] | None = None, apply_file: str | None = None,
                events: Iterable[Any] = (), task_paths: Iterable[str] | None = None,
                wait_retries: bool = False) -> Run:
    """Run a routine: by name from ``apply_file`` (a ``flowctl apply`` file) and/or
    ``tasks``/``routines`` tables in the same format, or as a list of task names.

    >>> run_routine(["reading", "alarm"], kwargs={"raw": 312},
    ...             tasks={"reading": {"script": "greenhouse.Reading"}, "alarm": {"script": "greenhouse.Alarm"}})

    Bad definitions raise flowd.errors.InputError naming every problem, as ``flowctl apply`` does.
    """
    from flowd.apply import read_file

    paths = tuple(task_paths or DEFAULT_TASK_PATHS)
    doc: dict[str, Any] = read_file(apply_file) if apply_file else {}
    doc = {"tasks": {**doc.get("tasks", {}), **dict(tasks or {})},
           "routines": {**doc.get("routines", {}), **dict(routines or {})}}
    name = routine
    if isinstance(routine, list):
        name = "test-routine"
        doc["routines"][name] = {"tasks": list(routine)}
    definitions = Definitions.from_document(doc, paths, apply_file or "the definitions given")
    return _runner(definitions, paths, {}, events, wait_retries).run_routine(str(name), args, kwargs)


def _runner(definitions: Definitions, task_paths: Iterable[str] | None, classes: Mapping[str, type[Task]],
            events: Iterable[Any], wait_retries: bool) -> ForegroundRunner:
    import time

    loader = _Loader(tuple(task_paths or DEFAULT_TASK_PATHS), classes)
    return ForegroundRunner(definitions, loader, events=events,
                            sleep=time.sleep if wait_retries else (lambda seconds: None))
