"""Runs a routine (or one task) in this process: no daemon, no queue, no broker.

``flowctl run`` and :mod:`flowd.testing` use it to try task scripts. A step runs as a
worker runs it (:mod:`flowd.engine.runner`): the same loader, the Task's options merged under
the kwargs, the same output rules and JSON checks, the Task's retries (with their
delays) and timeout, the routine's timeout. What cannot happen here is said where it
happens, never hung on:

- ``self.publish`` is checked and recorded, not sent;
- a ``Wait`` takes the next of the ``events`` given (added to kwargs as ``event``, as
  the daemon does); with none left the run stops there, state ``WAITING``;
- a ``SubFlow`` runs its routine here, as a nested run, and the parent continues with
  its result (or the step fails, and may retry, if it failed).

Nothing is stored: ``self.flow_id`` is 0. :func:`record_run` stores a finished run as
an ended flow when asked (``flowctl run --record``).
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from flowd import store
from flowd.engine.engine import MAX_SUBFLOW_DEPTH, payload_matches
from flowd.engine.runner import (
    StepTimeout,
    check_publish,
    check_wait,
    failure_text,
    make_task,
    normalize_output,
    step_kwargs,
)
from flowd.errors import InputError, NotFoundError, StepError
from flowd.jsontext import check_json
from flowd.loader import ScriptLoader
from flowd.store import RoutineInfo, TaskInfo, retry_delay
from flowd.store.models import FlowState, isoformat, utcnow, write_transaction
from flowd.task import SubFlow, Task, Wait

DONE, FAILED, WAITING = "DONE", "FAILED", "WAITING"


@dataclass(frozen=True)
class Published:
    """A message a task gave ``self.publish``: recorded, not sent."""

    topic: str
    payload: Any
    qos: int
    retain: bool
    position: int
    task: str


@dataclass
class Attempt:
    """One attempt of one step, as it ran here."""

    position: int
    steps: int
    task: str
    script: str
    attempt: int
    input: dict[str, Any]           # {"args", "kwargs"} the step received (before options)
    options: dict[str, Any]
    started_at: dt.datetime
    output: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    published: list[Published] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)  # (level, message) of self.log, in order
    wait: dict[str, Any] | None = None        # the Wait returned: topic, match, timeout
    event: Any = None                         # the event that resumed it, if one was given
    subflow: Run | None = None
    retry_in: float | None = None             # failed with retries left: the delay before the next
    finished_at: dt.datetime | None = None

    @property
    def label(self) -> str:
        return f"step {self.position + 1}/{self.steps} ({self.task})"


@dataclass
class Run:
    """The outcome of a foreground run: state, result, every attempt, every publish."""

    routine: str
    args: list[Any]
    kwargs: dict[str, Any]
    steps: list[str]
    depth: int = 0
    state: str = "RUNNING"
    result: dict[str, Any] | None = None
    error: str | None = None
    position: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    started_at: dt.datetime = field(default_factory=utcnow)
    finished_at: dt.datetime | None = None

    @property
    def ok(self) -> bool:
        return self.state == DONE

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The output of each finished step, in order (what ``self.results`` holds)."""
        return [a.output for a in self.attempts if a.output is not None]

    @property
    def published(self) -> list[Published]:
        """Everything published, sub-flows included, in order."""
        found: list[Published] = []
        for a in self.attempts:
            found.extend(a.published)
            if a.subflow is not None:
                found.extend(a.subflow.published)
        return found

    def as_dict(self) -> dict[str, Any]:
        """JSON for ``flowctl run --json``."""
        return {"routine": self.routine, "state": self.state, "args": self.args, "kwargs": self.kwargs,
                "result": self.result, "error": self.error, "steps": len(self.steps),
                "started_at": isoformat(self.started_at), "finished_at": isoformat(self.finished_at),
                "attempts": [_attempt_dict(a) for a in self.attempts],
                "published": [_published_dict(p) for p in self.published]}


def _published_dict(p: Published) -> dict[str, Any]:
    payload = p.payload.decode("utf-8", "replace") if isinstance(p.payload, bytes) else p.payload
    return {"topic": p.topic, "payload": payload, "qos": p.qos, "retain": p.retain, "position": p.position,
            "task": p.task}


def _attempt_dict(a: Attempt) -> dict[str, Any]:
    return {"position": a.position, "task": a.task, "script": a.script, "attempt": a.attempt, "input": a.input,
            "options": a.options, "output": a.output, "error": a.error, "seconds": round(a.seconds, 6),
            "published": [_published_dict(p) for p in a.published], "logs": [list(line) for line in a.logs],
            "wait": a.wait, "event": a.event,
            "retry_in": a.retry_in, "subflow": a.subflow.as_dict() if a.subflow is not None else None}


