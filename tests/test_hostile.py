"""Hostile text where it enters (SPEC 4.3): lone surrogates stopped at the outbox, a step's
output and ``self.publish``; log lines and journal fields escaped; task references
matched whole; task scripts behind a symbolic link out of the task folders refused;
credentials never logged or shown."""

from __future__ import annotations

import logging
import os
import signal
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import create_pg_database, drop_pg_database, wait_for

from flowd import api, catalog, loader
from flowd.config import redact_url
from flowd.errors import InputError, StepError
from flowd.jsontext import check_json
from flowd.mqtt import outbox
from flowd.mqtt.payloads import parse_submit
from flowd.service.logs import escape, setup_logging
from flowd.store.models import Flow, Outbox, TaskResult, write_transaction

FORGED = "\n2026-12-01 10:00:00,000 ERROR   flowd.engine.engine: FORGED"


# ---------------------------------------------------------------------- surrogates
def test_a_surrogate_pair_is_text_and_is_accepted() -> None:
    request = parse_submit(b'{"routine": "x", "kwargs": {"face": "\\ud83d\\ude00"}}', 1024)
    assert request.kwargs == {"face": "\U0001f600"}


def test_check_json_names_where_a_lone_surrogate_is() -> None:
    with pytest.raises(StepError, match=r"lone surrogate .* at 'kwargs.note\[1\]'"):
        check_json({"args": [], "kwargs": {"note": ["ok", "bad\ud800"]}}, "step 1/1 (t)")
    with pytest.raises(StepError, match="lone surrogate"):
        check_json({"kwargs": {"\udcff": 1}}, "step 1/1 (t)")
    check_json({"kwargs": {"face": "\U0001f600"}}, "step 1/1 (t)")


def test_the_outbox_refuses_a_surrogate_and_keeps_the_transaction(db: Any) -> None:
    with write_transaction():
        outbox.add_message("a/b", {"ok": "\U0001f600"})
        with pytest.raises(InputError, match="lone surrogate"):
            outbox.add_message("a/b", {"text": "x\ud800"})
        with pytest.raises(InputError, match="lone surrogate"):
            outbox.add_message("a/\udc00", "text")
    assert [row.payload for row in Outbox.select()] == ['{"ok":"\U0001f600"}']


HOSTILE_TASKS = '''
from flowd.task import Task


class Output(Task):
    def perform(self, *args, **kwargs):
        return {"text": "bad\\ud800"}


class PublishPayload(Task):
    def perform(self, *args, **kwargs):
        self.publish("app/out", {"text": "bad\\udc00"})


class PublishText(Task):
    def perform(self, *args, **kwargs):
        self.publish("app/out", "bad\\udc00")


class PublishTopic(Task):
    def perform(self, *args, **kwargs):
        self.publish("app/\\ud800", "fine")


class Raise(Task):
    def perform(self, *args, **kwargs):
        raise ValueError("bad\\udc80 value")
'''


def test_a_step_cannot_store_or_publish_a_lone_surrogate(db: Any, worker_pool: Any, task_dir: Path) -> None:
    # Each task hands flowd a lone surrogate (as output, as a published payload or
    # topic); each step fails with a sentence naming it, the flow ends FAILED and
    # nothing reaches the outbox but the flow's own result.
    (task_dir / "task_hostile.py").write_text(HOSTILE_TASKS)
    expected = {"Output": "step 1/1 (output) failed: perform() returned a string with a lone surrogate",
                "PublishPayload": "payload published to 'app/out' returned a string with a lone surrogate",
                "PublishText": "payload published to 'app/out' returned a string with a lone surrogate",
                "PublishTopic": "cannot publish to 'app/\\ud800'",
                "Raise": "ValueError: bad\\udc80 value"}
    flows = {}
    for name in expected:
        catalog.save_task(name.lower(), f"hostile.{name}", task_paths=[str(task_dir)])
        catalog.save_routine(f"r-{name.lower()}", [name.lower()])
        flows[name] = api.submit_flow(f"r-{name.lower()}").id
    for name, fragment in expected.items():
        flow = wait_for(lambda i=flows[name]: (f := api.get_flow(i)).is_ended and f, timeout=30,
                        message=f"flow of {name} to end")
        assert flow.state == "FAILED", (name, flow.error)
        assert fragment in flow.error, (name, flow.error)
        assert "UnicodeEncodeError" not in flow.error
    assert not [row for row in Outbox.select() if row.topic.startswith("app/")]
    assert TaskResult.select().where(TaskResult.output.is_null(False)).count() == 0


