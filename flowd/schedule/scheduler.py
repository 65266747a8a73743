"""Schedules (SPEC 5): APScheduler jobs rebuilt from the Routine rows.

The database is the truth; APScheduler only keeps in-memory jobs, rebuilt at start,
on SIGHUP and whenever ``definitions_version`` changes (flowctl, apply, the API).

What a schedule guarantees:

- One flow per slot, even across crashes: a scheduled flow carries the request id
  ``schedule:<routine>:<slot>``, so starting the same slot twice finds the first flow.
- Runs missed while the daemon was down: at start the latest missed slot (never one per
  missed slot) runs once if it is at most ``misfire_grace`` old. The baseline is
  ``Routine.last_scheduled_run`` (the slot time, naive UTC), or when the routine was
  created or last changed if that is later.
- Daylight saving time, as Vixie cron: a schedule with a fixed wall-clock time (neither
  minute nor hour starts with ``*``) runs once per wall-clock time. In the repeated
  autumn hour it does not run again; a time that does not exist in spring runs once,
  moved forward by the gap (02:30 -> 03:30 in Europe/Berlin). So ``30 2 * * *`` runs
  exactly once on every local calendar day. Schedules with ``*`` in the minute or hour
  field, and ``@every``, follow real time.
- ``jitter`` delays each run by a fixed pseudo-random amount in ``[0, jitter]`` s drawn
  from the node id, the routine and the slot: devices spread out, a slot keeps its time
  (and intervals do not drift, as APScheduler's own jitter makes them do).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from flowd import catalog
from flowd.config import Config
from flowd.engine.engine import Engine
from flowd.engine.lease import is_shared_database
from flowd.errors import DuplicateRequest, InputError
from flowd.schedule import cron
from flowd.store.models import Routine, definitions_version

log = logging.getLogger(__name__)

UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_TICK = dt.timedelta(microseconds=1)
_MAX_SKIPS = 10_000


def to_utc(value: dt.datetime) -> dt.datetime:
    """Aware UTC; a naive value is taken as UTC (the database's convention)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def to_db(value: dt.datetime) -> dt.datetime:
    """Naive UTC, as stored in the database."""
    return to_utc(value).replace(tzinfo=None)


class SlotTrigger(BaseTrigger):  # type: ignore[misc]
    """Wraps a cron or interval trigger: slots, the wall-clock rule, and jitter.

    A *slot* is the time the schedule names; the *fire time* is the slot plus its jitter.
    APScheduler sees fire times; :meth:`take_due_slot` maps a firing back to its slot.

    >>> t = SlotTrigger(cron.build_trigger("30 2 * * *", "Europe/Berlin"), ZoneInfo("Europe/Berlin"),
    ...                 fixed_time=True, last_slot=None, jitter=None, seed="node/routine")
    >>> t.slot_after(datetime(2026, 10, 25, 0, 0, tzinfo=UTC))   # 02:30 CEST, not 02:30 CET too
    """

    def __init__(self, inner: Any, tz: dt.tzinfo, *, fixed_time: bool, last_slot: dt.datetime | None,
                 jitter: float | None, seed: str):
        self.inner = inner
        self.timezone = tz
        self.fixed_time = fixed_time
        self.last_slot = to_utc(last_slot) if last_slot else None
        self.jitter = jitter or 0.0
        self.seed = seed
        self._fires: dict[dt.datetime, dt.datetime] = {}
        self._taken: dt.datetime | None = None
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"{self.inner}{f' jitter {self.jitter:g}s' if self.jitter else ''}"

    # ------------------------------------------------------------------ slots
    def _wall(self, value: dt.datetime) -> dt.datetime:
        # Normalised local wall time: a non-existent 02:30+01:00 becomes 03:30 (CEST).
        return value.astimezone(UTC).astimezone(self.timezone).replace(tzinfo=None)

    def is_allowed(self, slot: dt.datetime, after: dt.datetime | None) -> bool:
        """May ``slot`` run when ``after`` was the previous slot? (later instant, and
        for fixed-time schedules a later wall-clock time)."""
        if after is None:
            return True
        if slot <= after:
            return False
        return not self.fixed_time or self._wall(slot) > self._wall(after)

    def _first_at_or_after(self, moment: dt.datetime) -> dt.datetime | None:
        found = self.inner.get_next_fire_time(None, moment.astimezone(self.timezone))
        return to_utc(found) if found is not None else None

    def slot_after(self, moment: dt.datetime, previous: dt.datetime | None = None) -> dt.datetime | None:
        """The first slot strictly after ``moment`` that may follow ``previous`` (by
        default the last slot that ran)."""
        reference = previous if previous is not None else self.last_slot
        candidate = self._first_at_or_after(to_utc(moment) + _TICK)
        for _ in range(_MAX_SKIPS):
            if candidate is None or self.is_allowed(candidate, reference):
                return candidate
            candidate = self._first_at_or_after(candidate + _TICK)
        return None

    def latest_slot(self, start: dt.datetime, end: dt.datetime) -> dt.datetime | None:
        """The latest allowed slot in ``(start, end]``, or None."""
        start, end = to_utc(start), to_utc(end)
        if isinstance(self.inner, IntervalTrigger):
            # Arithmetic, not a walk: a long grace with a short interval has many slots.
            anchor = to_utc(self.inner.start_date)
            step = self.inner.interval_length
            if end < anchor:
                return None
            slot = anchor + dt.timedelta(seconds=step * int((end - anchor).total_seconds() // step))
            return slot if slot > start and self.is_allowed(slot, self.last_slot) else None
        latest: dt.datetime | None = None
        candidate = self.slot_after(start)
        while candidate is not None and candidate <= end:
            latest = candidate
            candidate = self.slot_after(candidate, previous=candidate)
        return latest

    # ------------------------------------------------------------------ jitter and firing
    def fire_time(self, slot: dt.datetime, not_before: dt.datetime | None = None) -> dt.datetime:
        """The slot plus its jitter, remembered so the firing maps back to the slot.

        A slot already past ``not_before`` (a missed run) fires at ``not_before`` plus
        the same jitter: devices that boot together after a power cut still spread out.
        """
        offset = dt.timedelta(seconds=random.Random(f"{self.seed}|{slot.timestamp()}").uniform(0, self.jitter)
                              if self.jitter else 0.0)
        fire = slot + offset
        if not_before is not None and fire < not_before:
            fire = to_utc(not_before) + offset
        # UTC keys: two zone-local times that differ only in fold compare equal (PEP 495).
        fire = to_utc(fire)
        with self._lock:
            self._fires[fire] = slot
            while len(self._fires) > 16:
                del self._fires[min(self._fires)]
        return fire

    def get_next_fire_time(self, previous_fire_time: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
        """APScheduler's question: when to fire next, after ``previous_fire_time``."""
        if previous_fire_time is None:
            slot = self._first_at_or_after(now)
            if slot is not None and not self.is_allowed(slot, self.last_slot):
                slot = self.slot_after(slot)
        else:
            with self._lock:
                previous = self._fires.get(to_utc(previous_fire_time), to_utc(previous_fire_time))
            reference = max(previous, self.last_slot) if self.last_slot else previous
            slot = self.slot_after(previous, reference)
        return self.fire_time(slot) if slot is not None else None

    def take_due_slot(self, now: dt.datetime) -> dt.datetime | None:
        """The slot of the firing happening now (the latest one due), or None when it ran already."""
        with self._lock:
            # Entries stay: APScheduler may still look up this firing to compute the next one.
            floor = max((s for s in (self.last_slot, self._taken) if s is not None), default=None)
            now = to_utc(now)
            due = [(fire, slot) for fire, slot in self._fires.items()
                   if fire <= now and (floor is None or slot > floor)]
            if not due:
                return None
            # The firing under way is the latest fire time reached (jitter may have put a
            # later slot's fire time before it; that one fires next, on its own).
            slot = max(due)[1]
            self._taken = slot
        return slot if self.is_allowed(slot, self.last_slot) else None

    def mark_run(self, slot: dt.datetime) -> None:
        if self.last_slot is None or slot > self.last_slot:
            self.last_slot = slot


@dataclass
class JobPlan:
    """How one routine is scheduled: its trigger, its first fire time, a missed slot to run."""

    routine: str
    signature: tuple[Any, ...]
    trigger: SlotTrigger
    first_fire: dt.datetime | None
    missed_slot: dt.datetime | None


class Scheduler:
    """Runs scheduled routines; rebuilt from the database.

    >>> scheduler = Scheduler(config, engine)
    >>> scheduler.start()
    >>> scheduler.check_for_changes()   # every second or two from the service loop
    >>> scheduler.shutdown()
    """

    def __init__(self, config: Config, engine: Engine, now: Callable[[], dt.datetime] | None = None):
        self.config = config
        self.engine = engine
        self._now = now or (lambda: dt.datetime.now(UTC))
        self._aps: BackgroundScheduler | None = None
        self._jobs: dict[str, JobPlan] = {}
        self._seen_version: int | None = None
        self._lock = threading.Lock()
        self.shared = is_shared_database(config)

    def now(self) -> dt.datetime:
        return to_utc(self._now())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start APScheduler's thread and build every job (running missed slots once)."""
        self._aps = BackgroundScheduler(timezone=UTC, job_defaults={
            "misfire_grace_time": max(1, round(self.config.scheduler.misfire_grace)),
            "coalesce": True,
            "max_instances": 1,
        })
        self._aps.start()
        self.reload()

    def shutdown(self) -> None:
        """Stop firing; waits for a scheduled submit under way (it is quick)."""
        if self._aps is not None:
            self._aps.shutdown(wait=True)
            self._aps = None
        self._jobs.clear()

    def check_for_changes(self) -> bool:
        """Reload when tasks or routines changed since the last look; True if it did."""
        if definitions_version() == self._seen_version:
            return False
        self.reload()
        return True

    def jobs(self) -> dict[str, JobPlan]:
        """The routines scheduled now, by name (a copy)."""
        with self._lock:
            return dict(self._jobs)

    # ------------------------------------------------------------------ building jobs
    def _timezone_name(self, routine: Routine) -> str | None:
        return routine.timezone or self.config.scheduler.timezone or None

    def plan(self, routine: Routine, now: dt.datetime | None = None) -> JobPlan:
        """The job for one routine at ``now``; raises InputError for a bad schedule."""
        now = to_utc(now or self.now())
        zone_name = self._timezone_name(routine)
        tz = cron.resolve_timezone(zone_name)
        expr = str(routine.schedule or "")
        schedule = cron.parse_schedule(expr)
        last = to_utc(routine.last_scheduled_run) if routine.last_scheduled_run else None
        anchor = None
        if isinstance(schedule, cron.IntervalSchedule):
            # Keep the cadence over restarts: slots continue from the last run.
            start = last or now.replace(microsecond=0)
            if last is None and self.shared:
                # Nodes started at different times must agree on the slots (each runs once,
                # SPEC 10): whole multiples of the interval since the epoch.
                start = _EPOCH + dt.timedelta(seconds=(now - _EPOCH).total_seconds() // schedule.seconds
                                              * schedule.seconds)
            anchor = start + dt.timedelta(seconds=schedule.seconds)
        inner = cron.build_trigger(expr, tz, start_date=anchor)
        trigger = SlotTrigger(inner, tz, fixed_time=schedule.is_fixed_time, last_slot=last,
                              jitter=routine.jitter, seed=f"{self.config.flowd.node_id}/{routine.name}")
        # Slots before the routine existed in this form were never due.
        known = [to_utc(v) for v in (routine.last_scheduled_run, routine.created_at, routine.updated_at) if v]
        baseline = max(known) if known else now
        grace = dt.timedelta(seconds=self.config.scheduler.misfire_grace)
        missed = trigger.latest_slot(max(baseline, now - grace), now)
        if missed is not None:
            first: dt.datetime | None = trigger.fire_time(missed, not_before=now)
        else:
            first = trigger.get_next_fire_time(None, now)
        signature = (routine.schedule, zone_name, routine.jitter)
        return JobPlan(routine.name, signature, trigger, first, missed)

    def reload(self) -> None:
        """Rebuild the jobs from the enabled routines that have a schedule.

        Unchanged routines keep their job (and its next fire time); a routine whose
        schedule cannot be used is logged and skipped, never fatal.
        """
        version = definitions_version()
        rows = catalog.scheduled_routines()
        now = self.now()
        with self._lock:
            wanted = {row.name: row for row in rows}
            for name in [n for n in self._jobs if n not in wanted]:
                self._remove_job(name)
                log.info("schedule: routine %s is no longer scheduled", name)
            for name, row in wanted.items():
                signature = (row.schedule, self._timezone_name(row), row.jitter)
                current = self._jobs.get(name)
                if current is not None and current.signature == signature:
                    continue
                try:
                    plan = self.plan(row, now)
                except InputError as exc:
                    log.error("schedule: routine %s is not scheduled: %s", name, exc)
                    self._remove_job(name)
                    continue
                self._add_job(plan)
            self._seen_version = version

    def _add_job(self, plan: JobPlan) -> None:
        self._remove_job(plan.routine)
        if plan.first_fire is None:
            log.warning("schedule: routine %s (%s) never fires again", plan.routine, plan.signature[0])
            return
        self._jobs[plan.routine] = plan
        if self._aps is not None:
            self._aps.add_job(self._run_job, trigger=plan.trigger, args=[plan.routine, plan.trigger],
                              id=_job_id(plan.routine), name=plan.routine, next_run_time=plan.first_fire,
                              replace_existing=True)
        if plan.missed_slot is not None:
            log.info("schedule: routine %s missed its run of %s; running it once now", plan.routine,
                     plan.missed_slot.isoformat())
        log.info("schedule: routine %s runs '%s' (%s), next at %s", plan.routine, plan.signature[0],
                 plan.trigger.timezone, plan.first_fire.isoformat())

    def _remove_job(self, name: str) -> None:
        if self._jobs.pop(name, None) is not None and self._aps is not None:
            from apscheduler.jobstores.base import JobLookupError

            try:
                self._aps.remove_job(_job_id(name))
            except JobLookupError:
                pass  # a date-less job already finished

    # ------------------------------------------------------------------ running
    def _run_job(self, routine: str, trigger: SlotTrigger) -> None:
        """APScheduler's callback (its worker thread): one slot is due."""
        try:
            slot = trigger.take_due_slot(self.now())
            if slot is not None:
                self.run_slot(routine, slot, trigger)
        except Exception:  # a loop boundary: the next slot must still fire
            log.exception("schedule: routine %s: the scheduled run failed to start", routine)

    def run_slot(self, routine: str, slot: dt.datetime, trigger: SlotTrigger | None = None) -> int | None:
        """Start the flow of one slot (once, whatever happens) and record it; the flow id or None.

        The routine's concurrency mode applies inside ``engine.submit``: a refused run
        is stored CANCELLED with the reason.
        """
        slot = to_utc(slot)
        stamp = slot.strftime("%Y-%m-%dT%H:%M:%SZ")
        flow_id = None
        try:
            submitted: tuple[Any, bool] = self.engine.submit(  # a Row: attributes as columns
                routine, trigger="schedule", request_id=f"schedule:{routine}:{stamp}")
            flow, created = submitted
            flow_id = int(flow.id)
            if created:
                log.debug("schedule: routine %s slot %s started flow %d (%s)", routine, stamp, flow.id, flow.state,
                         extra={"FLOW_ID": flow.id, "ROUTINE": routine})
            else:
                log.info("schedule: routine %s slot %s had started flow %d already", routine, stamp, flow.id,
                         extra={"FLOW_ID": flow.id, "ROUTINE": routine})
        except InputError as exc:
            log.warning("schedule: routine %s slot %s not started: %s", routine, stamp, exc,
                        extra={"ROUTINE": routine})
        except DuplicateRequest:
            # Several nodes: another one stored this slot's flow in the same instant (the
            # request_id is unique), so the slot has run once.
            log.info("schedule: routine %s slot %s was started by another node", routine, stamp,
                     extra={"ROUTINE": routine})
        catalog.mark_scheduled_run(routine, to_db(slot))
        if trigger is not None:
            trigger.mark_run(slot)
        return flow_id


def _job_id(routine: str) -> str:
    return f"routine:{routine}"