class Reporter(Protocol):
    """What a foreground run tells as it goes (``flowctl run`` prints it)."""

    def step_started(self, run: Run, attempt: Attempt) -> None: ...

    def published(self, run: Run, attempt: Attempt, message: Published) -> None: ...

    def logged(self, run: Run, attempt: Attempt, level: str, message: str) -> None: ...

    def step_ended(self, run: Run, attempt: Attempt) -> None:
        """Once the attempt has an output, an error (with ``retry_in`` if it retries), a wait or a sub-flow."""

    def subflow_started(self, run: Run, attempt: Attempt, routine: str) -> None: ...

    def run_ended(self, run: Run) -> None:
        """The run (or a sub-flow's) is DONE, FAILED or stopped WAITING."""


class _Silent:
    """The reporter of a run nobody watches (flowd.testing)."""

    def step_started(self, run: Run, attempt: Attempt) -> None:
        pass

    def published(self, run: Run, attempt: Attempt, message: Published) -> None:
        pass

    def logged(self, run: Run, attempt: Attempt, level: str, message: str) -> None:
        pass

    def step_ended(self, run: Run, attempt: Attempt) -> None:
        pass

    def subflow_started(self, run: Run, attempt: Attempt, routine: str) -> None:
        pass

    def run_ended(self, run: Run) -> None:
        pass


@dataclass
class Definitions:
    """The Tasks and Routines a run may use (from the database, an apply file, or code)."""

    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    routines: dict[str, RoutineInfo] = field(default_factory=dict)

    @classmethod
    def from_database(cls) -> Definitions:
        """What the daemon would run; the database must be open (``migrations.init_database``)."""
        from flowd import store

        found = store.Definitions()
        found.refresh()
        return cls(dict(found.tasks), dict(found.routines))

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], task_paths: Iterable[str], where: str) -> Definitions:
        """The tasks and routines of a parsed apply file (``flowctl apply`` format), checked
        as apply checks them; raises ApplyError naming every problem."""
        from flowd.apply import ApplyError, check_document

        tasks, routines, problems = check_document(dict(doc), task_paths, prune=True)
        if problems:
            raise ApplyError(where, problems)
        return cls({t.name: TaskInfo(t.name, t.script, dict(t.options), t.timeout, t.retries, t.retry_delay,
                                     t.retry_backoff_max) for t in tasks},
                   {r.name: RoutineInfo(r.name, list(r.tasks), r.mode, r.max, r.timeout, r.enabled is not False,
                                        r.mqtt, r.status) for r in routines})


