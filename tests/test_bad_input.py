"""Hostile and broken submits (SPEC 4.3): each one gives exactly one ``flow/error``, one
log line, nothing stored, nothing run; the daemon keeps serving and a good flow runs after.

Plus the payload checks on their own (``parse_submit``), where a mistake is cheap to see.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from flowd import catalog
from flowd.errors import InputError
from flowd.mqtt.payloads import MAX_JSON_DEPTH, SubmitRefused, is_nested_deeper, parse_json_payload, parse_submit
from flowd.store.models import Flow, Outbox, TaskResult

MAX_PAYLOAD = 64 * 1024


class Exploit:
    """Pickles to "run a shell command": flowd must never unpickle a payload."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def hostile_payloads(tmp_path: Path) -> list[tuple[bytes, str]]:
    """(payload, a fragment the error must contain)."""
    deep = b"[" * 10_000 + b"]" * 10_000
    return [
        (b"", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b'{"routine": "ok"', "not valid JSON"),
        (b"[1, 2]", "not an array"),
        (b'"just a string"', "not a string"),
        (b"42", "not a number"),
        (b"null", "not null"),
        (b"true", "not a boolean"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b'{"routine": "ok\xc3\x28"}', "not UTF-8"),
        ('{"routine": "ok"}'.encode("utf-16"), "not UTF-8"),
        (b'\xef\xbb\xbf{"routine": "ok"}', "not valid JSON"),
        (b'{"routine": "ok", "kwargs": {"pad": "' + b"a" * (MAX_PAYLOAD + 10) + b'"}}', "the limit is 65536"),
        (deep, f"more than {MAX_JSON_DEPTH} levels"),
        (b'{"routine": "ok", "kwargs": {"a": ' + b"{\"b\": " * 200 + b"1" + b"}" * 200 + b"}}",
         f"more than {MAX_JSON_DEPTH} levels"),
        (b'{"routine": "ok", "args": [NaN]}', "NaN is not a JSON number"),
        (b'{"routine": "ok", "args": [1e999]}', "too large"),
        (b'{"routine": "ok", "args": [' + b"9" * 5000 + b"]}", "not valid JSON"),
        (pickle.dumps(Exploit(tmp_path / "pwned")), "not"),
        (b"{}", "has no 'routine'"),
        (b'{"routine": 5}', "'routine' must be a non-empty string, not a number"),
        (b'{"routine": ""}', "'routine' must be a non-empty string"),
        (b'{"routine": ["ok"]}', "not an array"),
        (b'{"routine": "ok", "args": "a b"}', "'args' must be an array, not a string"),
        (b'{"routine": "ok", "kwargs": [1]}', "'kwargs' must be an object, not an array"),
        (b'{"routine": "ok", "request_id": 17}', "'request_id' must be a non-empty string"),
        (b'{"routine": "ok", "request_id": ""}', "'request_id' must be a non-empty string"),
        (json.dumps({"routine": "ok", "request_id": "x" * 300}).encode(), "at most 256"),
        (b'{"routine": "ok", "reply_to": "app/+/x"}', "'reply_to' must be a topic"),
        (b'{"routine": "ok", "reply_to": "app/#"}', "'reply_to' must be a topic"),
        (b'{"routine": "ok", "reply_to": "$SYS/x"}', "'reply_to' must be a topic"),
        (b'{"routine": "ok", "reply_to": 7}', "'reply_to' must be a topic"),
        (b'{"routine": "ok", "kwarg": {"x": 1}}', "unknown field 'kwarg'"),
        (b'{"routine": "\\ud800"}', "lone surrogate"),
        (b'{"routine": "ok", "kwargs": {"city": "Oslo\\udc00"}}', "lone surrogate (a \\ud800-\\udfff escape not part "
                                                               "of a pair) at 'kwargs.city'"),
        (b'{"routine": "ok", "kwargs": {"\\udfff": 1}}', "lone surrogate"),
        (b'{"routine": "ok", "args": [1, ["\\ud83d"]]}', "at 'args[1][0]'"),
        (b'{"routine": "ok", "reply_to": "app/\\ud800"}', "lone surrogate"),
        (b'{"routine": "nope", "routine": "ok"}', "the key 'routine' is given twice"),
        (b'{"routine": "ok", "kwargs": {"a": 1, "a": 2}}', "the key 'a' is given twice"),
        (b'{"routine": "ok\\u0000"}', "'routine' must not contain control characters, got 'ok\\x00'"),
        (b'{"routine": "ok\\n2026-12-01 10:00:00,000 ERROR   flowd: forged"}', "must not contain control characters"),
        (b'{"routine": "ok\\u007f"}', "must not contain control characters"),
        (b'{"routine": "ok", "request_id": "r\\u0000"}', "without control characters, not 'r\\x00'"),
        (b'{"routine": "ok", "request_id": "r\\n1"}', "'request_id' must be"),
        (b'{"routine": "ok", "reply_to": "app/x\\r"}', "'reply_to' must be a topic"),
        (b'{"routine": "ok", "reply_to": "app/\\u001b[31m"}', "'reply_to' must be a topic"),
        (b'{"routine": "ok", "\\nforged": 1}', "unknown field '\\nforged'"),
        (b'{"routine": "no-such-routine"}', "routine 'no-such-routine' does not exist"),
        (b'{"routine": "off"}', "routine 'off' is disabled"),
        (b'{"routine": "local"}', "may not be started over MQTT"),
    ]