def test_flowctl_submit_refuses_an_argument_that_is_not_utf8(flowctl: Any, db: Any, task_dir: Path) -> None:
    catalog.save_task("double", "mqtt_steps.Double", task_paths=[str(task_dir)])
    catalog.save_routine("ok", ["double"])
    result = flowctl("submit", "ok", "--kw", "city=Oslo\udcff")  # the byte 0xff on the command line
    assert result.returncode == 2, result.stderr
    assert "lone surrogate" in result.stderr and "Traceback" not in result.stderr
    assert Flow.select().count() == 0


# ---------------------------------------------------------------------- log lines
def test_escape_puts_any_text_on_one_line() -> None:
    assert escape("a\nb\r\x00\x1b[31m\x7f\x85\u2028\ud800é€") == "a\\x0ab\\x0d\\x00\\x1b[31m\\x7f\\x85\\u2028\\ud800é€"


def test_log_lines_escape_the_message_the_fields_and_exception_messages(
        capsys: pytest.CaptureFixture[str], restore_root_logger: None) -> None:
    from flowd.config import build_config

    setup_logging(build_config({}, env={}), env={})
    log = logging.getLogger("flowd.test")
    log.warning("refused: %s", f"routine 'x{FORGED}'\x00", extra={"ROUTINE": f"r{FORGED}", "TASK": "t\r"})
    try:
        try:
            raise KeyError(f"inner{FORGED}")
        except KeyError as exc:
            raise ValueError(f"outer{FORGED}\x00") from exc
    except ValueError:
        log.exception("step failed")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines[0].split("refused:")) == 2 and "x\\x0a2026-12-01 10:00:00,000 ERROR" in lines[0]
    assert "[routine=r\\x0a2026-12-01" in lines[0] and "task=t\\x0d]" in lines[0] and "\\x00" in lines[0]
    assert "\x00" not in err and "\r" not in err
    assert not [line for line in lines if "FORGED" in line and line.startswith("2026-12-01 10:00:00")]
    assert "ValueError: outer\\x0a2026-12-01 10:00:00,000 ERROR   flowd.engine.engine: FORGED\\x00" in lines
    # repr of KeyError
    assert "KeyError: 'inner\\n2026-12-01 10:00:00,000 ERROR   flowd.engine.engine: FORGED'" in lines
    assert "The above exception was the direct cause of the following exception:" in lines
    assert sum(line.startswith("Traceback (most recent call last):") for line in lines) == 2


def test_journal_fields_and_message_are_escaped(restore_root_logger: None) -> None:
    pytest.importorskip("systemd.journal")
    from flowd.service.logs import _journal_handler

    handler = _journal_handler()
    assert handler is not None
    record = logging.LogRecord("flowd.test", logging.WARNING, __file__, 1, "refused: %s", (f"x{FORGED}",), None)
    record.ROUTINE = f"r{FORGED}"
    record.TASK = "t\x00"
    assert handler.filter(record)
    assert "\n" not in handler.format(record)
    assert record.ROUTINE == "r\\x0a2026-12-01 10:00:00,000 ERROR   flowd.engine.engine: FORGED"
    assert record.TASK == "t\\x00"


# ---------------------------------------------------------------------- task references and scripts
@pytest.mark.parametrize("reference", ["example.VeryLong\n", "example.VeryLong\r", "\nexample.VeryLong",
                                       "example.VeryLong ", "example.VeryLong\x00"])
def test_a_reference_is_matched_whole(reference: str, db: Any, task_dir: Path) -> None:
    with pytest.raises(InputError, match="is not a task script reference"):
        catalog.save_task("t", reference, task_paths=[str(task_dir)])
    catalog.save_task("t", "example.VeryLong", task_paths=[str(task_dir)])


def test_a_name_is_matched_whole(db: Any, task_dir: Path) -> None:
    with pytest.raises(InputError, match="is not valid"):
        catalog.save_task("fetch\n", "example.VeryLong", task_paths=[str(task_dir)])
    with pytest.raises(InputError, match="is not valid"):
        catalog.save_routine("r\n", ["t"])


