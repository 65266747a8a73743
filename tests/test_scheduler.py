"""Scheduler: slots, DST, missed runs and reloads, with an injected clock.

Nothing here waits for wall-clock time except the last tests, which run the real
APScheduler thread in this process on ``@every 1s`` and wait on conditions with a deadline.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import wait_for

from flowd import catalog
from flowd.schedule import cron
from flowd.schedule.scheduler import UTC, Scheduler, SlotTrigger, to_db
from flowd.store.models import Flow, FlowState, Routine, write_transaction

BERLIN = ZoneInfo("Europe/Berlin")


def slot_trigger(expr: str, zone: str = "Europe/Berlin", last: dt.datetime | None = None,
                 jitter: float | None = None, seed: str = "node/r") -> SlotTrigger:
    tz = ZoneInfo(zone)
    anchor = None
    schedule = cron.parse_schedule(expr)
    if isinstance(schedule, cron.IntervalSchedule):
        anchor = (last or dt.datetime(2026, 1, 1, tzinfo=UTC)) + dt.timedelta(seconds=schedule.seconds)
    return SlotTrigger(cron.build_trigger(expr, tz, start_date=anchor), tz, fixed_time=schedule.is_fixed_time,
                       last_slot=last, jitter=jitter, seed=seed)


def simulate(trigger: SlotTrigger, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Drive the trigger as APScheduler 3 does, on an explicit clock. Returns the slots run.

    At a firing APScheduler asks for the next fire time while collecting due run times,
    hands the job to a worker thread (which may take its slot at once), then asks again.
    """
    ran: list[dt.datetime] = []
    fire = trigger.get_next_fire_time(None, start)
    while fire is not None and fire <= end:
        first_answer = trigger.get_next_fire_time(fire, fire)
        slot = trigger.take_due_slot(fire)
        if slot is not None:
            trigger.mark_run(slot)
            ran.append(slot)
        following = trigger.get_next_fire_time(fire, fire)
        assert following == first_answer
        fire = following
    return ran


def local(slots: list[dt.datetime], tz: dt.tzinfo = BERLIN) -> list[str]:
    return [s.astimezone(tz).strftime("%m-%d %H:%M %Z") for s in slots]


# ---------------------------------------------------------------------- DST
def test_daily_0230_runs_once_on_the_autumn_day() -> None:
    # 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 happens twice. APScheduler alone fires twice.
    raw = cron.build_trigger("30 2 * * *", "Europe/Berlin")
    first = raw.get_next_fire_time(None, dt.datetime(2026, 10, 25, 0, 0, tzinfo=BERLIN))
    second = raw.get_next_fire_time(first, first)
    assert first.date() == second.date() == dt.date(2026, 10, 25)  # the trap, measured

    ran = simulate(slot_trigger("30 2 * * *"), dt.datetime(2026, 10, 23, 12, tzinfo=UTC),
                   dt.datetime(2026, 10, 28, 12, tzinfo=UTC))
    assert local(ran) == ["10-24 02:30 CEST", "10-25 02:30 CEST", "10-26 02:30 CET", "10-27 02:30 CET",
                          "10-28 02:30 CET"]


def test_daily_0230_is_not_dropped_on_the_spring_day() -> None:
    # 2026-03-29 02:00 CET -> 03:00 CEST: 02:30 does not exist; the run moves to 03:30.
    ran = simulate(slot_trigger("30 2 * * *"), dt.datetime(2026, 3, 27, 12, tzinfo=UTC),
                   dt.datetime(2026, 3, 31, 12, tzinfo=UTC))
    assert local(ran) == ["03-28 02:30 CET", "03-29 03:30 CEST", "03-30 02:30 CEST", "03-31 02:30 CEST"]


def test_fixed_time_schedule_runs_once_per_local_day_all_year() -> None:
    ran = simulate(slot_trigger("30 2 * * *"), dt.datetime(2026, 1, 1, tzinfo=UTC),
                   dt.datetime(2027, 1, 1, tzinfo=UTC))
    days = Counter(s.astimezone(BERLIN).date() for s in ran)
    assert len(days) == 365 and set(days.values()) == {1}


def test_spring_gap_does_not_run_two_times_that_collide() -> None:
    # 02:30 moves to 03:30 on the spring day; 03:30 itself is the same instant: one run.
    ran = simulate(slot_trigger("30 2,3 * * *"), dt.datetime(2026, 3, 28, 12, tzinfo=UTC),
                   dt.datetime(2026, 3, 29, 22, tzinfo=UTC))
    assert local(ran) == ["03-29 03:30 CEST"]


