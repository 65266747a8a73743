"""apply_file: TOML definitions applied all or nothing, idempotent, pruned only on request."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from flowd.apply import ApplyError, apply_file
from flowd.errors import InputError
from flowd.store.models import Routine, Task, definitions_version

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[tasks.add]
script = "t.Add"
options = { n = 2 }
retries = 3
retry_delay = 5
timeout = 30

[tasks.echo]
script = "example.Echo"

[routines.sum]
tasks = ["add", "echo", "add"]
schedule = "*/10 * * * *"
timezone = "Europe/Oslo"
mode = "single"
mqtt = true
"""


def write(tmp_path: Path, text: str, name: str = "defs.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def paths(db: Any) -> tuple[str, ...]:
    return db.config.flowd.task_paths


def snapshot() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    tasks = [(t.id, t.name, t.script, t.options, t.retries, t.retry_delay, t.timeout)
             for t in Task.select().order_by(Task.name)]
    routines = [(r.id, r.name, r.task_names(), r.schedule, r.timezone, r.mode, r.mqtt, r.enabled)
                for r in Routine.select().order_by(Routine.name)]
    return tasks, routines, definitions_version()


def test_apply_creates_then_second_apply_changes_nothing(db: Any, tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    first = apply_file(path, paths(db))
    assert first.tasks.created == ["add", "echo"]
    assert first.routines.created == ["sum"]
    assert first.changed
    add = Task.get(Task.name == "add")
    assert (add.script, add.options, add.retries, add.retry_delay, add.timeout) == ("t.Add", {"n": 2}, 3, 5.0, 30.0)
    routine = Routine.get(Routine.name == "sum")
    assert routine.task_names() == ["add", "echo", "add"]
    assert (routine.schedule, routine.timezone, routine.mode, routine.mqtt) == ("*/10 * * * *", "Europe/Oslo",
                                                                               "single", True)
    before = snapshot()

    second = apply_file(path, paths(db))
    assert not second.changed
    assert second.tasks.unchanged == ["add", "echo"] and second.routines.unchanged == ["sum"]
    assert snapshot() == before  # not even the definitions version moved
    assert "nothing changed" in second.summary()


def test_changed_file_updates_in_place(db: Any, tmp_path: Path) -> None:
    apply_file(write(tmp_path, BASE), paths(db))
    ids = {t.name: t.id for t in Task.select()}
    routine_id = Routine.get(Routine.name == "sum").id
    changed = BASE.replace("options = { n = 2 }", "options = { n = 7 }").replace("timeout = 30\n", "").replace(
        'tasks = ["add", "echo", "add"]', 'tasks = ["echo", "add"]')
    report = apply_file(write(tmp_path, changed), paths(db))
    assert report.tasks.updated == ["add"] and report.tasks.unchanged == ["echo"]
    assert report.routines.updated == ["sum"]
    add = Task.get(Task.name == "add")
    assert add.id == ids["add"]
    assert add.options == {"n": 7}
    assert add.timeout is None  # taken out of the file: no timeout any more
    routine = Routine.get(Routine.name == "sum")
    assert routine.id == routine_id and routine.task_names() == ["echo", "add"]


def test_definitions_missing_from_file_stay_unless_pruned(db: Any, tmp_path: Path) -> None:
    apply_file(write(tmp_path, BASE), paths(db))
    extra = BASE + textwrap.dedent("""
        [tasks.lonely]
        script = "t.Nothing"

        [routines.other]
        tasks = ["lonely"]
        """)
    apply_file(write(tmp_path, extra), paths(db))
    report = apply_file(write(tmp_path, BASE), paths(db))
    assert not report.changed
    assert Task.get_or_none(Task.name == "lonely") is not None
    assert Routine.get_or_none(Routine.name == "other") is not None

    pruned = apply_file(write(tmp_path, BASE), paths(db), prune=True)
    assert pruned.routines.removed == ["other"]
    assert pruned.tasks.removed == ["lonely"]
    assert Task.get_or_none(Task.name == "lonely") is None
    assert Routine.get_or_none(Routine.name == "other") is None
    assert {t.name for t in Task.select()} == {"add", "echo"}


def test_routine_may_use_a_task_defined_earlier(db: Any, tmp_path: Path) -> None:
    apply_file(write(tmp_path, BASE), paths(db))
    report = apply_file(write(tmp_path, '[routines.again]\ntasks = ["add"]\n', "more.toml"), paths(db))
    assert report.routines.created == ["again"]
    # With --prune the file must be complete: a task only in the database is refused.
    with pytest.raises(ApplyError, match=r"\[routines.again\] tasks: task 'add' does not exist; with --prune"):
        apply_file(tmp_path / "more.toml", paths(db), prune=True)
    assert Routine.get_or_none(Routine.name == "sum") is not None


def test_enabled_left_out_keeps_the_state_flowctl_gave(db: Any, tmp_path: Path) -> None:
    from flowd import catalog

    path = write(tmp_path, BASE)
    apply_file(path, paths(db))
    catalog.set_routine_enabled("sum", False)
    assert not apply_file(path, paths(db)).changed
    assert Routine.get(Routine.name == "sum").enabled is False
    report = apply_file(write(tmp_path, BASE + "enabled = true\n"), paths(db))
    assert report.routines.updated == ["sum"]
    assert Routine.get(Routine.name == "sum").enabled is True


def test_routine_status_is_applied_and_taken_out_means_steps(db: Any, tmp_path: Path) -> None:
    apply_file(write(tmp_path, BASE), paths(db))
    assert Routine.get(Routine.name == "sum").status == "steps"
    report = apply_file(write(tmp_path, BASE + 'status = "off"\n'), paths(db))
    assert report.routines.updated == ["sum"] and Routine.get(Routine.name == "sum").status == "off"
    assert not apply_file(write(tmp_path, BASE + 'status = "off"\n'), paths(db)).changed
    assert apply_file(write(tmp_path, BASE), paths(db)).routines.updated == ["sum"]
    assert Routine.get(Routine.name == "sum").status == "steps"


@pytest.mark.parametrize("mistake, expected", [
    ('[tasks.x]\nscript = "t.Add"\ncolour = "red"\n', r"\[tasks.x\] colour: unknown key; allowed keys are script"),
    ('[tasks.x]\nscript = "nosuch.Thing"\n', r"\[tasks.x\] script: no file task_nosuch.py"),
    ('[tasks.x]\nscript = "t.NoClass"\n', r"\[tasks.x\] script: .*has no Task class NoClass"),
    ('[tasks.x]\nscript = "not a reference"\n', r"\[tasks.x\] script: 'not a reference' is not a task script"),
    ('[tasks.x]\noptions = {}\n', r"\[tasks.x\] script: missing"),
    ('[tasks.x]\nscript = "t.Add"\nretries = "three"\n', r"\[tasks.x\] retries: must be a whole number"),
    ('[tasks.x]\nscript = "t.Add"\nretries = -1\n', r"\[tasks.x\] retries: must be a whole number of at least 0"),
    ('[tasks.x]\nscript = "t.Add"\ntimeout = "soon"\n', r"\[tasks.x\] timeout: timeout must be a number"),
    ('[tasks.x]\nscript = "t.Add"\ntimeout = 0\n', r"\[tasks.x\] timeout: must be more than 0 seconds"),
    ('[tasks.x]\nscript = "t.Add"\noptions = "url"\n', r"\[tasks.x\] options: must be a table"),
    ('[tasks.x]\nscript = "t.Add"\noptions = { at = 1979-05-27 }\n', r"\[tasks.x\] options: every value"),
    ('[tasks."bad name"]\nscript = "t.Add"\n', r"\[tasks.bad name\]: task name 'bad name' is not valid"),
    ('[routines.r]\ntasks = ["ghost"]\n', r"\[routines.r\] tasks: task 'ghost' does not exist"),
    ('[routines.r]\ntasks = []\n', r"\[routines.r\] tasks: \[\] is not valid"),
    ('[routines.r]\nschedule = "@daily"\n', r"\[routines.r\] tasks: missing"),
    ('[routines.r]\ntasks = ["add"]\nschedule = "61 * * * *"\n', r"\[routines.r\] schedule: .*61"),
    ('[routines.r]\ntasks = ["add"]\nschedule = "* * *"\n', r"\[routines.r\] schedule: .*5 fields"),
    ('[routines.r]\ntasks = ["add"]\ntimezone = "Mars/Olympus"\n', r"\[routines.r\] timezone: .*Mars/Olympus"),
    ('[routines.r]\ntasks = ["add"]\nmode = "sometimes"\n', r"\[routines.r\] mode: 'sometimes' is not one of"),
    ('[routines.r]\ntasks = ["add"]\nmax = 0\n', r"\[routines.r\] max: must be a whole number of at least 1"),
    ('[routines.r]\ntasks = ["add"]\nmqtt = "yes"\n', r"\[routines.r\] mqtt: must be true or false"),
    ('[routines.r]\ntasks = ["add"]\nenabled = 1\n', r"\[routines.r\] enabled: must be true or false"),
    ('[routines.r]\ntasks = ["add"]\nevery = 5\n', r"\[routines.r\] every: unknown key"),
    ('[routines.r]\ntasks = ["add"]\nstatus = "some"\n', r"\[routines.r\] status: 'some' is not one of steps, "
     r"states, off"),
    ('[routines.r]\ntasks = ["add"]\nstatus = false\n', r"\[routines.r\] status: False is not one of"),
    ('[jobs.r]\ntasks = ["add"]\n', r"\[jobs\]: unknown table"),
])
def test_any_mistake_applies_nothing_and_names_file_table_and_key(db: Any, tmp_path: Path, mistake: str,
                                                                 expected: str) -> None:
    # The valid tables of the same file must not be written either.
    path = write(tmp_path, BASE + "\n" + mistake)
    before = snapshot()
    with pytest.raises(ApplyError, match=expected) as info:
        apply_file(path, paths(db))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert snapshot() == before
    assert Task.select().count() == 0


def test_tasks_must_be_tables(db: Any, tmp_path: Path) -> None:
    with pytest.raises(ApplyError, match=r"tasks: must be tables like \[tasks.NAME\]"):
        apply_file(write(tmp_path, 'tasks = 3\n'), paths(db))


def test_every_problem_is_listed_in_one_line(db: Any, tmp_path: Path) -> None:
    path = write(tmp_path, '[tasks.a]\nscript = "nosuch.X"\n[routines.r]\ntasks = ["ghost"]\nmode = "x"\n')
    with pytest.raises(ApplyError) as info:
        apply_file(path, paths(db))
    assert len(info.value.problems) == 3
    assert "3 problems, nothing applied" in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (None, "the file does not exist"),
    ("[tasks.x\nscript=1", "not valid TOML"),
    (b"\xff\xfe[tasks]", "not UTF-8"),
])
def test_unreadable_file_is_an_input_error(db: Any, tmp_path: Path, content: Any, expected: str) -> None:
    path = tmp_path / "x.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=expected) as info:
        apply_file(path, paths(db))
    assert str(path) in str(info.value)


def test_shipped_example_applies_cleanly_and_idempotently(db: Any, tmp_path: Path) -> None:
    # config/routines.toml uses only the example scripts of tasks/ (copied by task_dir).
    example = tmp_path / "routines.toml"
    shutil.copy(ROOT / "config" / "routines.toml", example)
    report = apply_file(example, paths(db))
    assert set(report.routines.created) == {"read-sensor", "slow-demo", "heartbeat"}
    assert Routine.get(Routine.name == "heartbeat").enabled is False
    assert Routine.get(Routine.name == "slow-demo").task_names() == ["pause", "pass-on", "pause"]
    assert Routine.get(Routine.name == "slow-demo").status == "states"
    assert not apply_file(example, paths(db)).changed