def test_a_script_behind_a_symlink_out_of_the_task_folders_is_refused(
        db: Any, worker_pool: Any, task_dir: Path, tmp_path: Path, flowctl: Any) -> None:
    # task_evil.py links to a file outside every task folder: it is not listed, not
    # accepted as a task, and a task stored before the link was swapped in fails its
    # step instead of running the file. A link that stays inside the folders works.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    marker = tmp_path / "ran"
    (outside / "evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        from flowd.task import Task

        class Run(Task):
            def perform(self, *args, **kwargs):
                pathlib.Path({str(marker)!r}).write_text("ran")
        """))
    (task_dir / "task_inside.py").symlink_to(task_dir / "task_example.py")
    paths = [str(task_dir)]
    catalog.save_task("inside", "inside.VeryLong", task_paths=paths)  # a link within the folder is fine

    (task_dir / "task_evil.py").write_text((outside / "evil.py").read_text())
    catalog.save_task("evil", "evil.Run", task_paths=paths)
    catalog.save_routine("evil-r", ["evil"])
    (task_dir / "task_evil.py").unlink()
    (task_dir / "task_evil.py").symlink_to(outside / "evil.py")

    with pytest.raises(InputError, match=r"is a symbolic link to .*elsewhere/evil\.py, outside the task folders"):
        catalog.save_task("evil2", "evil.Run", task_paths=paths)
    errors: list[str] = []
    assert "evil.Run" not in [s.reference for s in loader.list_scripts(paths, errors)]
    [refusal] = [error for error in errors if "task_evil.py" in error]
    assert "outside the task folders" in refusal and "\n" not in refusal
    listed = flowctl("--json", "scripts")
    assert '"outside the task folders' in listed.stdout or "outside the task folders" in listed.stdout

    flow = api.submit_flow("evil-r")
    ended = wait_for(lambda: (f := api.get_flow(flow.id)).is_ended and f, timeout=30, message="the flow to end")
    assert ended.state == "FAILED" and "outside the task folders" in ended.error
    assert not marker.exists()


# ---------------------------------------------------------------------- credentials
def test_redact_url_masks_passwords_and_secret_parameters() -> None:
    assert redact_url("postgresql://u:p@ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://u@h/db?password=s&sslmode=require&sslpassword=t") == \
        "postgresql://u@h/db?password=***&sslmode=require&sslpassword=***"
    assert redact_url("redis://:s@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("sqlite:////var/lib/flowd/flowd.db") == "sqlite:////var/lib/flowd/flowd.db"


def _pg_database() -> Iterator[str]:
    name = create_pg_database("flowd_test")
    try:
        yield name
    finally:
        drop_pg_database(name)


@pytest.fixture
def pg_database() -> Iterator[str]:
    yield from _pg_database()


def test_no_credential_in_the_log_at_start_at_reload_or_in_status(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, flowctl: Any, pg_database: str,
        tmp_path: Path) -> None:
    # The daemon starts on PostgreSQL with a password in the URL (the server trusts
    # loopback, so any password works), is told by SIGHUP that the URL changed, and
    # flowctl status shows the database: the password appears nowhere.
    url = f"postgresql://postgres:Secret-1@127.0.0.1:5432/{pg_database}?application_name=flowd&password=Secret-2"
    path = config_file(broker=broker, database={"url": url})
    proc = flowd_proc(path)
    wait_for(lambda: "ready" in proc.log_text(), timeout=30, message=f"flowd ready; log:\n{proc.log_text()}")
    text = path.read_text().replace("Secret-1", "Secret-3")
    path.write_text(text)
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: "take(s) effect at the next restart" in proc.log_text(), timeout=20, message="the reload")
    status = flowctl("--json", "status", config=path)
    human = flowctl("status", config=path)
    log = proc.log_text()
    assert f"postgresql://postgres:***@127.0.0.1:5432/{pg_database}?application_name=flowd&password=***" in log
    assert "database.url changed from" in log
    for secret in ("Secret-1", "Secret-2", "Secret-3"):
        assert secret not in log
        assert secret not in status.stdout + status.stderr + human.stdout + human.stderr
    assert status.returncode == 0, status.stderr
    assert "password=***" in status.stdout