def test_wildcard_hour_schedule_follows_real_time_over_dst() -> None:
    # As in Vixie cron, "*/30 * * * *" is not a fixed time: the repeated hour runs again.
    ran = simulate(slot_trigger("*/30 * * * *"), dt.datetime(2026, 10, 24, 23, 50, tzinfo=UTC),
                   dt.datetime(2026, 10, 25, 2, 10, tzinfo=UTC))
    assert local(ran) == ["10-25 02:00 CEST", "10-25 02:30 CEST", "10-25 02:00 CET", "10-25 02:30 CET",
                          "10-25 03:00 CET"]
    assert ran == sorted(set(ran))


def test_restart_in_the_repeated_hour_does_not_run_again() -> None:
    # Ran at 02:30 CEST, daemon restarted at 02:10 CET: 02:30 CET must not run.
    last = dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    trigger = slot_trigger("30 2 * * *", last=last)
    fire = trigger.get_next_fire_time(None, dt.datetime(2026, 10, 25, 1, 10, tzinfo=UTC))
    assert local([fire]) == ["10-26 02:30 CET"]


def test_schedule_uses_the_routine_zone_not_the_machine_zone() -> None:
    trigger = slot_trigger("0 8 * * *", zone="Asia/Tokyo")
    fire = trigger.get_next_fire_time(None, dt.datetime(2026, 6, 1, tzinfo=UTC))
    assert fire.astimezone(UTC) == dt.datetime(2026, 6, 1, 23, 0, tzinfo=UTC)


# ---------------------------------------------------------------------- jitter
def test_jitter_delays_within_bounds_keeps_the_slot_and_differs_by_node() -> None:
    start, end = dt.datetime(2026, 5, 1, tzinfo=UTC), dt.datetime(2026, 5, 1, 1, tzinfo=UTC)
    offsets = {}
    for node in ("node-a", "node-b"):
        trigger = slot_trigger("* * * * *", jitter=20, seed=f"{node}/r")
        fire = trigger.get_next_fire_time(None, start)
        fires = []
        while fire <= end:
            slot = trigger.take_due_slot(fire)
            assert slot is not None and slot.second == 0 and 0 <= (fire - slot).total_seconds() <= 20
            trigger.mark_run(slot)
            fires.append(fire)
            fire = trigger.get_next_fire_time(fire, fire)
        assert len(fires) == 60  # one per slot: no drift, none lost
        offsets[node] = [round(f.timestamp() % 60, 3) for f in fires]
    assert offsets["node-a"] != offsets["node-b"]
    assert len(set(offsets["node-a"])) > 1


def test_interval_with_jitter_does_not_drift() -> None:
    last = dt.datetime(2026, 5, 1, tzinfo=UTC)
    ran = simulate(slot_trigger("@every 10s", last=last, jitter=5), last, last + dt.timedelta(seconds=100))
    assert [(s - last).total_seconds() for s in ran] == [10 * i for i in range(1, 10)]


def test_late_missed_run_with_jitter_does_not_lose_the_next_slot() -> None:
    # Caught up at 10:01:50 + 25 s jitter = 10:02:15: the 10:02 slot must still run.
    trigger = slot_trigger("* * * * *", zone="UTC", last=dt.datetime(2026, 5, 1, 10, 0, tzinfo=UTC), jitter=30)
    missed = dt.datetime(2026, 5, 1, 10, 1, tzinfo=UTC)
    fire = trigger.fire_time(missed, not_before=dt.datetime(2026, 5, 1, 10, 1, 50, tzinfo=UTC))
    ran = []
    for _ in range(3):
        nxt = trigger.get_next_fire_time(fire, fire)
        slot = trigger.take_due_slot(fire)
        assert slot is not None
        trigger.mark_run(slot)
        ran.append(slot.strftime("%H:%M"))
        assert trigger.get_next_fire_time(fire, fire) == nxt
        fire = nxt
    assert ran == ["10:01", "10:02", "10:03"]


# ---------------------------------------------------------------------- with the database
@pytest.fixture
def routines(db: Any, task_dir: Any) -> Any:
    """A task 'noop' and a helper to save routines through the catalog."""
    catalog.save_task("noop", "t.Nothing", task_paths=[str(task_dir)])

    def save(name: str, schedule: str | None, **kwargs: Any) -> Routine:
        routine, _ = catalog.save_routine(name, ["noop"], schedule=schedule, **kwargs)
        return routine

    return save