class ForegroundRunner:
    """Runs routines of ``definitions`` in this process, step after step.

    >>> runner = ForegroundRunner(Definitions.from_database(), ScriptLoader(config.flowd.task_paths))
    >>> run = runner.run_routine("greenhouse", [], {"raw": 312})
    >>> run.state, run.result, run.published
    """

    def __init__(self, definitions: Definitions, loader: ScriptLoader, *, events: Iterable[Any] = (),
                 reporter: Reporter | None = None, sleep: Callable[[float], None] = time.sleep):
        self.definitions = definitions
        self.loader = loader
        self.events = list(events)
        self.reporter: Reporter = reporter or _Silent()
        self.sleep = sleep

    def run_routine(self, name: str, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    *, depth: int = 0) -> Run:
        """Run routine ``name`` to its end (or to a Wait with no event left).

        Raises NotFoundError for an unknown routine and InputError for input JSON
        cannot carry; a task that fails is the run's FAILED state, not an exception.
        """
        routine = self.definitions.routines.get(name)
        if routine is None:
            known = ", ".join(sorted(self.definitions.routines)) or "none defined"
            raise NotFoundError("routine", name, f"routines: {known}")
        return self.run_steps(routine.name, routine.steps, args, kwargs, timeout=routine.timeout, depth=depth)

    def run_steps(self, routine: str, steps: list[str], args: Iterable[Any] = (),
                  kwargs: Mapping[str, Any] | None = None, *, timeout: float | None = None, depth: int = 0) -> Run:
        """Run the Tasks named ``steps`` in order, as routine ``routine`` would."""
        run = Run(routine, list(args), dict(kwargs or {}), list(steps), depth)
        try:
            check_json({"args": run.args, "kwargs": run.kwargs}, "the flow's input")
        except StepError as exc:
            raise InputError(str(exc).replace(" returned", " contains")) from None
        for task_name in steps:
            if task_name not in self.definitions.tasks:
                raise NotFoundError("task", task_name, f"routine '{routine}' names it")
        deadline = time.monotonic() + timeout if timeout else None
        step_input: dict[str, Any] = {"args": run.args, "kwargs": run.kwargs}
        flow_uid = str(uuid.uuid4())
        while run.position < len(steps):
            task = self.definitions.tasks[steps[run.position]]
            failed = 0
            while True:
                attempt = self._run_attempt(run, task, step_input, failed + 1, flow_uid, deadline)
                if attempt.error is None:
                    break
                failed += 1
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if failed <= task.retries and not out_of_time:
                    attempt.retry_in = retry_delay(task, failed)
                    self.reporter.step_ended(run, attempt)
                    self._sleep_until_retry(attempt.retry_in, deadline)
                    continue
                self.reporter.step_ended(run, attempt)
                summary = attempt.error.strip().splitlines()[-1] if attempt.error.strip() else "failed"
                run.error = (f"flow timed out: routine '{routine}' allows {timeout:g}s for the whole flow"
                             if out_of_time and timeout else f"{attempt.label} failed: {summary}")
                return self._end(run, FAILED)
            self.reporter.step_ended(run, attempt)
            if deadline is not None and time.monotonic() >= deadline and run.position + 1 < len(steps):
                run.error = f"flow timed out: routine '{routine}' allows {timeout:g}s for the whole flow"
                return self._end(run, FAILED)  # as the engine: the step is done, the flow out of time
            if attempt.wait is not None and attempt.output is None:
                if attempt.subflow is not None:
                    run.error = f"{attempt.label} waits for its sub-flow ({attempt.subflow.routine}): " \
                                f"{attempt.subflow.error}"
                else:
                    run.error = (f"{attempt.label} waits for a message on '{attempt.wait['topic']}'"
                                 + (f" matching {attempt.wait['match']}" if attempt.wait.get("match") else "")
                                 + "; a foreground run does not listen to the broker: give the message as an "
                                   "event to go on")
                return self._end(run, WAITING)
            assert attempt.output is not None
            step_input = attempt.output
            run.position += 1
        run.position = len(steps) - 1
        run.result = step_input
        return self._end(run, DONE)

    def _end(self, run: Run, state: str) -> Run:
        run.state = state
        run.finished_at = utcnow()
        self.reporter.run_ended(run)
        return run

    def _sleep_until_retry(self, delay: float, deadline: float | None) -> None:
        if deadline is not None:
            delay = min(delay, max(deadline - time.monotonic(), 0.0))
        if delay > 0:
            self.sleep(delay)

    def _run_attempt(self, run: Run, task: TaskInfo, step_input: dict[str, Any], number: int, flow_uid: str,
                     deadline: float | None) -> Attempt:
        args, kwargs = list(step_input.get("args", [])), dict(step_input.get("kwargs", {}))
        attempt = Attempt(run.position, len(run.steps), task.name, task.script, number,
                          {"args": args, "kwargs": kwargs}, dict(task.options), utcnow())
        run.attempts.append(attempt)
        self.reporter.step_started(run, attempt)
        label = "perform()"
        started = time.monotonic()
        limit = _step_limit(task.timeout, deadline)

        def publish(topic: str, payload: Any, qos: int = 1, retain: bool = False) -> None:
            check_publish(topic, payload, qos)
            message = Published(topic, payload, qos, bool(retain), run.position, task.name)
            attempt.published.append(message)
            self.reporter.published(run, attempt, message)

        try:
            instance = make_task(self.loader.load(task.script), flow_id=0, flow_uid=flow_uid, routine=run.routine,
                                 position=run.position, attempt=number, results=run.outputs,
                                 task_name=task.name, script=task.script, publisher=publish)
            instance.log = _RecordingLog(instance.log, lambda level, text: self._logged(run, attempt, level, text))
            value = _call_with_timeout(instance, args, step_kwargs(task.options, kwargs), limit)
            if isinstance(value, Wait):
                check_wait(value, label)
                attempt.wait = {"topic": value.topic, "match": value.match, "timeout": value.timeout}
                self._resume_with_event(attempt, value, args, kwargs)
            elif isinstance(value, SubFlow):
                check_json({"args": list(value.args), "kwargs": value.kwargs}, f"{label} sub-flow input")
                self._run_subflow(run, attempt, value)
            else:
                attempt.output = normalize_output(value, args, kwargs, label)
        except StepTimeout:
            attempt.error = f"timed out after {limit:g}s" if limit else "timed out"
        except Exception as exc:
            attempt.error = failure_text(exc)
        attempt.seconds = time.monotonic() - started
        attempt.finished_at = utcnow()
        return attempt

    def _logged(self, run: Run, attempt: Attempt, level: str, text: str) -> None:
        attempt.logs.append((level, text))
        self.reporter.logged(run, attempt, level, text)

    def _resume_with_event(self, attempt: Attempt, wait: Wait, args: list[Any], kwargs: dict[str, Any]) -> None:
        """The daemon resumes a wait with the message's payload as ``event``; here the next event given."""
        if not self.events:
            return
        event = self.events.pop(0)
        if not payload_matches(wait.match, event):
            raise StepError(f"the event given, {event!r:.80}, does not contain match {wait.match!r}; the daemon "
                            "would go on waiting")
        attempt.event = event
        attempt.output = {"args": args, "kwargs": {**kwargs, "event": event}}

    def _run_subflow(self, run: Run, attempt: Attempt, sub: SubFlow) -> None:
        """The daemon runs the routine as a child flow and waits for it; here it runs nested."""
        if run.depth + 1 > MAX_SUBFLOW_DEPTH:
            raise StepError(f"sub-flow depth limit reached: routine '{run.routine}' would start a flow "
                            f"{run.depth + 1} levels deep (the limit is {MAX_SUBFLOW_DEPTH}); does routine "
                            f"'{sub.routine}' start itself?")
        routine = self.definitions.routines.get(sub.routine)
        if routine is None:
            raise StepError(f"perform() returned SubFlow('{sub.routine}'), but there is no routine '{sub.routine}'")
        self.reporter.subflow_started(run, attempt, routine.name)
        child = self.run_routine(sub.routine, sub.args, sub.kwargs, depth=run.depth + 1)
        attempt.subflow = child
        if child.state == DONE:
            attempt.output = child.result
        elif child.state == WAITING:
            attempt.wait = {"subflow": child.routine}
        else:
            raise StepError(f"sub-flow ({child.routine}) ended {child.state}: {child.error}")