@pytest.fixture
def routines(db: Any, task_dir: Path) -> None:
    paths = [str(task_dir)]
    catalog.save_task("double", "mqtt_steps.Double", task_paths=paths)
    catalog.save_routine("ok", ["double"])
    catalog.save_routine("off", ["double"], enabled=False)
    catalog.save_routine("local", ["double"], mqtt=False)


def test_every_hostile_submit_gets_one_error_and_the_daemon_keeps_serving(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None,
        tmp_path: Path) -> None:
    # A misbehaving device sends ~36 broken submits; each gets exactly one flow/error
    # naming the problem and the topic, the log gets one line each, no flow is stored,
    # the pickle's command never runs; then a good submit runs as usual.
    watcher = session_client(["flow/#", "flowd/#"])
    proc = flowd_proc(config_file(broker=broker))
    wait_for(lambda: watcher.json_on("flowd/testnode/status"), timeout=20, message="flowd online")
    cases = hostile_payloads(tmp_path)
    assert len(cases) >= 25
    for payload, _ in cases:
        watcher.publish("flow/submit", payload)
    errors = wait_for(lambda: (lambda e: e if len(e) >= len(cases) else None)(watcher.json_on("flow/error")),
                      timeout=30, message=f"{len(cases)} errors; log:\n{proc.log_text()[-3000:]}")
    watcher.publish("flow/submit", {"routine": "ok", "kwargs": {"value": 21}, "request_id": "good"})
    result = wait_for(lambda: watcher.json_on("flow/+/result"), timeout=20, message="the good flow's result")

    assert len(watcher.json_on("flow/error")) == len(cases)
    for (payload, fragment), error in zip(cases, errors, strict=True):
        assert set(error) <= {"error", "request_id", "topic"}
        assert error["topic"] == "flow/submit"
        assert fragment in error["error"], (payload[:60], error)
        assert "\n" not in error["error"] and "Traceback" not in error["error"]
    assert result[0]["state"] == "DONE" and result[0]["result"]["kwargs"] == {"value": 42}
    assert Flow.select().count() == 1
    assert TaskResult.select().count() == 1
    assert not (tmp_path / "pwned").exists()
    log = proc.log_text()
    assert log.count("refused:") == len(cases)
    assert "Traceback" not in log
    assert proc.proc.poll() is None
    wait_for(lambda: Outbox.select().count() == 0, message="outbox drained")


def test_refusal_names_the_request_and_answers_on_reply_to(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, routines: None) -> None:
    watcher = session_client(["flow/#", "flowd/#", "app/#"])
    flowd_proc(config_file(broker=broker))
    wait_for(lambda: watcher.json_on("flowd/testnode/status"), timeout=20, message="flowd online")
    watcher.publish("flowd/testnode/submit", {"routine": "ok", "args": {"a": 1}, "request_id": "r-9",
                                              "reply_to": "app/errors"})
    expected = {"error": "'args' must be an array, not an object", "request_id": "r-9",
                "topic": "flowd/testnode/submit"}
    assert wait_for(lambda: watcher.json_on("flow/error"), timeout=10) == [expected]
    assert wait_for(lambda: watcher.json_on("app/errors"), timeout=10) == [expected]
    assert Flow.select().count() == 0


