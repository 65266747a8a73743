"""The flow state machine: every transition of a Flow and its TaskResults.

Each public method is one short IMMEDIATE transaction. Side effects that must not
happen unless the transaction committed (queueing a flow for a worker, waking the
outbox publisher, sending status messages, signalling a worker) are collected in
:class:`Effects` and carried out after the commit. Any process may call these: the
daemon, a worker, flowctl. The per-step path uses the precompiled statements of :mod:`flowd.store`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flowd import store
from flowd.config import Config

# Re-exported: the MQTT bridge and the foreground runner import them from here.
from flowd.engine.flowmessages import flow_result_text
from flowd.engine.flowmessages import flow_status_payload as flow_status_payload
from flowd.engine.flowmessages import payload_matches as payload_matches
from flowd.engine.lease import is_shared_database
from flowd.errors import DuplicateRequest, FlowdError, InputError, NotFoundError
from flowd.mqtt import outbox
from flowd.mqtt.status import Status, send_statuses, status_payload_text
from flowd.store import Row, nodes
from flowd.store.models import (
    CANCELLED,
    DONE,
    FAILED,
    INIT,
    RUNNING,
    WAITING,
    FlowState,
    Routine,
    dumps,
    make_step_durable,
    utcnow,
    write_transaction,
)

log = logging.getLogger(__name__)

MAX_INTERRUPTIONS = 5
MAX_SUBFLOW_DEPTH = 8
CANCEL_SIGNAL = signal.SIGUSR1
# (flow id, dispatch token, delay): a delay is always the flow's stored next_attempt_at
# minus now, so the queue may take the time from the database (queue.RetryTimer).
Enqueue = Callable[[int, int, float | None], None]
EnqueueMany = Callable[[list[tuple[int, int]]], None]


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    enqueue: list[tuple[int, int, float | None]] = field(default_factory=list)
    signal_pids: list[int] = field(default_factory=list)
    published: bool = False
    statuses: list[Status] = field(default_factory=list)  # sent after the commit
    slots: Slots = field(default_factory=lambda: Slots())

    def extend(self, other: Effects) -> None:
        self.enqueue.extend(other.enqueue)
        self.signal_pids.extend(other.signal_pids)
        self.published = self.published or other.published
        self.statuses.extend(other.statuses)


@dataclass
class Slots:
    """What one transaction has learnt about its routines' admission, so a batch of
    submits or step completions asks the database once per routine, not once per flow.

    Every flow the transaction admits, ends or leaves pending updates it; nothing else
    writes flows while the transaction holds the write lock.
    """

    active: dict[str, int] = field(default_factory=dict)   # admitted, not ended
    pending: dict[str, bool] = field(default_factory=dict)  # some flow waits for admission

    def count_active(self, routine: str) -> int:
        if routine not in self.active:
            self.active[routine] = store.count_active(routine)
        return self.active[routine]

    def has_pending(self, routine: str) -> bool:
        if routine not in self.pending:
            self.pending[routine] = store.has_pending(routine)
        return self.pending[routine]

    def admitted(self, routine: str) -> None:
        if routine in self.active:
            self.active[routine] += 1

    def ended(self, routine: str) -> None:
        if routine in self.active:
            self.active[routine] -= 1

    def left_pending(self, routine: str) -> None:
        self.pending[routine] = True


@dataclass(frozen=True)
class Submission:
    """One request to start a flow (``Engine.submit_many``)."""

    routine: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    reply_to: str | None = None
    correlation_data: str | None = None
    trigger: str = "api"
    require_mqtt: bool = False


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
    started_at: dt.datetime | None = None  # set by the runner when perform() really starts
    # The flow as this worker last wrote it: a held flow changes only through its holder
    # (a cancel or a takeover changes its token, worker or state, which the next write checks).
    flow: Row | None = field(default=None, repr=False, compare=False)
    # The output's JSON text, encoded once when the runner checked it: stored as this
    # attempt's output and as the next attempt's input without encoding it again.
    output_json: str | None = field(default=None, repr=False, compare=False)


class Engine:
    """Transitions of flows, shared by every process.

    >>> engine = Engine(config, enqueue=queue.enqueue_flow)
    >>> flow, created = engine.submit("fetch-weather", ["a"], {"city": "Oslo"})
    """

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

    # ------------------------------------------------------------------ submit
    def submit(self, routine: str | Routine, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, *,
               request_id: str | None = None, reply_to: str | None = None, correlation_data: str | None = None,
               trigger: str = "api", require_mqtt: bool = False, sync: bool = True, now: dt.datetime | None = None
               ) -> tuple[Row, bool]:
        """Store a new flow (or find the one with this ``request_id``); returns (flow, created).

        Raises NotFoundError / InputError for an unknown, disabled or (with
        ``require_mqtt``) MQTT-forbidden routine. A flow refused by the routine's
        mode is still stored, ended CANCELLED with the reason, and published.
        ``sync=False``: the caller calls ``models.make_durable()`` before it reports the
        flow (the MQTT bridge, before its PUBACK).
        """
        name = routine.name if isinstance(routine, Routine) else routine
        submission = Submission(name, list(args), dict(kwargs or {}), request_id, reply_to, correlation_data,
                                trigger, require_mqtt)
        [outcome] = self.submit_many([submission], sync=sync, now=now)
        if isinstance(outcome, FlowdError):
            raise outcome
        return outcome

    def submit_many(self, submissions: list[Submission], *, sync: bool = True, now: dt.datetime | None = None
                    ) -> list[tuple[Row, bool] | FlowdError]:
        """Store several submits in one transaction (group commit); per submit, (flow,
        created) or the FlowdError that refused it. A refusal changes nothing and never
        undoes the others: every refusal is decided by reads, before its submit writes.

        Another node may store a flow with one of these ``request_id`` after this
        transaction looked for it (several nodes, SPEC 10): the database refuses the
        second, the transaction rolls back, and the batch is stored again at once; the
        read then finds that flow and answers it as a duplicate (SPEC 4.1). Each retry
        finds one more, so they are bounded by the batch's size.
        """
        now = now or utcnow()
        self.definitions.refresh()
        for _ in range(len(submissions)):
            try:
                return self._submit_batch(submissions, sync, now)
            except DuplicateRequest as exc:
                log.info("request_id '%s' was stored by another node at the same moment; storing the other %d "
                         "submit(s) of its batch again and answering it as a duplicate", exc.request_id,
                         len(submissions) - 1)
        return self._submit_batch(submissions, sync, now)

    def _submit_batch(self, submissions: list[Submission], sync: bool, now: dt.datetime
                      ) -> list[tuple[Row, bool] | FlowdError]:
        effects = Effects()
        outcomes: list[tuple[Row, bool] | FlowdError] = []
        with write_transaction(sync=sync):
            for submission in submissions:
                try:  # every refusal comes from these reads, before anything is written
                    found = self._check_submit(submission)
                except FlowdError as exc:
                    outcomes.append(exc)
                    continue
                if isinstance(found, Row):
                    outcomes.append((found, False))
                else:
                    outcomes.append((self._create_submitted(submission, found, effects, now), True))
        self._apply(effects)
        return outcomes

    def _submit_one(self, s: Submission, effects: Effects, now: dt.datetime) -> tuple[Row, bool]:
        found = self._check_submit(s)
        if isinstance(found, Row):
            return found, False
        return self._create_submitted(s, found, effects, now), True

    def _check_submit(self, s: Submission) -> Row | store.RoutineInfo:
        """The flow this submit's ``request_id`` already started, or the routine to start;
        raises the FlowdError that refuses the submit. Reads only: a refusal undoes nothing."""
        if s.request_id is not None:
            existing = store.flow_by_request_id(s.request_id)
            if existing is not None:
                return existing
        return self._routine_for_submit(s.routine, s.require_mqtt, refresh=False)

    def _create_submitted(self, s: Submission, info: store.RoutineInfo, effects: Effects, now: dt.datetime) -> Row:
        return self._create_flow(info, s.args, s.kwargs, effects, now, request_id=s.request_id, trigger=s.trigger,
                                 reply_to=s.reply_to, correlation_data=s.correlation_data)

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
        admit_now = info.mode == "parallel" and self._parallel_slot_free(info, effects)
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
        if mode == "parallel":  # a flow stored already (a retry): it is one of the pending ones itself
            if (effects.slots.count_active(info.name) < limit
                    and not [f for f in store.pending_flows(info.name, 2) if f.id != flow.id]):
                self._admit(flow, effects, now)
                effects.slots.admitted(info.name)
            else:
                effects.slots.left_pending(info.name)
            return
        active = [f for f in store.active_flows(info.name) if f.id != flow.id]
        if mode == "single" and active:
            self._end(flow, FlowState.CANCELLED, effects, now, error=(
                f"routine '{info.name}' runs in mode single and flow {active[0].id} is still running"))
        elif mode == "restart":
            for old in active:
                self._cancel_tree(old, effects, now, f"restarted: routine '{info.name}' runs in mode "
                                  f"restart and flow {flow.id} replaced it")
            self._admit(flow, effects, now)
        elif mode == "queued":
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
        limit = 1 if info is None or info.mode in ("queued", "single") else max(info.max, 1)
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
             error: str | None = None, result_json: str | None = None, writes: store.FlowWrites | None = None) -> None:
        """``result_json``: the result's JSON text, when the caller has it (a worker's last step);
        ``writes``: where its update and messages go, when this worker held the flow (not read again)."""
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
        if flow.parent_id:
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
        # _end cancels the children too.
        parent_id, flow.parent_id = flow.parent_id, None  # a cascade must not resume the parent
        self._end(flow, FlowState.CANCELLED, effects, now, error=reason)
        flow.parent_id = parent_id

    # ------------------------------------------------------------------ people: cancel, retry
    def cancel(self, flow_id: int, reason: str = "cancelled by request", now: dt.datetime | None = None) -> Row:
        """End a flow CANCELLED (its running step is interrupted, its children cancelled)."""
        effects = Effects()
        now = now or utcnow()
        self.definitions.refresh()
        with write_transaction():
            flow = self._get(flow_id)
            if flow.is_ended:
                raise InputError(f"flow {flow_id} has already ended ({flow.state}); nothing to cancel")
            self._cancel_tree(flow, effects, now, reason)
            if flow.parent_id:
                self._child_ended(flow, effects, now)
        self._apply(effects)
        return self._get(flow_id)

    def retry(self, flow_id: int, now: dt.datetime | None = None) -> Row:
        """Resume a FAILED or CANCELLED flow from the step that did not finish."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction():
            flow = self._get(flow_id)
            if flow.state not in (FAILED, CANCELLED):
                raise InputError(f"flow {flow_id} is {flow.state}; only FAILED or CANCELLED flows can be retried")
            self.definitions.refresh()
            info = self.definitions.routines.get(flow.routine)
            if info is None:
                raise NotFoundError("routine", flow.routine, "the flow's routine was removed")
            store.update_flow(flow, state=INIT, error=None, result=None, finished_at=None,
                              deadline=None, admitted=False, step_attempt=0, interruptions=0, updated_at=now)
            self._publish_status(flow, effects, state_change=True)
            self._admit_new(flow, info, effects, now)
        self._apply(effects)
        return self._get(flow_id)

    @staticmethod
    def _get(flow_id: int) -> Row:
        flow = store.get_flow(flow_id)
        if flow is None:
            raise NotFoundError("flow", flow_id, "list flows with 'flowctl flows'")
        return flow

    # ------------------------------------------------------------------ worker side
    def claim(self, flow_id: int, token: int, pid: int, now: dt.datetime | None = None) -> ClaimedStep | None:
        """Take the flow for this worker and start its current step; None if the queue
        message is stale (token changed, flow ended or already held)."""
        steps = self.claim_many([(flow_id, token)], pid, now)
        return steps[0] if steps else None

    def claim_many(self, pairs: list[tuple[int, int]], pid: int, now: dt.datetime | None = None
                   ) -> list[ClaimedStep]:
        """Take several flows (one queue message) in one transaction; the steps of those
        whose message is not stale, in message order."""
        effects = Effects()
        now = now or utcnow()
        steps: list[ClaimedStep] = []
        self.definitions.refresh()
        # Made durable by the next sync point: if a power cut loses the claim, recovery queues the step again.
        with write_transaction(sync=False):
            flows, writes = store.flows_by_id([flow_id for flow_id, _ in pairs]), store.FlowWrites()
            for flow_id, token in pairs:
                step = self._claim_one(flows.get(flow_id), token, pid, effects, now, writes)
                if step is not None:
                    steps.append(step)
            writes.flush()
        self._apply(effects)
        return steps

    def _claim_one(self, flow: Row | None, token: int, pid: int, effects: Effects, now: dt.datetime,
                   writes: store.FlowWrites) -> ClaimedStep | None:
        """``writes``: where the claim's own update goes (the claimed flow is not read again)."""
        step: ClaimedStep | None = None
        if (flow is None or flow.dispatch_token != token or not flow.admitted
                or flow.state not in (INIT, RUNNING) or flow.worker_pid):
            return None
        if flow.next_attempt_at and flow.next_attempt_at > now + dt.timedelta(seconds=0.05):
            effects.enqueue.append((flow.id, flow.dispatch_token, (flow.next_attempt_at - now).total_seconds()))
        elif flow.deadline and now >= flow.deadline:
            self._end(flow, FlowState.FAILED, effects, now, error=self.definitions.timeout_text(flow.routine))
        else:
            changes: dict[str, Any] = {"worker_pid": pid, "node_id": self.node_id, "next_attempt_at": None,
                                       "updated_at": now}
            fresh = flow.started_at is None  # set with its first attempt, in the same transaction
            if flow.state == INIT:
                info = self.definitions.routines.get(flow.routine)
                changes.update(state=RUNNING, started_at=flow.started_at or now)
                if info is not None and info.timeout and flow.deadline is None:
                    changes["deadline"] = now + dt.timedelta(seconds=info.timeout)
                store.update_flow(flow, defer=writes, **changes)
                self._publish_status(flow, effects, state_change=True)
            else:
                store.update_flow(flow, defer=writes, **changes)
            if flow.position == 0:
                step_input = {"args": flow.args or [], "kwargs": flow.kwargs or {}}
                results: list[Any] = []
            else:
                step_input = store.step_output(flow.id, flow.position - 1) or {"args": [], "kwargs": {}}
                results = store.done_outputs(flow.id, flow.position)
            # A flow that never ran has no earlier attempt: no need to count them.
            step = self._start_step(flow, step_input, results, pid, now, attempt=1 if fresh else None, writes=writes)
        return step

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
        if (flow is None or flow.state != RUNNING or flow.worker_pid != pid
                or flow.node_id != self.node_id or flow.dispatch_token != step.token):
            return None, None
        if result is None or result.state != RUNNING:
            return None, None
        return flow, result

    def finish_step(self, step: ClaimedStep, output: dict[str, Any], pid: int, *, stop: bool = False,
                    now: dt.datetime | None = None) -> ClaimedStep | None:
        """Commit a finished step and start the next one in the same transaction.

        Returns the next step to run, or None when the flow ended, was cancelled, or
        ``stop`` is set (shutdown: the next step is queued instead of run here).
        """
        nxt = self.finish_many([(step, output)], pid, hold=not stop, now=now)
        return nxt[0] if nxt else None

    def finish_many(self, finished: list[tuple[ClaimedStep, dict[str, Any]]], pid: int, *, hold: bool = True,
                    now: dt.datetime | None = None, claim: list[tuple[int, int]] | None = None
                    ) -> list[ClaimedStep]:
        """Commit several finished steps, and start the next step of each, in one
        transaction (group commit); returns the next steps, held by ``pid`` (or queued
        for any worker when ``hold`` is false). Flows no longer held are skipped.
        ``claim``: (flow id, token) of queue messages taken meanwhile, claimed in the
        same transaction; their steps come last."""
        effects = Effects()
        now = now or utcnow()
        nxt: list[ClaimedStep] = []
        if claim:
            self.definitions.refresh()
        writes = store.FlowWrites()  # the held flows' moves to their next step, written together
        texts = [step.output_json if step.output_json is not None else dumps(output) for step, output in finished]
        with write_transaction(sync=False):
            # All recorded first: a next step touches no other held flow (a parent waits for its sub-flows).
            recorded = store.finish_held_results([step for step, _ in finished], texts, now, pid, self.node_id)
            for (step, output), text in zip(finished, texts, strict=True):
                if step.flow is None or step.task_result_id not in recorded:
                    continue  # cancelled or taken over meanwhile: its new owner decides
                started = self._next_step(step.flow, output, effects, now, pid=pid if hold else None,
                                          results=[*step.results, output], output_json=text, writes=writes)
                if started is not None:
                    nxt.append(started)
            writes.flush()
            if claim:
                flows = store.flows_by_id([flow_id for flow_id, _ in claim])
                for flow_id, token in claim:
                    started = self._claim_one(flows.get(flow_id), token, pid, effects, now, writes)
                    if started is not None:
                        nxt.append(started)
                writes.flush()
        if finished:
            # At synchronous = full these outputs are on disk before the next steps run,
            # and before the daemon hears of them: its publisher finds nothing to sync.
            make_step_durable()
        self._apply(effects)
        return nxt

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
        store.update_flow(flow, position=flow.position + 1, step_attempt=0, interruptions=0,
                          state=RUNNING, wait_topic=None, wait_match=None, wait_until=None,
                          updated_at=now, worker_pid=pid, defer=writes if pid is not None else None)
        self._publish_status(flow, effects, state_change=resumed)
        if pid is None:
            self._admit(flow, effects, now)
            return None
        if results is None:
            results = store.done_outputs(flow.id, flow.position)
        # A step the flow has just reached has no earlier attempt.
        return self._start_step(flow, output, results, pid, now, attempt=1, input_json=output_json, writes=writes)

    def release(self, step: ClaimedStep, pid: int) -> None:
        """Give back a held step that has not started (shutdown): recovery re-queues it."""
        self.release_many([step], pid, requeue=False)

    def release_many(self, steps: list[ClaimedStep], pid: int, *, requeue: bool,
                     now: dt.datetime | None = None) -> None:
        """Give back held steps that have not started, in one transaction: queued again
        for any worker (``requeue``), or left to recovery (shutdown)."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction(sync=False):
            for step in steps:
                flow, result = self._held(step, pid)
                if flow is None or result is None:
                    continue
                store.delete_result(result.id)
                if requeue:
                    self._admit(flow, effects, now)
                else:
                    store.update_flow(flow, worker_pid=None)
        self._apply(effects)

    def held_flow_ids(self, steps: list[ClaimedStep], pid: int) -> set[int]:
        """Which of these steps' flows this worker still holds (after a cancel signal)."""
        if not steps:
            return set()
        held = store.held_tokens([s.flow_id for s in steps], pid, self.node_id)
        return {s.flow_id for s in steps if held.get(s.flow_id) == s.token}

    def fail_step(self, step: ClaimedStep, error: str, pid: int | None, *, interrupted: bool = False,
                  now: dt.datetime | None = None) -> None:
        """Record a failed attempt; retry later (backoff), or end the flow FAILED.

        ``interrupted`` (worker killed, shutdown) does not use up a retry.
        """
        self.fail_attempt(step.flow_id, step.task_result_id, error, pid, interrupted=interrupted, now=now)

    def fail_attempt(self, flow_id: int, task_result_id: int, error: str, pid: int | None, *,
                     interrupted: bool = False, now: dt.datetime | None = None) -> bool:
        """Fail one running attempt; ``pid`` None lets the reaper fail an attempt whose
        worker is gone. False when the attempt was no longer running."""
        effects = Effects()
        now = now or utcnow()
        self.definitions.refresh()
        with write_transaction(sync=False):
            flow, result = store.flow_and_result(flow_id, task_result_id)
            if (flow is None or result is None or result.state != RUNNING or flow.state not in (RUNNING, WAITING)
                    or (pid is not None and (flow.worker_pid != pid or flow.node_id != self.node_id))):
                return False
            self._record_failure(flow, result, error, effects, now, interrupted=interrupted)
        self._apply(effects)
        return True

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
            store.update_flow(flow, interruptions=flow.interruptions + 1, state=RUNNING, **waits)
            self._admit(flow, effects, now)
            return
        task = self.definitions.tasks.get(result.task)
        retries = task.retries if task else 0
        attempts = flow.step_attempt + 1
        timed_out = bool(flow.deadline and now >= flow.deadline)
        if attempts <= retries and not timed_out:
            resumed = flow.state != RUNNING  # a wait that timed out
            delay = store.retry_delay(task, attempts)
            store.update_flow(flow, step_attempt=attempts, state=RUNNING,
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

    # ------------------------------------------------------------------ start-up and lost messages
    def recover(self, now: dt.datetime | None = None) -> int:
        """At daemon start, with no worker of this node running: fail every attempt this
        node was running (interrupted, no retry used) and queue again every admitted flow
        no other node holds. Returns how many flows were queued."""
        effects = Effects()
        now = now or utcnow()
        self.definitions.refresh()
        with write_transaction():
            running = store.running_admitted(self.node_id)
            for flow in running:
                result = store.running_result(flow.id, flow.position)
                if result is not None:
                    self._record_failure(flow, result, "interrupted: flowd stopped while this step ran", effects,
                                         now, interrupted=True)
            queued = {flow_id for flow_id, _, _ in effects.enqueue}
            for flow in store.admitted_not_ended(self.node_id):
                if flow.id in queued:
                    continue
                delay = None
                if flow.next_attempt_at and flow.next_attempt_at > now:
                    delay = (flow.next_attempt_at - now).total_seconds()
                self._admit(flow, effects, now, delay=delay)
            for name in sorted(store.pending_routines()):
                self._admit_pending(name, effects, now)
        self._apply(effects)
        return len(effects.enqueue)

    def take_over(self, node_id: str, now: dt.datetime | None = None) -> list[int]:
        """Take the RUNNING flows of a node whose lease has expired (SPEC 10): each
        interrupted attempt is recorded (no retry used) and the flow queued again at its
        step, for any live node. Its token changes, so the old node commits nothing more
        of it. Returns the flows taken."""
        effects = Effects()
        now = now or utcnow()
        self.definitions.refresh()
        error = f"interrupted: node {node_id} stopped renewing its lease; taken over by node {self.node_id}"
        with write_transaction():
            flows = nodes.flows_of_expired_node(node_id)
            for flow in flows:
                result = store.running_result(flow.id, flow.position)
                if result is not None:
                    self._record_failure(flow, result, error, effects, now, interrupted=True)
                else:
                    delay = None
                    if flow.next_attempt_at and flow.next_attempt_at > now:
                        delay = (flow.next_attempt_at - now).total_seconds()
                    self._admit(flow, effects, now, delay=delay)
        self._apply(effects)
        return [flow.id for flow in flows]

    def requeue(self, flow_id: int, token: int, now: dt.datetime | None = None) -> bool:
        """Queue again a flow whose queue message was lost (token unchanged since)."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction(sync=False):
            flow = store.get_flow(flow_id)
            if (flow is None or flow.dispatch_token != token or not flow.admitted or flow.worker_pid
                    or flow.state not in (INIT, RUNNING)):
                return False
            delay = None
            if flow.next_attempt_at and flow.next_attempt_at > now:
                delay = (flow.next_attempt_at - now).total_seconds()
            self._admit(flow, effects, now, delay=delay)
        self._apply(effects)
        return True

    def due_retries(self, now: dt.datetime | None = None) -> tuple[list[tuple[int, int]], dt.datetime | None]:
        """Flows waiting for a retry (``next_attempt_at``): (id, dispatch token) of those due
        at ``now``, and when the next of the others falls due (None: no other)."""
        now = now or utcnow()
        due: list[tuple[int, int]] = []
        later: dt.datetime | None = None
        for flow in store.retry_waiting():
            if flow.next_attempt_at <= now:
                due.append((flow.id, flow.dispatch_token))
            elif later is None or flow.next_attempt_at < later:
                later = flow.next_attempt_at
        return due, later

    # ------------------------------------------------------------------ waits and sub-flows (SPEC 2.1)
    def wait_step(self, step: ClaimedStep, pid: int, topic: str, match: dict[str, Any] | None,
                  timeout: float | None, now: dt.datetime | None = None) -> bool:
        """Park the flow WAITING for an MQTT message; frees the worker. False if not held."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction(sync=False):
            flow, result = self._held(step, pid)
            if flow is None or result is None:
                return False
            store.update_result(result.id, worker_pid=None, output={
                "args": step.args, "kwargs": step.kwargs, "wait": {"topic": topic, "match": match}})
            store.update_flow(flow, state=WAITING, worker_pid=None, wait_topic=topic, wait_match=match, updated_at=now,
                              wait_until=now + dt.timedelta(seconds=timeout) if timeout else None)
            self._publish_status(flow, effects, state_change=True)
        self._apply(effects)
        return True

    def spawn_subflow(self, step: ClaimedStep, pid: int, routine: str, args: list[Any], kwargs: dict[str, Any],
                      now: dt.datetime | None = None) -> int | None:
        """Start a child flow and park the parent WAITING on it; returns the child id.

        Raises InputError for an unknown routine or past the depth limit (the caller
        fails the step with it)."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction(sync=False):
            flow, result = self._held(step, pid)
            if flow is None or result is None:
                return None
            if flow.depth + 1 > MAX_SUBFLOW_DEPTH:
                raise InputError(f"sub-flow depth limit reached: flow {flow.id} would start a flow "
                                 f"{flow.depth + 1} levels deep (the limit is {MAX_SUBFLOW_DEPTH}); does routine "
                                 f"'{routine}' start itself?")
            info = self._routine_for_submit(routine, require_mqtt=False)
            self._refuse_waiting_on_itself(flow, info)
            store.update_result(result.id, worker_pid=None)
            store.update_flow(flow, state=WAITING, worker_pid=None, updated_at=now)
            child = self._create_flow(info, list(args), dict(kwargs), effects, now, trigger="flow",
                                      parent_id=flow.id, depth=flow.depth + 1)
            store.update_result(result.id, output={"child": child.id})
            self._publish_status(flow, effects, state_change=True, child_id=child.id)
            if child.is_ended:  # refused by its routine's mode
                self._child_ended(child, effects, now)
        self._apply(effects)
        return int(child.id)

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
        if info.mode in ("queued", "single"):
            why = (f"it runs in mode {info.mode} and flow {holder.id}, an ancestor, holds it: the child would "
                   "wait for it")
        elif info.mode == "restart":
            why = f"it runs in mode restart: starting it would cancel flow {holder.id}, an ancestor"
        elif store.count_active(info.name) >= max(info.max, 1):
            why = (f"all {info.max} parallel slots are taken, flow {holder.id} (an ancestor) among them: the child "
                   "would wait for it")
        else:
            return
        raise InputError(f"flow {flow.id} cannot start routine '{info.name}' as a sub-flow: {why}")

    def deliver_event(self, topic: str, payload: Any, now: dt.datetime | None = None) -> list[int]:
        """Resume every flow waiting on ``topic`` whose ``match`` the payload satisfies."""
        from flowd.mqtt.topics import topic_matches

        effects = Effects()
        now = now or utcnow()
        resumed: list[int] = []
        self.definitions.refresh()  # the routines' status settings, for the statuses below
        with write_transaction(sync=False):
            for flow in store.waiting_flows():
                if not topic_matches(flow.wait_topic, topic) or not payload_matches(flow.wait_match, payload):
                    continue
                result = store.running_result(flow.id, flow.position)
                if result is None:
                    continue
                before = result.output or {}
                output = {"args": before.get("args", []), "kwargs": {**before.get("kwargs", {}), "event": payload}}
                self._advance(flow, result, output, effects, now)
                resumed.append(flow.id)
        self._apply(effects)
        return resumed

    def waiting_topics(self) -> set[str]:
        """Topic filters the MQTT bridge must subscribe to for waiting flows."""
        return store.waiting_topics()

    # ------------------------------------------------------------------ reaper duties
    def expire(self, now: dt.datetime | None = None) -> int:
        """Fail waits and flows past their deadline; returns how many were touched."""
        now = now or utcnow()
        effects = Effects()
        touched = 0
        if not store.anything_expired(now):
            return 0
        self.definitions.refresh()
        with write_transaction(sync=False):
            for flow in store.expired_waits(now):
                result = store.running_result(flow.id, flow.position)
                if result is not None:
                    self._record_failure(flow, result, f"timed out waiting for a message on '{flow.wait_topic}'"
                                         f" matching {flow.wait_match or {}}", effects, now)
                    touched += 1
            for flow in store.overdue_unheld(now):
                self._end(flow, FlowState.FAILED, effects, now, error=self.definitions.timeout_text(flow.routine))
                touched += 1
        self._apply(effects)
        return touched