def set_times(name: str, *, last: dt.datetime | None, created: dt.datetime) -> Routine:
    with write_transaction():
        Routine.update(last_scheduled_run=to_db(last) if last else None, created_at=to_db(created),
                       updated_at=to_db(created)).where(Routine.name == name).execute()
    return Routine.get(Routine.name == name)


def test_missed_slot_within_grace_runs_once_not_per_slot(db: Any, routines: Any) -> None:
    # Down from 10:00:30 to 10:03:20 with "* * * * *": 10:01, 10:02, 10:03 were missed;
    # only 10:03 is within the 60 s grace, and it runs once.
    routines("every-minute", "* * * * *", timezone="UTC")
    row = set_times("every-minute", last=dt.datetime(2026, 5, 1, 10, 0, tzinfo=UTC),
                    created=dt.datetime(2026, 4, 1, tzinfo=UTC))
    now = dt.datetime(2026, 5, 1, 10, 3, 20, tzinfo=UTC)
    scheduler = Scheduler(db.config, db, now=lambda: now)
    plan = scheduler.plan(row)
    assert plan.missed_slot == dt.datetime(2026, 5, 1, 10, 3, tzinfo=UTC)
    assert plan.first_fire == now
    assert plan.trigger.take_due_slot(now) == plan.missed_slot
    assert plan.trigger.take_due_slot(now) is None  # taken: a second firing runs nothing


def test_missed_slot_with_jitter_fires_after_start_plus_its_jitter(db: Any, routines: Any) -> None:
    # Devices that boot together after a power cut must not all catch up at once.
    routines("spread", "* * * * *", timezone="UTC", jitter=30)
    row = set_times("spread", last=dt.datetime(2026, 5, 1, 10, 0, tzinfo=UTC),
                    created=dt.datetime(2026, 4, 1, tzinfo=UTC))
    now = dt.datetime(2026, 5, 1, 10, 1, 50, tzinfo=UTC)
    delays = set()
    for node in range(5):
        config = dataclasses.replace(db.config, flowd=dataclasses.replace(db.config.flowd, node_id=f"n{node}"))
        plan = Scheduler(config, db, now=lambda: now).plan(row)
        assert plan.missed_slot == dt.datetime(2026, 5, 1, 10, 1, tzinfo=UTC)
        delay = (plan.first_fire - now).total_seconds()
        assert 0 <= delay <= 30
        assert plan.trigger.take_due_slot(plan.first_fire) == plan.missed_slot
        delays.add(round(delay, 3))
    assert len(delays) == 5


def test_missed_slot_outside_grace_is_skipped(db: Any, routines: Any) -> None:
    routines("hourly", "0 * * * *", timezone="UTC")
    row = set_times("hourly", last=dt.datetime(2026, 5, 1, 9, 0, tzinfo=UTC),
                    created=dt.datetime(2026, 4, 1, tzinfo=UTC))
    now = dt.datetime(2026, 5, 1, 10, 1, 30, tzinfo=UTC)  # 10:00 is 90 s ago, grace is 60 s
    plan = Scheduler(db.config, db, now=lambda: now).plan(row)
    assert plan.missed_slot is None
    assert plan.first_fire == dt.datetime(2026, 5, 1, 11, 0, tzinfo=UTC)


def test_routine_created_after_the_slot_does_not_catch_up(db: Any, routines: Any) -> None:
    routines("fresh", "* * * * *", timezone="UTC")
    row = set_times("fresh", last=None, created=dt.datetime(2026, 5, 1, 10, 0, 10, tzinfo=UTC))
    later = Scheduler(db.config, db, now=lambda: dt.datetime(2026, 5, 1, 10, 0, 40, tzinfo=UTC)).plan(row)
    assert later.missed_slot is None
    down = Scheduler(db.config, db, now=lambda: dt.datetime(2026, 5, 1, 10, 1, 30, tzinfo=UTC)).plan(row)
    assert down.missed_slot == dt.datetime(2026, 5, 1, 10, 1, tzinfo=UTC)


def test_interval_keeps_its_cadence_over_a_restart(db: Any, routines: Any) -> None:
    routines("tick", "@every 30s")
    last = dt.datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC)
    row = set_times("tick", last=last, created=dt.datetime(2026, 4, 1, tzinfo=UTC))
    now = last + dt.timedelta(seconds=75)
    plan = Scheduler(db.config, db, now=lambda: now).plan(row)
    assert plan.missed_slot == last + dt.timedelta(seconds=60)
    assert plan.trigger.take_due_slot(now) == plan.missed_slot
    nxt = plan.trigger.get_next_fire_time(plan.first_fire, now)
    assert nxt == last + dt.timedelta(seconds=90)