# ---------------------------------------------------------------------- the checks alone
def test_parse_submit_accepts_the_spec_example() -> None:
    request = parse_submit(json.dumps({"routine": "fetch-weather", "args": [], "kwargs": {"city": "Oslo"},
                                       "request_id": "r-17", "reply_to": "app/replies/r-17"}).encode(), MAX_PAYLOAD)
    assert (request.routine, request.args, request.kwargs, request.request_id, request.reply_to) == (
        "fetch-weather", [], {"city": "Oslo"}, "r-17", "app/replies/r-17")
    minimal = parse_submit(b'{"routine": "x", "args": null}', MAX_PAYLOAD)
    assert (minimal.args, minimal.kwargs, minimal.request_id, minimal.reply_to) == ([], {}, None, None)


@pytest.mark.parametrize(("payload", "fragment"), hostile_payloads(Path("/nonexistent"))[:-3])
def test_parse_submit_refuses(payload: bytes, fragment: str) -> None:
    with pytest.raises(SubmitRefused) as refused:
        parse_submit(payload, MAX_PAYLOAD)
    assert fragment in str(refused.value)


def test_refusal_keeps_readable_request_id_and_reply_to() -> None:
    with pytest.raises(SubmitRefused) as refused:
        parse_submit(b'{"routine": 1, "request_id": "r-1", "reply_to": "a/b"}', MAX_PAYLOAD)
    assert (refused.value.request_id, refused.value.reply_to) == ("r-1", "a/b")
    with pytest.raises(SubmitRefused) as refused:
        parse_submit(b'{"routine": 1, "request_id": 5, "reply_to": "a/#"}', MAX_PAYLOAD)
    assert (refused.value.request_id, refused.value.reply_to) == (None, None)


def test_depth_check_ignores_brackets_inside_strings() -> None:
    text = json.dumps({"routine": "x", "kwargs": {"s": "[" * 500 + '\\"{' * 100}})
    assert not is_nested_deeper(text, MAX_JSON_DEPTH)
    assert parse_submit(text.encode(), MAX_PAYLOAD).kwargs["s"].startswith("[[[")
    nested = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    assert is_nested_deeper(nested, MAX_JSON_DEPTH)
    assert not is_nested_deeper("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, MAX_JSON_DEPTH)


def test_a_million_deep_payload_is_refused_without_recursion() -> None:
    with pytest.raises(InputError, match="levels deep"):
        parse_json_payload(b"{\"a\":" * 1_000_000, 10_000_000)


@pytest.mark.parametrize("text", ['\ufeff{"routine": "r"}', '{"a": 1}', "[1, 2.5]", "", "{", '{"a": 1} x', '"\\u00e9"'])
def test_the_shared_json_decoder_reads_and_refuses_as_json_loads(text: str) -> None:
    # One decoder serves every payload: what json.loads accepts or refuses (a BOM too), it does.
    try:
        expected: Any = ("value", json.loads(text))
    except json.JSONDecodeError as exc:
        expected = ("refused", f"the payload is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})")
    try:
        got: Any = ("value", parse_json_payload(text.encode(), 1000))
    except InputError as exc:
        got = ("refused", str(exc))
    assert got == expected


@pytest.mark.parametrize("value", [[], {}, [[]], {"a": {}}, "", 0, None, False, (), "[]", [1, "é"]])
def test_dumps_writes_what_json_dumps_writes(value: Any) -> None:
    # Empty lists and objects skip the encoder; everything reads back the same.
    from flowd.store.models import dumps

    assert dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def test_dumps_refuses_what_json_refuses() -> None:
    from flowd.store.models import dumps

    for value in (float("nan"), {1j}, object()):
        with pytest.raises((ValueError, TypeError)):
            dumps(value)
