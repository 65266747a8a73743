"""The flow state machine: every transition of a Flow and its TaskResults.

Each public method is one short IMMEDIATE transaction. Side effects that must not
happen unless the transaction committed (queueing a flow for a worker, waking the
outbox publisher, signalling a worker) are collected in :class:`Effects` and carried
out after the commit. Any process may call these: the daemon, a worker, flowctl.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flowd import outbox
from flowd.config import Config
from flowd.errors import InputError, NotFoundError
from flowd.models import (
    ACTIVE_STATES,
    ENDED_STATES,
    Flow,
    FlowState,
    Routine,
    StepState,
    Task,
    TaskResult,
    isoformat,
    utcnow,
    write_transaction,
)

log = logging.getLogger(__name__)

MAX_INTERRUPTIONS = 5
MAX_SUBFLOW_DEPTH = 8
CANCEL_SIGNAL = signal.SIGUSR1
Enqueue = Callable[[int, int, float | None], None]


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    enqueue: list[tuple[int, int, float | None]] = field(default_factory=list)
    signal_pids: list[int] = field(default_factory=list)
    published: bool = False


@dataclass
class ClaimedStep:
    """A step a worker holds: everything it needs to run it without more queries."""

    flow_id: int
    flow_uid: str
    routine: str
    token: int
    steps: list[str]
    position: int
    attempt: int
    task_result_id: int
    task_name: str
    script: str | None
    options: dict[str, Any]
    timeout: float | None
    args: list[Any]
    kwargs: dict[str, Any]
    results: list[dict[str, Any]]
    deadline: dt.datetime | None


def flow_status_payload(flow: Flow) -> dict[str, Any]:
    """``flow/<id>/status`` (SPEC 4.2)."""
    steps = flow.steps or []
    task = steps[flow.position] if 0 <= flow.position < len(steps) else None
    payload: dict[str, Any] = {
        "flow_id": flow.id, "uid": flow.uid, "routine": flow.routine, "request_id": flow.request_id,
        "state": flow.state, "position": flow.position, "steps": len(steps), "task": task,
        "trigger": flow.trigger,
    }
    if flow.state == FlowState.WAITING.value and flow.wait_topic:
        payload["waiting_for"] = {"topic": flow.wait_topic, "match": flow.wait_match}
    if flow.error:
        payload["error"] = flow.error
    return payload


def flow_result_payload(flow: Flow) -> dict[str, Any]:
    """``flow/<id>/result`` (SPEC 4.2)."""
    return {
        "flow_id": flow.id, "uid": flow.uid, "routine": flow.routine, "request_id": flow.request_id,
        "state": flow.state, "result": flow.result, "error": flow.error, "trigger": flow.trigger,
        "started_at": isoformat(flow.started_at), "finished_at": isoformat(flow.finished_at),
    }


class Engine:
    """Transitions of flows, shared by every process.

    >>> engine = Engine(config, enqueue=queue.enqueue_flow)
    >>> flow, created = engine.submit("fetch-weather", ["a"], {"city": "Oslo"})
    """

    def __init__(self, config: Config, enqueue: Enqueue):
        self.config = config
        self._enqueue = enqueue

    # ------------------------------------------------------------------ effects
    def _apply(self, effects: Effects) -> None:
        for flow_id, token, delay in effects.enqueue:
            self._enqueue(flow_id, token, delay)
        if effects.published:
            outbox.notify(self.config.state_dir)
        for pid in effects.signal_pids:
            if pid != os.getpid():
                try:
                    os.kill(pid, CANCEL_SIGNAL)
                except OSError:
                    pass  # gone already, or not ours: the worker sees the state when its step ends

    def _publish_status(self, flow: Flow, effects: Effects) -> None:
        outbox.add_message(self.config.topic(f"flow/{flow.id}/status"), flow_status_payload(flow))
        effects.published = True

    def _publish_result(self, flow: Flow, effects: Effects) -> None:
        payload = flow_result_payload(flow)
        outbox.add_message(self.config.topic(f"flow/{flow.id}/result"), payload)
        if flow.reply_to:
            outbox.add_message(flow.reply_to, payload, correlation_data=flow.correlation_data)
        effects.published = True

    # ------------------------------------------------------------------ submit
    def submit(self, routine: str | Routine, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, *,
               request_id: str | None = None, reply_to: str | None = None, correlation_data: str | None = None,
               trigger: str = "api", require_mqtt: bool = False, now: dt.datetime | None = None
               ) -> tuple[Flow, bool]:
        """Store a new flow (or find the one with this ``request_id``); returns (flow, created).

        Raises NotFoundError / InputError for an unknown, disabled or (with
        ``require_mqtt``) MQTT-forbidden routine. A flow refused by the routine's
        mode is still stored, ended CANCELLED with the reason, and published.
        """
        name = routine.name if isinstance(routine, Routine) else routine
        effects = Effects()
        with write_transaction():
            if request_id is not None:
                existing = Flow.get_or_none(Flow.request_id == request_id)
                if existing is not None:
                    return existing, False
            row = self._routine_for_submit(name, require_mqtt)
            flow = Flow.create(
                uid=str(uuid.uuid4()), routine=row.name, steps=row.task_names(), args=list(args),
                kwargs=dict(kwargs or {}), request_id=request_id, trigger=trigger, reply_to=reply_to,
                correlation_data=correlation_data, created_at=now or utcnow(), updated_at=now or utcnow())
            if reply_to:
                outbox.add_message(reply_to, flow_status_payload(flow), correlation_data=correlation_data)
                effects.published = True
            self._admit_new(flow, row, effects, now or utcnow())
        self._apply(effects)
        return flow, True

    def create_child(self, parent: Flow, routine_name: str, args: list[Any], kwargs: dict[str, Any],
                     effects: Effects, now: dt.datetime) -> Flow:
        """A sub-flow of ``parent`` (inside the caller's transaction)."""
        if parent.depth + 1 > MAX_SUBFLOW_DEPTH:
            raise InputError(f"sub-flow depth limit reached: flow {parent.id} is {parent.depth + 1} levels "
                             f"deep (the limit is {MAX_SUBFLOW_DEPTH}); does routine '{routine_name}' "
                             "start itself?")
        row = self._routine_for_submit(routine_name, require_mqtt=False)
        child = Flow.create(
            uid=str(uuid.uuid4()), routine=row.name, steps=row.task_names(), args=list(args), kwargs=dict(kwargs),
            trigger="flow", parent=parent.id, depth=parent.depth + 1, created_at=now, updated_at=now)
        self._admit_new(child, row, effects, now)
        return child

    @staticmethod
    def _routine_for_submit(name: str, require_mqtt: bool) -> Routine:
        row = Routine.get_or_none(Routine.name == name)
        if row is None:
            raise NotFoundError("routine", name, "list them with 'flowctl routine list'")
        if not row.enabled:
            raise InputError(f"routine '{name}' is disabled; enable it with 'flowctl routine enable {name}'")
        if require_mqtt and not row.mqtt:
            raise InputError(f"routine '{name}' may not be started over MQTT (mqtt = false)")
        if not row.task_names():
            raise InputError(f"routine '{name}' has no tasks")
        return row

    # ------------------------------------------------------------------ admission (SPEC 1 modes)
    def _active(self, routine: str) -> list[Flow]:
        return list(Flow.select().where((Flow.routine == routine) & Flow.admitted & Flow.state.in_(ACTIVE_STATES))
                    .order_by(Flow.id))

    def _pending(self, routine: str) -> list[Flow]:
        return list(Flow.select().where((Flow.routine == routine) & ~Flow.admitted
                                        & (Flow.state == FlowState.INIT.value)).order_by(Flow.id))

    def _admit_new(self, flow: Flow, routine: Routine, effects: Effects, now: dt.datetime) -> None:
        active = [f for f in self._active(routine.name) if f.id != flow.id]
        mode, limit = routine.mode, max(routine.max, 1)
        if mode == "single" and active:
            self._end(flow, FlowState.CANCELLED, effects, now, error=(
                f"routine '{routine.name}' runs in mode single and flow {active[0].id} is still running"))
        elif mode == "restart":
            for old in active:
                self._cancel_tree(old, effects, now, f"restarted: routine '{routine.name}' runs in mode "
                                  f"restart and flow {flow.id} replaced it")
            self._admit(flow, effects)
        elif mode == "queued":
            pending = [f for f in self._pending(routine.name) if f.id != flow.id]
            if not active and not pending:
                self._admit(flow, effects)
            elif len(pending) >= limit:
                self._end(flow, FlowState.CANCELLED, effects, now, error=(
                    f"routine '{routine.name}' runs in mode queued and its queue is full ({limit} waiting)"))
        elif len(active) < limit:  # parallel
            self._admit(flow, effects)

    def _admit(self, flow: Flow, effects: Effects, delay: float | None = None) -> None:
        flow.admitted = True
        flow.dispatch_token += 1
        flow.worker_pid = None
        flow.updated_at = utcnow()
        flow.save()
        effects.enqueue.append((flow.id, flow.dispatch_token, delay))

    def _admit_pending(self, routine_name: str, effects: Effects) -> None:
        routine = Routine.get_or_none(Routine.name == routine_name)
        limit = 1 if routine is None or routine.mode in ("queued", "single") else max(routine.max, 1)
        free = limit - len(self._active(routine_name))
        for flow in self._pending(routine_name)[:max(free, 0)]:
            self._admit(flow, effects)

    # ------------------------------------------------------------------ ending
    def _end(self, flow: Flow, state: FlowState, effects: Effects, now: dt.datetime, *,
             result: Any = None, error: str | None = None) -> None:
        was_admitted = flow.admitted
        flow.state = state.value
        flow.result = result
        flow.error = error
        flow.finished_at = now
        flow.updated_at = now
        flow.worker_pid = None
        flow.next_attempt_at = None
        flow.wait_topic = flow.wait_match = flow.wait_until = None
        flow.save()
        (TaskResult.update(state=StepState.CANCELLED.value if state == FlowState.CANCELLED else StepState.FAILED.value,
                           finished_at=now, error=error)
         .where((TaskResult.flow == flow.id) & (TaskResult.state == StepState.RUNNING.value)).execute())
        self._publish_status(flow, effects)
        self._publish_result(flow, effects)
        log.info("flow %d (%s) ended %s%s", flow.id, flow.routine, state.value, f": {error}" if error else "",
                 extra={"FLOW_ID": flow.id, "ROUTINE": flow.routine})
        if was_admitted:
            self._admit_pending(flow.routine, effects)
        if flow.parent_id:
            self._child_ended(flow, effects, now)

    def _child_ended(self, child: Flow, effects: Effects, now: dt.datetime) -> None:
        parent = Flow.get_or_none(Flow.id == child.parent_id)
        if parent is None or parent.state != FlowState.WAITING.value or parent.wait_topic is not None:
            return
        running = self._running_result(parent)
        if running is None or (running.output or {}).get("child") != child.id:
            return
        if child.state == FlowState.DONE.value:
            self._advance(parent, running, child.result, effects, now)
        else:
            why = child.error or child.state.lower()
            self._record_failure(parent, running, f"sub-flow {child.id} ({child.routine}) ended "
                                 f"{child.state}: {why}", effects, now)

    def _cancel_tree(self, flow: Flow, effects: Effects, now: dt.datetime, reason: str) -> None:
        running = self._running_result(flow)
        if running is not None and running.worker_pid:
            effects.signal_pids.append(running.worker_pid)
        for child in Flow.select().where((Flow.parent == flow.id) & Flow.state.in_(ACTIVE_STATES)):
            self._cancel_tree(child, effects, now, f"parent flow {flow.id} was cancelled")
        flow.parent_id, parent_id = None, flow.parent_id  # do not resume the parent from a cascade
        self._end(flow, FlowState.CANCELLED, effects, now, error=reason)
        if parent_id is not None:
            Flow.update(parent=parent_id).where(Flow.id == flow.id).execute()

    @staticmethod
    def _running_result(flow: Flow) -> TaskResult | None:
        return (TaskResult.select().where((TaskResult.flow == flow.id) & (TaskResult.position == flow.position)
                                          & (TaskResult.state == StepState.RUNNING.value))
                .order_by(TaskResult.attempt.desc()).first())

    # ------------------------------------------------------------------ people: cancel, retry
    def cancel(self, flow_id: int, reason: str = "cancelled by request", now: dt.datetime | None = None) -> Flow:
        """End a flow CANCELLED (its running step is interrupted, its children cancelled)."""
        effects = Effects()
        with write_transaction():
            flow = self._get(flow_id)
            if flow.is_ended:
                raise InputError(f"flow {flow_id} has already ended ({flow.state}); nothing to cancel")
            self._cancel_tree(flow, effects, now or utcnow(), reason)
        self._apply(effects)
        return self._get(flow_id)

    def retry(self, flow_id: int, now: dt.datetime | None = None) -> Flow:
        """Resume a FAILED or CANCELLED flow from the step that did not finish."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction():
            flow = self._get(flow_id)
            if flow.state not in (FlowState.FAILED.value, FlowState.CANCELLED.value):
                raise InputError(f"flow {flow_id} is {flow.state}; only FAILED or CANCELLED flows can be retried")
            routine = Routine.get_or_none(Routine.name == flow.routine)
            if routine is None:
                raise NotFoundError("routine", flow.routine, "the flow's routine was removed")
            flow.state = FlowState.INIT.value
            flow.error = flow.result = flow.finished_at = flow.deadline = None
            flow.admitted = False
            flow.step_attempt = flow.interruptions = 0
            flow.updated_at = now
            flow.save()
            self._publish_status(flow, effects)
            self._admit_new(flow, routine, effects, now)
        self._apply(effects)
        return self._get(flow_id)

    @staticmethod
    def _get(flow_id: int) -> Flow:
        flow = Flow.get_or_none(Flow.id == flow_id)
        if flow is None:
            raise NotFoundError("flow", flow_id, "list flows with 'flowctl flows'")
        return flow

    # ------------------------------------------------------------------ worker side
    def claim(self, flow_id: int, token: int, pid: int, now: dt.datetime | None = None) -> ClaimedStep | None:
        """Take the flow for this worker and start its current step; None if the queue
        message is stale (token changed, flow ended or already held)."""
        effects = Effects()
        now = now or utcnow()
        step: ClaimedStep | None = None
        with write_transaction():
            flow = Flow.get_or_none(Flow.id == flow_id)
            if (flow is None or flow.dispatch_token != token or not flow.admitted
                    or flow.state not in (FlowState.INIT.value, FlowState.RUNNING.value) or flow.worker_pid):
                return None
            if flow.next_attempt_at and flow.next_attempt_at > now + dt.timedelta(seconds=0.05):
                delay = (flow.next_attempt_at - now).total_seconds()
                effects.enqueue.append((flow.id, flow.dispatch_token, delay))
            elif flow.deadline and now >= flow.deadline:
                self._end(flow, FlowState.FAILED, effects, now, error=self._flow_timeout_text(flow))
            else:
                if flow.state == FlowState.INIT.value:
                    flow.state = FlowState.RUNNING.value
                    flow.started_at = flow.started_at or now
                    routine = Routine.get_or_none(Routine.name == flow.routine)
                    if routine is not None and routine.timeout and flow.deadline is None:
                        flow.deadline = now + dt.timedelta(seconds=routine.timeout)
                    self._publish_status(flow, effects)
                flow.worker_pid = pid
                flow.next_attempt_at = None
                flow.updated_at = now
                flow.save()
                step = self._start_step(flow, self._step_input(flow), pid, now)
        self._apply(effects)
        return step

    def _flow_timeout_text(self, flow: Flow) -> str:
        routine = Routine.get_or_none(Routine.name == flow.routine)
        limit = f"{routine.timeout:g}s" if routine and routine.timeout else "its limit"
        return f"flow timed out: routine '{flow.routine}' allows {limit} for the whole flow"

    @staticmethod
    def _step_input(flow: Flow) -> dict[str, Any]:
        if flow.position == 0:
            return {"args": flow.args or [], "kwargs": flow.kwargs or {}}
        previous = (TaskResult.select(TaskResult.output)
                    .where((TaskResult.flow == flow.id) & (TaskResult.position == flow.position - 1)
                           & (TaskResult.state == StepState.DONE.value))
                    .order_by(TaskResult.attempt.desc()).first())
        return previous.output if previous is not None else {"args": [], "kwargs": {}}

    def _start_step(self, flow: Flow, step_input: dict[str, Any], pid: int, now: dt.datetime) -> ClaimedStep:
        task_name = flow.steps[flow.position]
        last = (TaskResult.select(TaskResult.attempt)
                .where((TaskResult.flow == flow.id) & (TaskResult.position == flow.position))
                .order_by(TaskResult.attempt.desc()).first())
        attempt = (last.attempt if last else 0) + 1
        result = TaskResult.create(flow=flow.id, position=flow.position, task=task_name, attempt=attempt,
                                   state=StepState.RUNNING.value, input=step_input, worker_pid=pid, started_at=now)
        task = Task.get_or_none(Task.name == task_name)
        done = (TaskResult.select(TaskResult.position, TaskResult.output)
                .where((TaskResult.flow == flow.id) & (TaskResult.position < flow.position)
                       & (TaskResult.state == StepState.DONE.value))
                .order_by(TaskResult.position, TaskResult.attempt))
        by_position = {row.position: row.output for row in done}
        return ClaimedStep(
            flow_id=flow.id, flow_uid=flow.uid, routine=flow.routine, token=flow.dispatch_token,
            steps=list(flow.steps), position=flow.position, attempt=attempt, task_result_id=result.id,
            task_name=task_name, script=task.script if task else None, options=dict(task.options or {}) if task else {},
            timeout=task.timeout if task else None, args=list(step_input.get("args", [])),
            kwargs=dict(step_input.get("kwargs", {})), results=[by_position[p] for p in sorted(by_position)],
            deadline=flow.deadline)

    def _held(self, step: ClaimedStep, pid: int) -> tuple[Flow | None, TaskResult | None]:
        """The flow and attempt, if this worker still holds them (not cancelled/taken over)."""
        flow = Flow.get_or_none(Flow.id == step.flow_id)
        result = TaskResult.get_or_none(TaskResult.id == step.task_result_id)
        if (flow is None or result is None or flow.state != FlowState.RUNNING.value or flow.worker_pid != pid
                or flow.dispatch_token != step.token or result.state != StepState.RUNNING.value):
            return None, None
        return flow, result

    def finish_step(self, step: ClaimedStep, output: dict[str, Any], pid: int, *, stop: bool = False,
                    now: dt.datetime | None = None) -> ClaimedStep | None:
        """Commit a finished step and start the next one in the same transaction.

        Returns the next step to run, or None when the flow ended, was cancelled, or
        ``stop`` is set (shutdown: the flow stays RUNNING at the next step, unheld, for
        recovery to re-queue).
        """
        effects = Effects()
        now = now or utcnow()
        nxt: ClaimedStep | None = None
        with write_transaction():
            flow, result = self._held(step, pid)
            if flow is None or result is None:
                return None
            nxt = self._advance(flow, result, output, effects, now, pid=None if stop else pid)
        self._apply(effects)
        return nxt

    def _advance(self, flow: Flow, result: TaskResult, output: dict[str, Any], effects: Effects,
                 now: dt.datetime, pid: int | None = None) -> ClaimedStep | None:
        """Record ``output`` for the running attempt; start the next step (held by ``pid``,
        or queued when pid is None) or end the flow DONE."""
        result.state = StepState.DONE.value
        result.output = output
        result.finished_at = now
        result.save()
        if flow.position + 1 >= len(flow.steps):
            self._end(flow, FlowState.DONE, effects, now, result=output)
            return None
        flow.position += 1
        flow.step_attempt = flow.interruptions = 0
        flow.state = FlowState.RUNNING.value
        flow.wait_topic = flow.wait_match = flow.wait_until = None
        flow.updated_at = now
        self._publish_status(flow, effects)
        if pid is None:
            flow.save()
            self._admit(flow, effects)
            return None
        flow.worker_pid = pid
        flow.save()
        if flow.deadline and now >= flow.deadline:
            self._end(flow, FlowState.FAILED, effects, now, error=self._flow_timeout_text(flow))
            return None
        return self._start_step(flow, output, pid, now)

    def release(self, step: ClaimedStep, pid: int) -> None:
        """Give back a held step that has not started (shutdown): recovery re-queues it."""
        with write_transaction():
            flow, result = self._held(step, pid)
            if flow is None or result is None:
                return
            result.delete_instance()
            flow.worker_pid = None
            flow.save()

    def fail_step(self, step: ClaimedStep, error: str, pid: int | None, *, interrupted: bool = False,
                  now: dt.datetime | None = None) -> None:
        """Record a failed attempt; retry later (backoff), or end the flow FAILED.

        ``interrupted`` (worker killed, shutdown) does not use up a retry. ``pid`` None
        lets the daemon's reaper fail an attempt whose worker is gone.
        """
        effects = Effects()
        now = now or utcnow()
        with write_transaction():
            flow = Flow.get_or_none(Flow.id == step.flow_id)
            result = TaskResult.get_or_none(TaskResult.id == step.task_result_id)
            if (flow is None or result is None or result.state != StepState.RUNNING.value
                    or flow.state not in (FlowState.RUNNING.value, FlowState.WAITING.value)
                    or (pid is not None and flow.worker_pid != pid)):
                return
            self._record_failure(flow, result, error, effects, now, interrupted=interrupted)
        self._apply(effects)

    def _record_failure(self, flow: Flow, result: TaskResult, error: str, effects: Effects, now: dt.datetime,
                        interrupted: bool = False) -> None:
        result.state = StepState.FAILED.value
        result.error = error
        result.finished_at = now
        result.save()
        flow.wait_topic = flow.wait_match = flow.wait_until = None
        summary = error.strip().splitlines()[-1] if error.strip() else "failed"
        label = f"step {flow.position + 1}/{len(flow.steps)} ({result.task})"
        if interrupted:
            flow.interruptions += 1
            if flow.interruptions > MAX_INTERRUPTIONS:
                self._end(flow, FlowState.FAILED, effects, now, error=(
                    f"{label} was interrupted {flow.interruptions} times (its worker keeps dying): {summary}"))
                return
            flow.state = FlowState.RUNNING.value
            flow.save()
            self._admit(flow, effects)
            return
        task = Task.get_or_none(Task.name == result.task)
        retries = task.retries if task else 0
        flow.step_attempt += 1
        if flow.step_attempt <= retries and not (flow.deadline and now >= flow.deadline):
            base = task.retry_delay if task else 1.0
            delay = min(base * (2 ** (flow.step_attempt - 1)), task.retry_backoff_max if task else base)
            flow.state = FlowState.RUNNING.value
            flow.next_attempt_at = now + dt.timedelta(seconds=delay)
            flow.save()
            log.info("flow %d %s attempt %d failed, retry in %.1fs: %s", flow.id, label, result.attempt, delay,
                     summary, extra={"FLOW_ID": flow.id, "ROUTINE": flow.routine, "TASK": result.task})
            self._publish_status(flow, effects)
            self._admit(flow, effects, delay=delay)
            return
        if flow.deadline and now >= flow.deadline:
            self._end(flow, FlowState.FAILED, effects, now, error=self._flow_timeout_text(flow))
        else:
            self._end(flow, FlowState.FAILED, effects, now, error=f"{label} failed: {summary}")

    # ------------------------------------------------------------------ waits and sub-flows (SPEC 2.1)
    def wait_step(self, step: ClaimedStep, pid: int, topic: str, match: dict[str, Any] | None,
                  timeout: float | None, now: dt.datetime | None = None) -> bool:
        """Park the flow WAITING for an MQTT message; frees the worker. False if not held."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction():
            flow, result = self._held(step, pid)
            if flow is None or result is None:
                return False
            result.output = {"args": step.args, "kwargs": step.kwargs, "wait": {"topic": topic, "match": match}}
            result.worker_pid = None
            result.save()
            flow.state = FlowState.WAITING.value
            flow.worker_pid = None
            flow.wait_topic, flow.wait_match = topic, match
            flow.wait_until = now + dt.timedelta(seconds=timeout) if timeout else None
            flow.updated_at = now
            flow.save()
            self._publish_status(flow, effects)
        self._apply(effects)
        return True

    def spawn_subflow(self, step: ClaimedStep, pid: int, routine: str, args: list[Any], kwargs: dict[str, Any],
                      now: dt.datetime | None = None) -> int | None:
        """Start a child flow and park the parent WAITING on it; returns the child id."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction():
            flow, result = self._held(step, pid)
            if flow is None or result is None:
                return None
            child = self.create_child(flow, routine, args, kwargs, effects, now)
            result.output = {"child": child.id}
            result.worker_pid = None
            result.save()
            flow.state = FlowState.WAITING.value
            flow.worker_pid = None
            flow.updated_at = now
            flow.save()
            self._publish_status(flow, effects)
            if child.is_ended:  # refused by its routine's mode
                self._child_ended(child, effects, now)
        self._apply(effects)
        return child.id

    def deliver_event(self, topic: str, payload: Any, now: dt.datetime | None = None) -> list[int]:
        """Resume every flow waiting on ``topic`` whose ``match`` the payload satisfies."""
        from flowd.topics import topic_matches

        effects = Effects()
        now = now or utcnow()
        resumed: list[int] = []
        with write_transaction():
            waiting = Flow.select().where((Flow.state == FlowState.WAITING.value) & Flow.wait_topic.is_null(False))
            for flow in waiting:
                if not topic_matches(flow.wait_topic, topic) or not payload_matches(flow.wait_match, payload):
                    continue
                result = self._running_result(flow)
                if result is None:
                    continue
                before = result.output or {}
                output = {"args": before.get("args", []),
                          "kwargs": {**before.get("kwargs", {}), "event": payload}}
                self._advance(flow, result, output, effects, now)
                resumed.append(flow.id)
        self._apply(effects)
        return resumed

    def waiting_topics(self) -> set[str]:
        """Topic filters the MQTT bridge must subscribe to for waiting flows."""
        query = Flow.select(Flow.wait_topic).where((Flow.state == FlowState.WAITING.value)
                                                   & Flow.wait_topic.is_null(False)).distinct()
        return {row.wait_topic for row in query}

    # ------------------------------------------------------------------ reaper duties
    def expire(self, now: dt.datetime | None = None) -> int:
        """Fail waits and flows past their deadline; returns how many were touched."""
        now = now or utcnow()
        effects = Effects()
        touched = 0
        with write_transaction():
            overdue_waits = Flow.select().where((Flow.state == FlowState.WAITING.value)
                                                & Flow.wait_until.is_null(False) & (Flow.wait_until <= now))
            for flow in overdue_waits:
                result = self._running_result(flow)
                if result is not None:
                    self._record_failure(flow, result, f"timed out waiting for a message on '{flow.wait_topic}'"
                                         f" matching {flow.wait_match or {}}", effects, now)
                    touched += 1
            overdue = Flow.select().where(Flow.state.in_((FlowState.WAITING.value, FlowState.INIT.value,
                                                          FlowState.RUNNING.value))
                                          & Flow.deadline.is_null(False) & (Flow.deadline <= now)
                                          & Flow.worker_pid.is_null())
            for flow in overdue:
                self._end(flow, FlowState.FAILED, effects, now, error=self._flow_timeout_text(flow))
                touched += 1
        self._apply(effects)
        return touched


def payload_matches(match: dict[str, Any] | None, payload: Any) -> bool:
    """True when every key/value of ``match`` is in the JSON object ``payload``."""
    if not match:
        return True
    if not isinstance(payload, dict):
        return False
    return all(key in payload and payload[key] == value for key, value in match.items())

