"""The engine's shared moves: carrying out effects, admission, a flow's end, a step's
start and next step, a failed attempt. :class:`flowd.engine.engine.Engine` builds its
public operations (each one transaction) from these.

Every change of a flow's state is written by ``store.update_flow``, which checks it
against the table of transitions (:data:`flowd.states.TRANSITIONS`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
from typing import Any

from flowd import store
from flowd.config import Config
from flowd.engine.effects import ClaimedStep, Effects, Enqueue, EnqueueMany
from flowd.engine.flowmessages import flow_result_text
from flowd.engine.lease import is_shared_database
from flowd.engine.transitions import is_held_by
from flowd.errors import InputError, NotFoundError
from flowd.mqtt import outbox
from flowd.mqtt.status import Status, send_statuses, status_payload_text
from flowd.states import PARALLEL, QUEUED, RESTART, SINGLE
from flowd.store import Row
from flowd.store.models import (
    CANCELLED,
    DONE,
    FAILED,
    INIT,
    RUNNING,
    WAITING,
    FlowState,
    dumps,
)

log = logging.getLogger("flowd.engine.engine")  # the name the journal and the tests know

MAX_INTERRUPTIONS = 5
MAX_SUBFLOW_DEPTH = 8
CANCEL_SIGNAL = signal.SIGUSR1


class EngineCore:
    """The moves :class:`Engine`'s operations share (see the module)."""

    def __init__(self, config: Config, enqueue: Enqueue, enqueue_many: EnqueueMany | None = None):
        self.config = config
        self._enqueue = enqueue
        self._enqueue_many = enqueue_many
        self.definitions = store.Definitions()
        # On every claim, with the worker's pid: which node holds a flow (SPEC 10). None on
        # SQLite, where there is one node: not a byte more per flow on the SD card.
        self.node_id: str | None = config.flowd.node_id if is_shared_database(config) else None

    # ------------------------------------------------------------------ effects
    def _apply(self, effects: Effects) -> None:
        if effects.statuses:
            # First: the daemon has them before anything below can wake its publisher,
            # which sends a flow's result only after its last status.
            send_statuses(self.config.flowd.state_dir, effects.statuses)
        now = [(flow_id, token) for flow_id, token, delay in effects.enqueue if not delay or delay <= 0]
        if self._enqueue_many is not None and len(now) > 1:
            # Flows admitted together travel together: one message per worker, not per flow.
            chunks = min(max(self.config.flowd.workers, 1), len(now))
            for index in range(chunks):
                self._enqueue_many(now[index::chunks])
        else:
            for flow_id, token in now:
                self._enqueue(flow_id, token, None)
        for flow_id, token, delay in effects.enqueue:
            if delay and delay > 0:
                self._enqueue(flow_id, token, delay)
        if effects.published:
            outbox.notify(self.config.flowd.state_dir)
        for pid in effects.signal_pids:
            if pid != os.getpid():
                try:
                    os.kill(pid, CANCEL_SIGNAL)
                except OSError:
                    pass  # gone already, or not ours: the worker sees the state when its step ends

    def _publish(self, topic: str, payload: str, effects: Effects, now: dt.datetime,
                 correlation_data: str | None = None, writes: store.FlowWrites | None = None) -> None:
        """``payload``: its JSON text; ``writes``: where the row goes when its flow's end is deferred."""
        add = writes.add_outbox if writes is not None else store.add_outbox
        add(topic, payload, correlation_data, now, self.node_id)
        effects.published = True

    def _publish_status(self, flow: Row, effects: Effects, *, state_change: bool, child_id: int | None = None
                        ) -> None:
        """Queue the flow's status (after the commit, not through the outbox: SPEC 4.4) if
        its routine's ``status`` wants it: ``steps`` every one, ``states`` only a change
        of state (a finished step or a failed attempt is not), ``off`` none."""
        mode = self._status_mode(flow.routine)
        if mode == "off" or (mode == "states" and not state_change):
            return
        effects.statuses.append(Status(flow.id, flow.state, self.config.topic(f"flow/{flow.id}/status"),
                                       status_payload_text(flow, child_id)))

    def _status_mode(self, routine: str) -> str:
        info = self._routine_info(routine)
        return info.status if info is not None else "steps"

    def _routine_info(self, routine: str) -> store.RoutineInfo | None:
        info = self.definitions.routines.get(routine)
        if info is None and self.definitions.version is None:  # this process has not read them yet
            self.definitions.refresh()
            info = self.definitions.routines.get(routine)
        return info

    def _publish_result(self, flow: Row, effects: Effects, now: dt.datetime, writes: store.FlowWrites | None,
                        result_json: str | None) -> None:
        payload = flow_result_text(flow, result_json)
        self._publish(self.config.topic(f"flow/{flow.id}/result"), payload, effects, now, writes=writes)
        if flow.reply_to:
            self._publish(flow.reply_to, payload, effects, now, flow.correlation_data, writes)
        if self.config.homeassistant.discovery:
            info = self._routine_info(flow.routine)
            if info is not None and info.mqtt:  # its Home Assistant sensor (SPEC 12): the last flow, retained
                from flowd.mqtt.homeassistant import last_flow_topic

                if writes is not None:
                    writes.flush()  # after the result, as before
                outbox.add_message(last_flow_topic(self.config, flow.routine), payload, retain=True,
                                   node_id=self.node_id)

    def _create_flow(self, info: store.RoutineInfo, args: list[Any], kwargs: dict[str, Any], effects: Effects,
                     now: dt.datetime, **fields: Any) -> Row:
        values = {"uid": store.new_uid(), "routine": info.name, "steps": info.steps, "state": INIT,
                  "position": 0, "args": args, "kwargs": kwargs, "request_id": None, "trigger": "api",
                  "reply_to": None, "correlation_data": None, "admitted": False, "dispatch_token": 0,
                  "worker_pid": None, "step_attempt": 0, "interruptions": 0, "next_attempt_at": None,
                  "deadline": None, "result": None, "error": None, "created_at": now, "started_at": None,
                  "finished_at": None, "updated_at": now, "parent_id": None, "depth": 0, "wait_topic": None,
                  "wait_match": None, "wait_until": None, "node_id": None}
        values.update(fields)
        admit_now = info.mode == PARALLEL and self._parallel_slot_free(info, effects)
        if admit_now:  # admitted as it is stored: one statement, not two
            values.update(admitted=True, dispatch_token=1)
            effects.slots.admitted(info.name)
        values["id"] = store.insert_flow(values)  # every column: a NULL bound is a NULL left out
        flow = Row(values)
        if flow.reply_to:
            self._publish(flow.reply_to, status_payload_text(flow), effects, now, flow.correlation_data)
        if admit_now:
            effects.enqueue.append((flow.id, flow.dispatch_token, None))
        else:
            self._admit_new(flow, info, effects, now)
        return flow

    def _routine_for_submit(self, name: str, require_mqtt: bool, *, refresh: bool = True) -> store.RoutineInfo:
        if refresh:
            self.definitions.refresh()
        info = self.definitions.routines.get(name)
        if info is None:
            raise NotFoundError("routine", name, "list them with 'flowctl routine list'")
        if not info.enabled:
            raise InputError(f"routine '{name}' is disabled; enable it with 'flowctl routine enable {name}'")
        if require_mqtt and not info.mqtt:
            raise InputError(f"routine '{name}' may not be started over MQTT (mqtt = false)")
        if not info.steps:
            raise InputError(f"routine '{name}' has no tasks")
        return info

    # ------------------------------------------------------------------ admission (SPEC 1 modes)
    def _admit_new(self, flow: Row, info: store.RoutineInfo, effects: Effects, now: dt.datetime) -> None:
        mode, limit = info.mode, max(info.max, 1)
        if mode == PARALLEL:  # a flow stored already (a retry): it is one of the pending ones itself
            if (effects.slots.count_active(info.name) < limit
                    and not [f for f in store.pending_flows(info.name, 2) if f.id != flow.id]):
                self._admit(flow, effects, now)
                effects.slots.admitted(info.name)
            else:
                effects.slots.left_pending(info.name)
            return
        active = [f for f in store.active_flows(info.name) if f.id != flow.id]
        if mode == SINGLE and active:
            self._end(flow, FlowState.CANCELLED, effects, now, error=(
                f"routine '{info.name}' runs in mode single and flow {active[0].id} is still running"))
        elif mode == RESTART:
            for old in active:
                self._cancel_tree(old, effects, now, f"restarted: routine '{info.name}' runs in mode "
                                  f"restart and flow {flow.id} replaced it")
            self._admit(flow, effects, now)
        elif mode == QUEUED:
            pending = [f for f in store.pending_flows(info.name) if f.id != flow.id]
            if not active and not pending:
                self._admit(flow, effects, now)
                return
            effects.slots.left_pending(info.name)
            if len(pending) >= limit:
                self._end(flow, FlowState.CANCELLED, effects, now, error=(
                    f"routine '{info.name}' runs in mode queued and its queue is full ({limit} waiting)"))
        else:
            self._admit(flow, effects, now)

    @staticmethod
    def _parallel_slot_free(info: store.RoutineInfo, effects: Effects) -> bool:
        """A new flow of a parallel routine may start now: a slot is free and no older
        flow waits for one (it would be overtaken)."""
        return (effects.slots.count_active(info.name) < max(info.max, 1)
                and not effects.slots.has_pending(info.name))

    def _admit(self, flow: Row, effects: Effects, now: dt.datetime, delay: float | None = None) -> None:
        store.update_flow(flow, admitted=True, dispatch_token=flow.dispatch_token + 1, worker_pid=None, node_id=None,
                          updated_at=now)
        effects.enqueue.append((flow.id, flow.dispatch_token, delay))

    def _admit_pending(self, routine_name: str, effects: Effects, now: dt.datetime) -> None:
        """Admit the oldest waiting flows of a routine into its free slots (reading only
        as many as there are slots: a long queue is not read at every flow's end)."""
        if not effects.slots.has_pending(routine_name):
            return
        self.definitions.refresh()
        info = self.definitions.routines.get(routine_name)
        limit = 1 if info is None or info.mode in (QUEUED, SINGLE) else max(info.max, 1)
        free = max(limit - effects.slots.count_active(routine_name), 0)
        if not free:
            return
        pending = store.pending_flows(routine_name, free + 1)
        effects.slots.pending[routine_name] = len(pending) > free
        for flow in pending[:free]:
            self._admit(flow, effects, now)
            effects.slots.admitted(routine_name)

    # ------------------------------------------------------------------ ending
    def _end(self, flow: Row, state: FlowState, effects: Effects, now: dt.datetime, *, result: Any = None,
             error: str | None = None, result_json: str | None = None, writes: store.FlowWrites | None = None,
             tell_parent: bool = True) -> None:
        """``result_json``: the result's JSON text, when the caller has it (a worker's last step);
        ``writes``: where its update and messages go, when this worker held the flow (not read again);
        ``tell_parent``: false in a cascade, where the parent is ending too and must not resume."""
        was_admitted = flow.admitted and not flow.is_ended
        store.update_flow(flow, state=state.value, result=result, error=error, finished_at=now, updated_at=now,
                          worker_pid=None, next_attempt_at=None, wait_topic=None, wait_match=None, wait_until=None,
                          texts={"result": result_json} if result_json is not None else None, defer=writes)
        if state != FlowState.DONE:
            store.end_running_results(flow.id, CANCELLED if state == FlowState.CANCELLED else FAILED, error, now)
        self._publish_status(flow, effects, state_change=True)
        self._publish_result(flow, effects, now, writes, result_json)
        extra = {"FLOW_ID": flow.id, "ROUTINE": flow.routine}
        if state == FlowState.DONE:
            log.debug("flow %d (%s) ended DONE", flow.id, flow.routine, extra=extra)
        else:  # FAILED is for `journalctl -p warning`; a cancel is somebody's decision
            log.log(logging.WARNING if state == FlowState.FAILED else logging.INFO, "flow %d (%s) ended %s: %s",
                    flow.id, flow.routine, state.value, (error or "").strip().split("\n", 1)[0], extra=extra)
        if state != FlowState.DONE:
            for child in store.active_children(flow.id):
                why = "was cancelled" if state == FlowState.CANCELLED else f"ended {state.value}"
                self._cancel_tree(child, effects, now, f"parent flow {flow.id} {why}")
        if was_admitted:
            effects.slots.ended(flow.routine)
            if writes is not None and effects.slots.has_pending(flow.routine):
                writes.flush()  # admitting counts the active flows in the database
            self._admit_pending(flow.routine, effects, now)
        if flow.parent_id and tell_parent:
            if writes is not None:
                writes.flush()  # the parent's writes and messages come after the child's
            self._child_ended(flow, effects, now)

    def _child_ended(self, child: Row, effects: Effects, now: dt.datetime) -> None:
        parent = store.get_flow(child.parent_id)
        if parent is None or parent.state != WAITING or parent.wait_topic is not None:
            return
        running = store.running_result(parent.id, parent.position)
        if running is None or (running.output or {}).get("child") != child.id:
            return
        if child.state == DONE:
            self._advance(parent, running, child.result, effects, now)
        else:
            why = child.error or child.state.lower()
            self._record_failure(parent, running, f"sub-flow {child.id} ({child.routine}) ended "
                                 f"{child.state}: {why}", effects, now)

    def _cancel_tree(self, flow: Row, effects: Effects, now: dt.datetime, reason: str) -> None:
        running = store.running_result(flow.id, flow.position)
        if running is not None and running.worker_pid and running.node_id == self.node_id:
            effects.signal_pids.append(running.worker_pid)  # a pid means something on its own node only
        self._end(flow, FlowState.CANCELLED, effects, now, error=reason, tell_parent=False)  # and its children

    @staticmethod
    def _get(flow_id: int) -> Row:
        flow = store.get_flow(flow_id)
        if flow is None:
            raise NotFoundError("flow", flow_id, "list flows with 'flowctl flows'")
        return flow

    def _start_step(self, flow: Row, step_input: dict[str, Any], results: list[Any], pid: int, now: dt.datetime,
                    attempt: int | None = None, input_json: str | None = None,
                    writes: store.FlowWrites | None = None) -> ClaimedStep:
        """``writes``: where a first attempt is inserted (its id set at the flush)."""
        task_name = flow.steps[flow.position]
        result_id = 0
        if writes is None or attempt is None:
            result_id, attempt = store.insert_result(flow.id, flow.position, task_name, input_json or step_input, pid,
                                                     now, attempt, self.node_id)
        task = self.definitions.tasks.get(task_name)
        step = ClaimedStep(
            flow_id=flow.id, flow_uid=flow.uid, routine=flow.routine, token=flow.dispatch_token,
            steps=flow.steps, position=flow.position, attempt=attempt, task_result_id=result_id,  # both only read
            task_name=task_name, script=task.script if task else None, options=task.options if task else {},
            timeout=task.timeout if task else None, args=list(step_input.get("args", [])),
            kwargs=dict(step_input.get("kwargs", {})), results=results, deadline=flow.deadline, flow=flow)
        if not result_id and writes is not None:
            writes.insert_result(step, flow.id, flow.position, task_name, input_json or dumps(step_input), pid, now,
                                 self.node_id)
        return step

    def _held(self, step: ClaimedStep, pid: int) -> tuple[Row | None, Row | None]:
        """The flow and attempt, if this worker still holds them (not cancelled/taken over)."""
        flow, result = store.flow_and_result(step.flow_id, step.task_result_id)
        if not is_held_by(flow, pid, self.node_id, step.token):
            return None, None
        if result is None or result.state != RUNNING:
            return None, None
        return flow, result

    def _advance(self, flow: Row, result: Row, output: Any, effects: Effects, now: dt.datetime
                 ) -> ClaimedStep | None:
        """Record ``output`` for the running attempt of a flow no worker holds (a wait or a
        sub-flow ended); queue its next step or end it DONE."""
        store.update_result(result.id, state=DONE, output=output, finished_at=now)
        return self._next_step(flow, output, effects, now, pid=None, results=None)

    def _next_step(self, flow: Row, output: Any, effects: Effects, now: dt.datetime, *, pid: int | None,
                   results: list[Any] | None, output_json: str | None = None,
                   writes: store.FlowWrites | None = None) -> ClaimedStep | None:
        """After a step's output is recorded: start the next step, or end the flow DONE.
        ``writes``: where the move to the next step goes when a worker holds the flow on."""
        if flow.position + 1 >= len(flow.steps):
            self._end(flow, FlowState.DONE, effects, now, result=output, result_json=output_json, writes=writes)
            return None
        if flow.deadline and now >= flow.deadline:
            store.update_flow(flow, position=flow.position + 1)
            self._end(flow, FlowState.FAILED, effects, now, error=self.definitions.timeout_text(flow.routine))
            return None
        resumed = flow.state != RUNNING  # a wait or a sub-flow ended
        store.update_flow(flow, state=RUNNING, position=flow.position + 1, step_attempt=0, interruptions=0,
                          wait_topic=None, wait_match=None, wait_until=None,
                          updated_at=now, worker_pid=pid, defer=writes if pid is not None else None)
        self._publish_status(flow, effects, state_change=resumed)
        if pid is None:
            self._admit(flow, effects, now)
            return None
        if results is None:
            results = store.done_outputs(flow.id, flow.position)
        # A step the flow has just reached has no earlier attempt.
        return self._start_step(flow, output, results, pid, now, attempt=1, input_json=output_json, writes=writes)

    def _record_failure(self, flow: Row, result: Row, error: str, effects: Effects, now: dt.datetime,
                        interrupted: bool = False) -> None:
        store.update_result(result.id, state=FAILED, error=error, finished_at=now)
        summary = error.strip().splitlines()[-1] if error.strip() else "failed"
        label = f"step {flow.position + 1}/{len(flow.steps)} ({result.task})"
        waits = {"wait_topic": None, "wait_match": None, "wait_until": None}
        if interrupted:
            if flow.interruptions + 1 > MAX_INTERRUPTIONS:
                store.update_flow(flow, interruptions=flow.interruptions + 1)
                self._end(flow, FlowState.FAILED, effects, now, error=(
                    f"{label} was interrupted {flow.interruptions} times (its worker keeps dying): {summary}"))
                return
            store.update_flow(flow, state=RUNNING, interruptions=flow.interruptions + 1, **waits)
            self._admit(flow, effects, now)
            return
        task = self.definitions.tasks.get(result.task)
        retries = task.retries if task else 0
        attempts = flow.step_attempt + 1
        timed_out = bool(flow.deadline and now >= flow.deadline)
        if attempts <= retries and not timed_out:
            resumed = flow.state != RUNNING  # a wait that timed out
            delay = store.retry_delay(task, attempts)
            store.update_flow(flow, state=RUNNING, step_attempt=attempts,
                              next_attempt_at=now + dt.timedelta(seconds=delay), updated_at=now, **waits)
            log.info("flow %d %s attempt %d failed, retry in %.1fs: %s", flow.id, label, result.attempt, delay,
                     summary, extra={"FLOW_ID": flow.id, "ROUTINE": flow.routine, "TASK": result.task})
            self._publish_status(flow, effects, state_change=resumed)
            self._admit(flow, effects, now, delay=delay)
            return
        store.update_flow(flow, step_attempt=attempts)
        if timed_out:
            self._end(flow, FlowState.FAILED, effects, now, error=self.definitions.timeout_text(flow.routine))
        else:
            self._end(flow, FlowState.FAILED, effects, now, error=f"{label} failed: {summary}")

    @staticmethod
    def _refuse_waiting_on_itself(flow: Row, info: store.RoutineInfo) -> None:
        """A sub-flow whose routine is held by one of its own ancestors would wait for
        that ancestor (queued, or parallel with every slot taken), be refused (single) or
        cancel it (restart): refuse it now, so the step fails with a reason."""
        ancestors: list[Row] = []
        current: Row | None = flow
        while current is not None:
            ancestors.append(current)
            current = store.get_flow(current.parent_id) if current.parent_id else None
        holders = [a for a in ancestors if a.routine == info.name and not a.is_ended]
        if not holders:
            return
        holder = holders[0]
        if info.mode in (QUEUED, SINGLE):
            why = (f"it runs in mode {info.mode} and flow {holder.id}, an ancestor, holds it: the child would "
                   "wait for it")
        elif info.mode == RESTART:
            why = f"it runs in mode restart: starting it would cancel flow {holder.id}, an ancestor"
        elif store.count_active(info.name) >= max(info.max, 1):
            why = (f"all {info.max} parallel slots are taken, flow {holder.id} (an ancestor) among them: the child "
                   "would wait for it")
        else:
            return
        raise InputError(f"flow {flow.id} cannot start routine '{info.name}' as a sub-flow: {why}")
