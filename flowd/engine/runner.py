"""Runs claimed flows inside a huey worker process, step after step.

Per step: load the script (re-imported when its file changed), merge the Task's
options under the incoming kwargs, call ``perform`` under a hard timeout, check the
output is JSON, and commit it together with the start of the next step. A step that
cannot be stopped by the timer is killed with its worker by the daemon's reaper.

A queue message may carry several flows (see :mod:`flowd.engine.batch`): they run
breadth-first, one step of each, and the outputs of a round are committed together.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowd.config import Config
from flowd.engine.effects import Enqueue, EnqueueMany
from flowd.engine.engine import CANCEL_SIGNAL, ClaimedStep, Engine
from flowd.engine.transitions import time_limit
from flowd.errors import FlowdError, StepError
from flowd.jsontext import check_json
from flowd.loader import ScriptLoader
from flowd.mqtt import outbox
from flowd.mqtt.payloads import has_surrogate
from flowd.store.models import write_transaction
from flowd.task import SubFlow, Task, Wait

if TYPE_CHECKING:
    from flowd.engine.batch import Batch

log = logging.getLogger(__name__)


class StepTimeout(BaseException):
    """Raised inside ``perform`` when the step's time is up (BaseException: a task's
    ``except Exception`` must not swallow it)."""


class StepCancelled(BaseException):
    """Raised inside ``perform`` when someone cancelled the flow."""


@dataclass
class WorkerRuntime:
    """What one worker process keeps between flows."""

    config: Config
    engine: Engine
    loader: ScriptLoader
    stop_flag: Any = None
    in_user_code: bool = False
    batch: Batch | None = None  # the flows of the message being run
    take_waiting: Callable[[int], list[tuple[int, int]]] | None = None  # queue messages waiting, taken
    cancel_seen: bool = False   # a cancel signal came: check the held flows before the next step

    def stopping(self) -> bool:
        return bool(self.stop_flag is not None and self.stop_flag.is_set())


_runtime: WorkerRuntime | None = None


def init_worker(config: Config, stop_flag: Any, *, enqueue: Enqueue, enqueue_many: EnqueueMany,
                take_waiting: Callable[[int], list[tuple[int, int]]]) -> WorkerRuntime:
    """Set up this worker process (called once, right after it is forked or started);
    ``enqueue``, ``enqueue_many`` and ``take_waiting``: the queue's, from the caller."""
    global _runtime
    _runtime = WorkerRuntime(config, Engine(config, enqueue=enqueue, enqueue_many=enqueue_many),
                             ScriptLoader(config.flowd.task_paths), stop_flag, take_waiting=take_waiting)
    signal.signal(CANCEL_SIGNAL, _on_cancel_signal)
    # A relative path in a task's options lands in the state folder: under systemd the
    # rest of the file system is read-only, and the daemon's own folder is anybody's guess.
    os.chdir(config.state_dir)
    return _runtime


def _on_cancel_signal(signum: int, frame: Any) -> None:
    rt = _runtime
    if rt is None:
        return
    rt.cancel_seen = True
    if rt.in_user_code and (rt.batch is None or rt.batch.is_running_cancelled(rt.engine, os.getpid())):
        raise StepCancelled()


def _on_alarm(signum: int, frame: Any) -> None:
    if _runtime is not None and _runtime.in_user_code:
        raise StepTimeout()


def runtime() -> WorkerRuntime:
    """This worker process's runtime (:func:`init_worker`)."""
    if _runtime is None:
        raise RuntimeError("runner.init_worker() was not called in this worker")
    return _runtime


