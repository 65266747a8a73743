"""Schedules in the real daemon: ``flowd run`` as a subprocess, real mosquitto, real workers.

Routines are written to the daemon's SQLite file from this process (through
flowd.catalog) or with the real ``flowctl``; the daemon must notice without a restart.
"""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from flowd import catalog
from flowd.store.models import Flow, FlowState, Routine, write_transaction

UTC = dt.UTC


def slot_of(flow: Flow) -> dt.datetime:
    """The slot a scheduled flow was started for (its request id is schedule:<routine>:<slot>)."""
    return dt.datetime.strptime(flow.request_id.split(":", 2)[2], "%Y-%m-%dT%H:%M:%SZ")


def scheduled(routine: str, state: str | None = None) -> list[Flow]:
    query = Flow.select().where((Flow.routine == routine) & (Flow.trigger == "schedule"))
    if state:
        query = query.where(Flow.state == state)
    return list(query.order_by(Flow.id))


@pytest.fixture
def tasks(db: Any, task_dir: Path, tmp_path: Path) -> Path:
    """Tasks 'count' (appends a line to a counter file), 'slow' (the same after 2.5 s), 'noop'."""
    counter = tmp_path / "counter.txt"
    paths = [str(task_dir)]
    catalog.save_task("count", "t.Count", options={"counter": str(counter)}, task_paths=paths)
    catalog.save_task("slow", "t.Count", options={"counter": str(counter), "sleep": 2.5, "label": "slow"},
                      task_paths=paths)
    catalog.save_task("noop", "t.Nothing", task_paths=paths)
    return counter


def test_interval_runs_repeatedly_stops_when_disabled_and_new_routines_start(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, flowctl: Any, tasks: Path) -> None:
    # "tick" runs every 2 s; disabling it (catalog) stops it at once; "probe", added with
    # flowctl while the daemon runs, starts running — all without a restart.
    catalog.save_routine("tick", ["count"], schedule="@every 2s")
    path = config_file(broker=broker)
    proc = flowd_proc(path)
    wait_for(lambda: len(scheduled("tick", FlowState.DONE.value)) >= 3, timeout=30,
             message="three scheduled runs of tick")
    slots = [slot_of(f) for f in scheduled("tick")]
    assert len(slots) == len(set(slots))
    assert all((b - a).total_seconds() % 2 == 0 and b > a for a, b in itertools.pairwise(slots))

    catalog.set_routine_enabled("tick", False)
    stopped_at = len(scheduled("tick"))
    added = flowctl("routine", "add", "probe", "noop", "--schedule", "@every 1s", config=path)
    assert added.returncode == 0, added.stderr
    wait_for(lambda: len(scheduled("probe", FlowState.DONE.value)) >= 3, timeout=30,
             message="three scheduled runs of the routine added while running")
    assert len(scheduled("tick")) == stopped_at
    assert proc.proc.poll() is None
    assert Routine.get(Routine.name == "probe").last_scheduled_run is not None

    catalog.set_routine_enabled("tick", True)  # and back on, again without a restart
    wait_for(lambda: len(scheduled("tick")) > stopped_at, timeout=20, message="tick running again")


def test_single_mode_never_overlaps_and_refusals_end_cancelled(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, mqtt_client: Any, tasks: Path) -> None:
    # "slow-single" fires every second but its step lasts 2.5 s: the runs that find one
    # running are stored CANCELLED with the reason, published on flow/<id>/result.
    client = mqtt_client()
    client.subscribe("flow/+/result")
    catalog.save_routine("slow-single", ["slow"], schedule="@every 1s", mode="single")
    flowd_proc(config_file(broker=broker))
    wait_for(lambda: len(scheduled("slow-single", FlowState.DONE.value)) >= 2
             and len(scheduled("slow-single", FlowState.CANCELLED.value)) >= 2, timeout=40,
             message="two finished and two refused runs")
    catalog.set_routine_enabled("slow-single", False)

    done = scheduled("slow-single", FlowState.DONE.value)
    spans = sorted((f.started_at, f.finished_at) for f in done)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"runs overlap: {spans}"
    for flow in scheduled("slow-single", FlowState.CANCELLED.value):
        assert "runs in mode single" in flow.error and "is still running" in flow.error
    refused_ids = {f.id for f in scheduled("slow-single", FlowState.CANCELLED.value)}
    wait_for(lambda: refused_ids & {r["flow_id"] for r in client.json_on("flow/+/result")
                                    if isinstance(r, dict) and r.get("state") == "CANCELLED"},
             timeout=20, message="a refused run's result on MQTT")
    lines = wait_for(lambda: tasks.read_text().splitlines() if tasks.exists() else None, timeout=5)
    assert len([line for line in lines if line.startswith("slow:")]) >= len(done)


