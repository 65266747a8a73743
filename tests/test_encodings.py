"""The encodings of the per-step path, each against what it replaces: the clock, JSON
text in and out, the result payload written out with its output's text, the status
socket's records (issue 12: a worker's CPU per flow)."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest

from flowd import store
from flowd.engine.flowmessages import flow_result_payload, flow_result_text
from flowd.mqtt.status import MAX_MESSAGE, Status, decode_statuses, encode_statuses
from flowd.store.models import dumps, isoformat, loads, utcnow
from flowd.task import Task

ODD = {"a": [1, 2.5, -0.0, 10**30, None, True, False], "é\u2028": "\"\\\t\x00😀", "": {"k": []}}


def test_utcnow_is_naive_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kathmandu")  # +05:45: local time is not UTC
    time.tzset()
    try:
        for _ in range(200):
            before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            now = utcnow()
            after = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            assert now.tzinfo is None and before <= now <= after
    finally:
        monkeypatch.undo()
        time.tzset()


def test_isoformat_of_naive_and_aware_times() -> None:
    naive = dt.datetime(2026, 5, 1, 12, 0, 0, 250999)
    assert isoformat(naive) == "2026-05-01T12:00:00.250Z"
    assert isoformat(naive.replace(tzinfo=dt.UTC)) == "2026-05-01T12:00:00.250Z"
    assert isoformat(None) is None


def test_dumps_and_loads_are_the_json_modules_text_and_errors() -> None:
    for value in (ODD, "x", 1, None, [], {1: 2}, (1, [2]), 1.5e300):
        assert dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        assert loads(dumps(value)) == json.loads(dumps(value))
    for bad in (float("nan"), {"a": object()}, b"x", {(1, 2): 3}):
        with pytest.raises((TypeError, ValueError)):
            dumps(bad)
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(RecursionError):  # as a value nested too deep
        dumps(looped)
    for text in (' {"a": 1} ', "[1, 2]\n", "\ufeff[]", "[1] x", "", "{", "nul"):
        try:
            expected: Any = json.loads(text)
        except ValueError as exc:
            with pytest.raises(type(exc)):
                loads(text)
        else:
            assert loads(text) == expected


def test_a_result_payload_with_its_outputs_text_is_the_text_dumps_gives() -> None:
    base = {"id": 7, "uid": "0f8e", "routine": "rü \"q\"", "request_id": None, "state": "DONE", "result": ODD,
            "error": None, "trigger": "mqtt", "started_at": dt.datetime(2026, 5, 1, 12, 0, 0, 1500),
            "finished_at": dt.datetime(2026, 5, 1, 12, 0, 1)}
    for changes in ({}, {"request_id": "r-é\n"}, {"started_at": None}, {"error": "e\x01"}, {"result": None}):
        flow = store.Row({**base, **changes})
        expected = dumps(flow_result_payload(flow))
        assert flow_result_text(flow, dumps(flow.result)) == expected
        assert flow_result_text(flow) == expected


def test_status_records_are_one_encode_each_with_the_same_bytes_and_split() -> None:
    statuses = [Status(n, "RUNNING", f"flow/{n}/status", json.dumps({"n": n, "t": "ü\u2028" * 300}))
                for n in range(1, 60)]
    messages = encode_statuses(statuses)
    fields = [part for s in statuses for part in (str(s.flow_id), s.state, s.topic, s.payload)]
    assert b"\x00".join(messages) == "\x00".join(fields).encode("utf-8")  # the format as it was
    assert len(messages) > 1 and all(len(m) <= MAX_MESSAGE for m in messages)
    assert [s for m in messages for s in decode_statuses(m)] == statuses


def test_a_task_made_outside_flowd_still_has_a_plain_logger() -> None:
    class Probe(Task):
        pass

    one, two = Probe(), Probe()
    assert one.log.logger.name == "flowd.task" and one.log.extra == {} and one.results == []
    assert one.results is not two.results
