"""Several flows in one worker: breadth-first rounds, one commit per round.

A queue message carries the flows admitted together (a batch of submits, flows queued
again together). The worker claims them in one transaction and runs one step of each;
then one transaction records all their outputs and starts their next steps
(``Engine.finish_many``), and so on until each flow ends, waits or fails. A step's
output is still committed before its flow's next step starts. A message with one flow
runs exactly as before: nothing waits for company.

A slow step holds nobody hostage: when a step has run for ``SLOW_STEP_S``, this
process's watchdog thread (its own database connection) commits the outputs already
computed, their next steps going back to the queue, and gives the flows not yet run
back to the queue, so other workers take them.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

from flowd import store
from flowd.engine.engine import ClaimedStep, Engine
from flowd.engine.runner import WorkerRuntime, run_step, runtime
from flowd.store.models import utcnow, write_transaction

log = logging.getLogger(__name__)

SLOW_STEP_S = 0.03        # a step running longer hands the rest of its batch to other workers
RESTAMP_AFTER_S = 0.25    # claimed attempts not started this long get a fresh started_at
FLUSH_AFTER_S = 0.25      # outputs are committed at the latest this long after the first of them
MAX_HELD = 64             # flows a batch takes in from the queue between rounds, at most


class Batch:
    """The flows one worker holds from one queue message.

    Each held flow is in exactly one place: ``todo`` (its step claimed, not started),
    ``running`` or ``done`` (output computed, not committed). The main thread and the
    watchdog change them only under ``cond``.
    """

    def __init__(self, steps: list[ClaimedStep]):
        self.cond = threading.Condition()
        self.todo: collections.deque[ClaimedStep] = collections.deque(steps)
        self.done: list[tuple[ClaimedStep, dict[str, Any]]] = []
        self.running: ClaimedStep | None = None
        self.running_since = 0.0
        self.claimed_at = time.monotonic()
        self.done_since = 0.0

    def take(self) -> ClaimedStep | None:
        """The next step to run in this round (None: the round is over)."""
        with self.cond:
            if not self.todo:
                return None
            step = self.todo.popleft()
            self.running, self.running_since = step, time.monotonic()
            return step  # the watchdog looks every SLOW_STEP_S: no wake-up per step

    def finish(self, step: ClaimedStep, output: dict[str, Any] | None) -> None:
        with self.cond:
            self.running = None
            if output is not None:
                if not self.done:
                    self.done_since = time.monotonic()
                self.done.append((step, output))

    def take_done(self) -> list[tuple[ClaimedStep, dict[str, Any]]]:
        with self.cond:
            done, self.done = self.done, []
            return done

    def take_todo(self) -> list[ClaimedStep]:
        with self.cond:
            todo = list(self.todo)
            self.todo.clear()
            return todo

    def start_round(self, steps: list[ClaimedStep]) -> None:
        with self.cond:
            if not self.todo:
                self.claimed_at = time.monotonic()
            self.todo.extend(steps)

    def is_running_cancelled(self, engine: Engine, pid: int) -> bool:
        """In the cancel signal's handler: was the flow of the running step cancelled
        (the signal names the worker, not the flow)? True when in doubt."""
        step = self.running
        if step is None:
            return False
        if not self.todo and not self.done:
            return True  # this worker holds nothing else
        try:
            return step.flow_id not in engine.held_flow_ids([step], pid)
        except Exception:
            log.exception("flow %d: could not check whether it was cancelled", step.flow_id)
            return True


def run_flows(pairs: list[tuple[int, int]]) -> None:
    """Run the flows of one queue message until each ends, waits, or fails (the queue's task)."""
    run_batch(runtime(), pairs, os.getpid())


def run_batch(rt: WorkerRuntime, pairs: list[tuple[int, int]], pid: int) -> None:
    """Claim the flows of one message and run them breadth-first (see the module)."""
    steps = rt.engine.claim_many(pairs, pid)
    if not steps:
        return
    batch = Batch(steps)
    _watchdog(rt).watch(batch)
    rt.batch = batch
    rt.loader.new_round()
    try:
        while True:
            if rt.stopping():
                _hand_back(rt, batch, pid, requeue=False)
                return
            if rt.cancel_seen:
                rt.cancel_seen = False
                _drop_cancelled(rt, batch, pid)
            if batch.todo and time.monotonic() - batch.claimed_at > RESTAMP_AFTER_S:
                _mark_started(list(batch.todo))
                batch.claimed_at = time.monotonic()
            if batch.todo and batch.done and time.monotonic() - batch.done_since > FLUSH_AFTER_S:
                batch.start_round(rt.engine.finish_many(batch.take_done(), pid))  # long round: commit now
            step = batch.take()
            if step is None:
                done = batch.take_done()
                if not done:
                    return
                hold = not rt.stopping()
                # Flows queued meanwhile join the batch in the round's commit: under load a
                # worker's batch stays full, and its commits carry more steps each.
                more = rt.take_waiting(MAX_HELD - len(done)) if hold and rt.take_waiting is not None else None
                batch.start_round(rt.engine.finish_many(done, pid, hold=hold, claim=more))
                rt.loader.new_round()
                continue
            step.started_at = utcnow()
            output = None
            try:
                output = run_step(rt, step, pid)
            finally:
                batch.finish(step, output)
    except BaseException:
        _hand_back(rt, batch, pid, requeue=False)
        raise
    finally:
        rt.batch = None
        rt.loader.end_rounds()
        _watchdog(rt).watch(None)


def _mark_started(steps: list[ClaimedStep]) -> None:
    """Move the ``started_at`` of held, not yet started attempts to now, so the
    reaper's step timeouts count from (about) their real start."""
    with write_transaction(sync=False):
        store.restamp_running([step.task_result_id for step in steps], utcnow())


def _hand_back(rt: WorkerRuntime, batch: Batch, pid: int, *, requeue: bool) -> None:
    """Commit the outputs in hand (next steps queued) and give back the unstarted flows."""
    done, todo = batch.take_done(), batch.take_todo()
    if done:
        rt.engine.finish_many(done, pid, hold=False)
    if todo:
        rt.engine.release_many(todo, pid, requeue=requeue)


def _drop_cancelled(rt: WorkerRuntime, batch: Batch, pid: int) -> None:
    with batch.cond:
        todo = list(batch.todo)
    held = rt.engine.held_flow_ids(todo, pid)
    with batch.cond:
        batch.todo = collections.deque(s for s in batch.todo if s.flow_id in held)


class Watchdog:
    """A thread of the worker process that hands a batch over while a step is slow."""

    def __init__(self, rt: WorkerRuntime):
        self.rt = rt
        self.batch: Batch | None = None
        self.changed = threading.Event()
        self.handovers = 0
        self._handing = threading.Condition()
        self._in_hand = 0  # flows taken from a batch and not yet committed back to the queue
        self.thread = threading.Thread(target=self._run, name="flowd-batch-watchdog", daemon=True)
        self.thread.start()

    def watch(self, batch: Batch | None) -> None:
        old, self.batch = self.batch, batch
        self.changed.set()
        if old is not None:
            with old.cond:
                old.cond.notify_all()

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            self.changed.wait()
            self.changed.clear()
            batch = self.batch
            while batch is not None and batch is self.batch:
                with batch.cond:
                    if batch.running is None or not (batch.todo or batch.done):
                        batch.cond.wait(SLOW_STEP_S)
                        continue
                    left = batch.running_since + SLOW_STEP_S - time.monotonic()
                    if left > 0:
                        batch.cond.wait(left)
                        continue
                    running = batch.running
                    done, batch.done = batch.done, []
                    todo = list(batch.todo)
                    batch.todo.clear()
                    with self._handing:  # still under batch.cond: the batch never looks empty before this
                        self._in_hand += 1
                try:
                    self._hand_over(batch, running, done, todo, pid)
                finally:
                    with self._handing:
                        self._in_hand -= 1
                        self._handing.notify_all()

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until no hand-over is under way (its flows are back in the queue): a batch
        that ran empty may have given flows away a moment ago. False on timeout."""
        with self._handing:
            return self._handing.wait_for(lambda: self._in_hand == 0, timeout)

    def _hand_over(self, batch: Batch, running: ClaimedStep | None, done: list[tuple[ClaimedStep, dict[str, Any]]],
                   todo: list[ClaimedStep], pid: int) -> None:
        if running is not None:
            log.debug("flow %d step %d (%s) is slow: %d other flow(s) of its batch go back to the queue",
                      running.flow_id, running.position + 1, running.task_name, len(done) + len(todo))
        try:
            if done:
                self.rt.engine.finish_many(done, pid, hold=False)
            if todo:
                self.rt.engine.release_many(todo, pid, requeue=True)
            self.handovers += 1
        except Exception:
            log.exception("worker %d: could not hand %d flow(s) back to the queue; running them here", pid,
                          len(done) + len(todo))
            with batch.cond:
                batch.done[:0] = done
                batch.todo.extendleft(reversed(todo))


_watchdogs: dict[int, Watchdog] = {}


def _watchdog(rt: WorkerRuntime) -> Watchdog:
    """This process's watchdog (started on first use: after the fork, in the worker)."""
    found = _watchdogs.get(os.getpid())
    if found is None:
        found = _watchdogs[os.getpid()] = Watchdog(rt)
    found.rt = rt
    return found