def test_run_missed_during_a_restart_runs_once_after_start(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, tasks: Path) -> None:
    # Every 10 s; the daemon is stopped after a run and kept down past two slots, then
    # started: the latest missed slot runs once at start (the earlier one never does),
    # then the schedule carries on at its cadence.
    catalog.save_routine("beat", ["noop"], schedule="@every 10s")
    path = config_file(broker=broker, scheduler={"misfire_grace": "60s"})
    proc = flowd_proc(path)
    wait_for(lambda: scheduled("beat", FlowState.DONE.value), timeout=30, message="a first scheduled run")
    assert proc.terminate() == 0
    last = Routine.get(Routine.name == "beat").last_scheduled_run
    ran_before = {slot_of(f) for f in scheduled("beat")}
    assert max(ran_before) == last
    wait_for(lambda: dt.datetime.now(UTC).replace(tzinfo=None) >= last + dt.timedelta(seconds=21), timeout=30,
             interval=0.2, message="two slots to pass while the daemon is down")

    started = dt.datetime.now(UTC).replace(tzinfo=None)
    flowd_proc(path)
    wait_for(lambda: len(scheduled("beat")) > len(ran_before), timeout=30, message="the catch-up run")
    catch_up = next(f for f in scheduled("beat") if slot_of(f) not in ran_before)
    slot = slot_of(catch_up)
    assert slot <= started, "the first run after start should be a missed slot, not a new one"
    assert slot == last + dt.timedelta(seconds=20)  # the latest missed slot; last+10s never runs
    wait_for(lambda: any(slot_of(f) > started for f in scheduled("beat")), timeout=30,
             message="the next regular run")
    after = sorted(slot_of(f) for f in scheduled("beat") if slot_of(f) not in ran_before)
    assert after[1] == slot + dt.timedelta(seconds=10)  # same cadence as before the restart
    assert len(after) == len(set(after))
    assert all(s - last != dt.timedelta(seconds=10) for s in after)


def test_missed_run_older_than_the_grace_is_skipped(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, tasks: Path) -> None:
    # misfire_grace 2 s: a slot missed 4+ s before start is not run; the next regular one is.
    catalog.save_routine("strict", ["noop"], schedule="@every 8s")
    path = config_file(broker=broker, scheduler={"misfire_grace": 2})
    proc = flowd_proc(path)
    wait_for(lambda: scheduled("strict", FlowState.DONE.value), timeout=30, message="a first scheduled run")
    assert proc.terminate() == 0
    last = Routine.get(Routine.name == "strict").last_scheduled_run
    missed = last + dt.timedelta(seconds=8)
    wait_for(lambda: dt.datetime.now(UTC).replace(tzinfo=None) >= missed + dt.timedelta(seconds=4), timeout=30,
             interval=0.2, message="the slot to fall out of the grace")
    flowd_proc(path)
    wait_for(lambda: len(scheduled("strict")) > 1, timeout=30, message="the next regular run")
    slots = [slot_of(f) for f in scheduled("strict")]
    assert missed not in slots
    assert slots[1] > missed and (slots[1] - last).total_seconds() % 8 == 0



def test_sighup_reloads_schedules_written_behind_the_daemons_back(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, tasks: Path) -> None:
    # A schedule written straight into the database (no definitions version bump) is
    # picked up on SIGHUP.
    catalog.save_routine("hup", ["noop"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: " ready: " in proc.log_text(), timeout=30, message="the daemon to be ready")
    with write_transaction():
        Routine.update(schedule="@every 1s").where(Routine.name == "hup").execute()
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(scheduled("hup")) >= 2, timeout=30, message="runs of the schedule after SIGHUP")
    assert proc.proc.poll() is None


def test_the_scheduler_starts_with_the_first_schedule(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, tasks: Path) -> None:
    # No routine has a schedule at the start: the daemon runs without the scheduler (and
    # without APScheduler's memory). The first schedule written while it runs starts it.
    catalog.save_routine("plain", ["count"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: "ready" in proc.log_text(), 30, message="flowd ready")
    time.sleep(2.5)  # more than one look at the definitions
    assert "starting the scheduler" not in proc.log_text()
    catalog.save_routine("later", ["count"], schedule="@every 1s")
    wait_for(lambda: scheduled("later", FlowState.DONE.value), timeout=15, message="a scheduled run of 'later'")
    assert proc.log_text().count("starting the scheduler") == 1
    assert proc.terminate() == 0
