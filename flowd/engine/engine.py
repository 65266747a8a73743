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
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flowd import store
from flowd.engine.core import CANCEL_SIGNAL as CANCEL_SIGNAL
from flowd.engine.core import MAX_SUBFLOW_DEPTH as MAX_SUBFLOW_DEPTH
from flowd.engine.core import EngineCore
from flowd.engine.effects import ClaimedStep as ClaimedStep
from flowd.engine.effects import Effects
from flowd.engine.effects import Submission as Submission

# Re-exported: the MQTT bridge and the foreground runner import them from here.
from flowd.engine.flowmessages import flow_status_payload as flow_status_payload
from flowd.engine.flowmessages import payload_matches as payload_matches
from flowd.engine.transitions import is_claimable, retry_wait
from flowd.errors import DuplicateRequest, FlowdError, InputError, NotFoundError
from flowd.store import Row, nodes
from flowd.store.models import (
    CANCELLED,
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
T = TypeVar("T")


class Engine(EngineCore):
    """Transitions of flows, shared by every process.

    >>> engine = Engine(config, enqueue=queue.enqueue_flow)
    >>> flow, created = engine.submit("fetch-weather", ["a"], {"city": "Oslo"})
    """

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
        if flow is None or not is_claimable(flow, token):
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
                changes["started_at"] = flow.started_at or now
                if info is not None and info.timeout and flow.deadline is None:
                    changes["deadline"] = now + dt.timedelta(seconds=info.timeout)
                store.update_flow(flow, state=RUNNING, defer=writes, **changes)
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
                self._admit(flow, effects, now, delay=retry_wait(flow, now))
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
                    self._admit(flow, effects, now, delay=retry_wait(flow, now))
        self._apply(effects)
        return [flow.id for flow in flows]

    def requeue(self, flow_id: int, token: int, now: dt.datetime | None = None) -> bool:
        """Queue again a flow whose queue message was lost (token unchanged since)."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction(sync=False):
            flow = store.get_flow(flow_id)
            if flow is None or not is_claimable(flow, token):
                return False
            self._admit(flow, effects, now, delay=retry_wait(flow, now))
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
        def park(flow: Row, result: Row, effects: Effects, now: dt.datetime) -> bool:
            store.update_result(result.id, worker_pid=None, output={
                "args": step.args, "kwargs": step.kwargs, "wait": {"topic": topic, "match": match}})
            store.update_flow(flow, state=WAITING, worker_pid=None, wait_topic=topic, wait_match=match,
                              updated_at=now, wait_until=now + dt.timedelta(seconds=timeout) if timeout else None)
            self._publish_status(flow, effects, state_change=True)
            return True

        return self._while_held(step, pid, now, park) is not None

    def spawn_subflow(self, step: ClaimedStep, pid: int, routine: str, args: list[Any], kwargs: dict[str, Any],
                      now: dt.datetime | None = None) -> int | None:
        """Start a child flow and park the parent WAITING on it; returns the child id.

        Raises InputError for an unknown routine or past the depth limit (the caller
        fails the step with it)."""
        def start_child(flow: Row, result: Row, effects: Effects, now: dt.datetime) -> int:
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
            return int(child.id)

        return self._while_held(step, pid, now, start_child)

    def _while_held(self, step: ClaimedStep, pid: int, now: dt.datetime | None,
                    change: Callable[[Row, Row, Effects, dt.datetime], T]) -> T | None:
        """``change`` the flow and attempt of a step this worker still holds, in one
        transaction; its value, or None (and nothing done) when the step is no longer held."""
        effects = Effects()
        now = now or utcnow()
        with write_transaction(sync=False):
            flow, result = self._held(step, pid)
            if flow is None or result is None:
                return None
            value = change(flow, result, effects, now)
        self._apply(effects)
        return value

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