def run_step(rt: WorkerRuntime, step: ClaimedStep, pid: int) -> dict[str, Any] | None:
    """Run one step; returns its output, or None once a failure, a Wait or a SubFlow
    has been recorded (the flow leaves this worker)."""
    label = "perform()"  # errors: the engine prefixes the step ("step 2/3 (fetch) failed: ...")
    try:
        value = _perform(rt, step)
        if isinstance(value, Wait):
            check_wait(value, label)
            rt.engine.wait_step(step, pid, value.topic, value.match, value.timeout)
            return None
        if isinstance(value, SubFlow):
            check_json({"args": list(value.args), "kwargs": value.kwargs}, f"{label} sub-flow input")
            rt.engine.spawn_subflow(step, pid, value.routine, list(value.args), value.kwargs)
            return None
        output, step.output_json = shaped_output(value, step.args, step.kwargs, label)
    except StepCancelled:
        log.info("flow %d %s: cancelled while running", step.flow_id, _where(step), extra=_extra(step))
        rt.engine.fail_step(step, "cancelled while running", pid, interrupted=True)
        return None
    except StepTimeout:
        limit = _effective_timeout(step)
        rt.engine.fail_step(step, f"timed out after {limit:g}s", pid)
        return None
    except KeyboardInterrupt:
        rt.engine.fail_step(step, "interrupted: the worker was stopped", pid, interrupted=True)
        raise
    except FlowdError as exc:
        log.warning("flow %d %s failed: %s", step.flow_id, _where(step), exc, extra=_extra(step))
        rt.engine.fail_step(step, storable(str(exc)), pid)
        return None
    except Exception as exc:
        log.info("flow %d %s raised %s: %s", step.flow_id, _where(step), type(exc).__name__, exc, extra=_extra(step))
        rt.engine.fail_step(step, failure_text(exc), pid)
        return None
    return output


def _where(step: ClaimedStep) -> str:
    return f"step {step.position + 1}/{len(step.steps)} ({step.task_name})"


def _extra(step: ClaimedStep) -> dict[str, Any]:
    """A log line's journal fields (made for the lines logged: a step that succeeds logs none)."""
    return {"FLOW_ID": step.flow_id, "ROUTINE": step.routine, "TASK": step.task_name}


def storable(text: str) -> str:
    """``text`` as UTF-8 can carry it: an exception message may hold a lone surrogate."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if has_surrogate(text) else text


def failure_text(exc: BaseException) -> str:
    """A failed attempt's error: flowd's own sentence, or the task's traceback ending
    with its one-line summary (storable: the message may hold a lone surrogate)."""
    if isinstance(exc, FlowdError):
        return storable(str(exc))
    return storable("".join(traceback.format_exception(exc)).rstrip() + f"\n{type(exc).__name__}: {exc}")


def _effective_timeout(step: ClaimedStep, now: dt.datetime | None = None) -> float | None:
    """The step's time limit from now (at least 1 ms: an alarm of 0 would never ring)."""
    return time_limit(step.timeout, step.deadline, now, floor=0.001)


def _perform(rt: WorkerRuntime, step: ClaimedStep) -> Any:
    if step.script is None:
        raise StepError(f"task '{step.task_name}' no longer exists; add it again or retry the flow later")
    task = make_task(rt.loader.load(step.script), flow_id=step.flow_id, flow_uid=step.flow_uid,
                     routine=step.routine, position=step.position, attempt=step.attempt, results=step.results,
                     task_name=step.task_name, script=step.script, publisher=_publisher(rt))
    kwargs = step_kwargs(step.options, step.kwargs)
    timeout = _effective_timeout(step)
    if not timeout:  # no alarm to arm: two system calls and two handler swaps less per step
        rt.in_user_code = True
        try:
            return task.perform(*step.args, **kwargs)
        finally:
            rt.in_user_code = False
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    rt.in_user_code = True
    try:
        return task.perform(*step.args, **kwargs)
    finally:
        rt.in_user_code = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_task_loggers: dict[str, logging.Logger] = {}


def _task_logger(script: str) -> logging.Logger:
    found = _task_loggers.get(script)
    if found is None:
        found = _task_loggers[script] = logging.getLogger(f"flowd.task.{script}")
    return found