class _RecordingLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``self.log`` of a foreground step: logs as in the worker, and hands each line to the run."""

    def __init__(self, adapter: logging.LoggerAdapter[logging.Logger], note: Callable[[str, str], None]):
        super().__init__(adapter.logger, adapter.extra)
        self.note = note

    def isEnabledFor(self, level: int) -> bool:
        return True  # every line is kept for the run; the logger still filters what it emits

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = f"{msg} {args}"
        self.note(logging.getLevelName(level), text)
        super().log(level, msg, *args, **kwargs)


def _step_limit(step_timeout: float | None, deadline: float | None) -> float | None:
    """As the worker: the step's timeout, or less when the routine's time runs out first."""
    limits = [float(step_timeout)] if step_timeout else []
    if deadline is not None:
        limits.append(max(deadline - time.monotonic(), 0.001))
    return min(limits) if limits else None


def _raise_timeout(signum: int, frame: Any) -> None:
    raise StepTimeout()


def _call_with_timeout(task: Task, args: list[Any], kwargs: dict[str, Any], limit: float | None) -> Any:
    """``perform`` under a hard timeout (SIGALRM, as in the worker); off the main thread
    a timer cannot interrupt it, so the limit is not enforced there."""
    if not limit or threading.current_thread() is not threading.main_thread():
        return task.perform(*args, **kwargs)
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return task.perform(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def record_run(run: Run, *, trigger: str = "cli", parent_id: int | None = None) -> int:
    """Store a finished foreground run as an ended flow with its attempts (``--record``);
    its id. A run stopped at a Wait is stored CANCELLED, saying so; nothing it
    published is stored or sent. The database must be open."""
    with write_transaction():
        return _record(run, trigger, parent_id)


def _record(run: Run, trigger: str, parent_id: int | None) -> int:
    state = run.state if run.state in (DONE, FAILED) else FlowState.CANCELLED.value
    error = run.error if run.state != WAITING else f"flowctl run stopped here: {run.error}"
    now = run.finished_at or utcnow()
    flow_id = store.insert_ended_flow(
        routine=run.routine, steps=run.steps, state=state, position=run.position, args=run.args, kwargs=run.kwargs,
        trigger=trigger, result=run.result, error=error, started_at=run.started_at, finished_at=now,
        parent_id=parent_id, depth=run.depth)
    for a in run.attempts:
        output = a.output
        if a.subflow is not None:
            child_id = _record(a.subflow, "flow", flow_id)
            output = a.output if a.output is not None else {"child": child_id}
        step_state = "DONE" if a.error is None and a.output is not None else "FAILED" if a.error else "CANCELLED"
        store.insert_ended_result(flow_id, a.position, a.task, a.attempt, step_state, a.input, output, a.error,
                                  a.started_at, a.finished_at or now)
    return flow_id