def test_run_slot_starts_one_flow_per_slot_and_records_it(db: Any, routines: Any) -> None:
    routines("report", "0 6 * * *", timezone="Europe/Berlin")
    scheduler = Scheduler(db.config, db)
    slot = dt.datetime(2026, 5, 1, 4, 0, tzinfo=UTC)
    first = scheduler.run_slot("report", slot)
    again = scheduler.run_slot("report", slot)  # e.g. a crash between submit and record
    assert first is not None and first == again
    flow = Flow.get_by_id(first)
    assert flow.trigger == "schedule" and flow.request_id == "schedule:report:2026-05-01T04:00:00Z"
    assert Flow.select().where(Flow.routine == "report").count() == 1
    assert Routine.get(Routine.name == "report").last_scheduled_run == dt.datetime(2026, 5, 1, 4, 0)
    scheduler.run_slot("report", slot - dt.timedelta(days=1))  # an older slot never moves it back
    assert Routine.get(Routine.name == "report").last_scheduled_run == dt.datetime(2026, 5, 1, 4, 0)


def test_single_mode_refusal_is_a_cancelled_flow_with_the_reason(db: Any, routines: Any) -> None:
    routines("single", "* * * * *", mode="single")
    scheduler = Scheduler(db.config, db)
    slot = dt.datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    first = Flow.get_by_id(scheduler.run_slot("single", slot))
    second = Flow.get_by_id(scheduler.run_slot("single", slot + dt.timedelta(minutes=1)))
    assert first.state == FlowState.INIT.value  # nothing consumes the queue here: still active
    assert second.state == FlowState.CANCELLED.value
    assert "mode single" in second.error and str(first.id) in second.error


def test_reload_follows_the_catalog(db: Any, routines: Any) -> None:
    scheduler = Scheduler(db.config, db)
    routines("a", "*/5 * * * *")
    routines("b", None)
    routines("c", "@every 10s", enabled=False)
    scheduler.reload()
    assert set(scheduler.jobs()) == {"a"}
    assert scheduler.check_for_changes() is False
    job_a = scheduler.jobs()["a"]

    catalog.set_routine_enabled("c", True)
    routines("b", "@hourly")
    assert scheduler.check_for_changes() is True
    assert set(scheduler.jobs()) == {"a", "b", "c"}
    assert scheduler.jobs()["a"] is job_a  # unchanged routines keep their job

    routines("a", "*/10 * * * *")
    catalog.set_routine_enabled("b", False)
    catalog.remove_routine("c")
    assert scheduler.check_for_changes() is True
    assert set(scheduler.jobs()) == {"a"} and scheduler.jobs()["a"] is not job_a


def test_a_bad_schedule_in_the_database_is_logged_and_skipped(db: Any, routines: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    routines("good", "@every 5s")
    routines("bad", "@every 5s")
    with write_transaction():
        Routine.update(schedule="99 * * * *").where(Routine.name == "bad").execute()
    scheduler = Scheduler(db.config, db)
    scheduler.reload()
    assert set(scheduler.jobs()) == {"good"}
    assert "routine bad is not scheduled: schedule '99 * * * *': minute 99 is out of range 0-59" in caplog.text


# ---------------------------------------------------------------------- the real APScheduler thread
def scheduled_flows(name: str) -> list[Flow]:
    return list(Flow.select().where((Flow.routine == name) & (Flow.trigger == "schedule")).order_by(Flow.id))


def test_running_scheduler_starts_flows_and_stops_when_disabled(db: Any, routines: Any) -> None:
    routines("tick", "@every 1s")
    scheduler = Scheduler(db.config, db)
    scheduler.start()
    try:
        wait_for(lambda: len(scheduled_flows("tick")) >= 2, timeout=10, message="two scheduled flows")
        ids = [f.request_id for f in scheduled_flows("tick")]
        assert len(ids) == len(set(ids))
        catalog.set_routine_enabled("tick", False)
        assert scheduler.check_for_changes() is True
        assert scheduler.jobs() == {}
        count = len(scheduled_flows("tick"))
        routines("tock", "@every 1s")
        scheduler.check_for_changes()
        wait_for(lambda: len(scheduled_flows("tock")) >= 2, timeout=10, message="flows of the new routine")
        assert len(scheduled_flows("tick")) <= count + 1  # at most one firing already under way
    finally:
        scheduler.shutdown()
    assert Routine.get(Routine.name == "tock").last_scheduled_run is not None