def make_task(cls: type[Task], *, flow_id: int, flow_uid: str, routine: str, position: int, attempt: int,
              results: list[dict[str, Any]], task_name: str, script: str,
              publisher: Callable[[str, Any, int, bool], None]) -> Task:
    """An instance of ``cls`` with what ``perform`` may use set (SPEC 2); shared by the
    worker and the foreground runner (``flowctl run``, ``flowd.testing``)."""
    task = cls()
    task.flow_id, task.flow_uid, task.routine = flow_id, flow_uid, routine
    task.position, task.attempt, task.results = position, attempt, list(results)
    task.log = logging.LoggerAdapter(_task_logger(script), {"FLOW_ID": flow_id, "ROUTINE": routine, "TASK": task_name})
    task._publisher = publisher
    return task


def step_kwargs(options: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """SPEC 2: the Task's options merged under the kwargs the step receives (a key given wins)."""
    return {**options, **kwargs}


def check_publish(topic: str, payload: Any, qos: int) -> Any:
    """Check what ``self.publish`` was given; the payload as it will be sent (bytes as
    text). Raises StepError naming the problem."""
    from flowd.mqtt.topics import is_valid_publish_topic

    if not is_valid_publish_topic(topic):
        raise StepError(f"cannot publish to {topic!r}: a topic is non-empty text without '+', '#'")
    if qos not in (0, 1, 2):
        raise StepError(f"qos must be 0, 1 or 2, not {qos!r}")
    label = f"payload published to '{topic}'"
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise StepError(f"the {label} is bytes that are not UTF-8 text") from None
    check_json(payload, label)
    return payload


def _publisher(rt: WorkerRuntime) -> Any:
    def publish(topic: str, payload: Any, qos: int = 1, retain: bool = False) -> None:
        text = check_publish(topic, payload, qos)
        with write_transaction(sync=False):  # the publisher syncs before it sends
            outbox.add_message(topic, text, qos=qos, retain=retain, node_id=rt.config.flowd.node_id)
        outbox.notify(rt.config.state_dir)

    return publish


def normalize_output(value: Any, args: list[Any], kwargs: dict[str, Any], label: str) -> dict[str, Any]:
    """SPEC 2: (args, kwargs) -> as is; dict -> (same args, dict); None -> input unchanged."""
    output, _text = shaped_output(value, args, kwargs, label)
    return output


def shaped_output(value: Any, args: list[Any], kwargs: dict[str, Any], label: str) -> tuple[dict[str, Any], str]:
    """:func:`normalize_output` and its JSON text, encoded once for the database."""
    if value is None:
        output = {"args": list(args), "kwargs": dict(kwargs)}
    elif isinstance(value, dict):
        output = {"args": list(args), "kwargs": value}
    elif (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], (list, tuple))
          and isinstance(value[1], dict)):
        output = {"args": list(value[0]), "kwargs": value[1]}
    else:
        raise StepError(f"{label} returned {type(value).__name__}; perform() must return (args, kwargs), "
                        "a dict, None, Wait(...) or SubFlow(...)")
    for key in output["kwargs"]:
        if not isinstance(key, str):
            raise StepError(f"{label} returned a kwargs key {key!r} that is not a string")
    return output, check_json(output, label)


def check_wait(wait: Wait, label: str) -> None:
    from flowd.mqtt.topics import is_valid_filter

    if not is_valid_filter(wait.topic):
        raise StepError(f"{label} returned Wait with an invalid topic {wait.topic!r}")
    if wait.match is not None:
        if not isinstance(wait.match, dict):
            raise StepError(f"{label} returned Wait(match=...) that is not a dict")
        check_json(wait.match, f"{label} Wait(match)")
    if wait.timeout is not None and (not isinstance(wait.timeout, (int, float)) or wait.timeout <= 0):
        raise StepError(f"{label} returned Wait(timeout={wait.timeout!r}); use a positive number of seconds")

