"""Seeded fuzzing of ``flow/submit`` through the real broker and the real daemon (SPEC 4.3).

The generator builds payloads that must all be refused: broken bytes and JSON, wrong
shapes and types, keys given twice, lone surrogates, control characters and forged log
lines in every field, unknown routines. Each gets exactly one answer on ``flow/error``
in order, nothing is stored, every log line is a real record (nothing forged, no raw
control character) and the daemon is the same process at the end.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import wait_for

from flowd import catalog
from flowd.store.models import Flow, Outbox, TaskResult

SEED = 20261201
COUNT = 3000
FORGED_LINE = "\n2026-12-01 10:00:00,000 ERROR   flowd.engine.engine: FORGED"
# A real record starts with flowd's stderr prefix: time, level, logger.
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: ")
RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def hostile_text(rng: random.Random) -> str:
    """A string a log line must not show raw: control characters, forged lines, odd Unicode."""
    pieces = [FORGED_LINE, "\r" + FORGED_LINE.lstrip("\n"), "\x00", "\x1b[2J", "\x7f", "\u2028FORGED", "\t",
              "é€\U0001f600", "\\n", "%s%d", "'\"", "$", "/", "+", "#", " "]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) + f"-{rng.randint(0, 10**6)}"


def generate(rng: random.Random) -> tuple[bytes, str | None]:
    """One payload that flowd must refuse, and the request_id its refusal must carry (if any)."""
    kind = rng.randrange(12)
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))), None
    if kind == 1:  # a good submit cut short
        text = json.dumps({"routine": "ok", "kwargs": {"v": 1}})
        return text[:rng.randint(0, len(text) - 1)].encode(), None
    if kind == 2:  # JSON that is not an object
        return json.dumps(rng.choice([[], [1, "x"], "ok", 7, 1.5, None, True])).encode(), None
    request_id = f"fz-{rng.randint(0, 10**9)}"
    body: dict[str, Any] = {"routine": "ok", "request_id": request_id}
    if kind == 3:  # control characters (and forged lines) in the routine name
        body["routine"] = "ok" + hostile_text(rng).replace("é€\U0001f600", "\n")
        if not re.search(r"[\x00-\x1f\x7f]", body["routine"]):
            body["routine"] += "\n"
        return json.dumps(body).encode(), request_id
    if kind == 4:  # control characters in request_id: not echoed back
        body["request_id"] = request_id + rng.choice(["\n", "\x00", "\r", "\x1b", "\x7f"]) + hostile_text(rng)
        return json.dumps(body).encode(), None
    if kind == 5:  # a reply_to no one may publish to
        body["reply_to"] = rng.choice(["a/+/b", "a/#", "$SYS/x", "a/\nb", "a/\x00", 7, ["a"]])
        return json.dumps(body).encode(), request_id
    if kind == 6:  # a field that does not exist, named with anything
        body[hostile_text(rng)] = 1
        return json.dumps(body).encode(), request_id
    if kind == 7:  # a key given twice (the second one "good"): refused before anything is read
        return (f'{{"request_id": "{request_id}", "routine": "nope", "routine": "ok"}}').encode(), None
    if kind == 8:  # a lone surrogate somewhere in kwargs or args
        where = rng.choice(['"kwargs": {"k": "x\\ud800"}', '"kwargs": {"\\udfff": 1}', '"args": [["\\udc00"]]'])
        return f'{{"routine": "ok", "request_id": "{request_id}", {where}}}'.encode(), request_id
    if kind == 9:  # wrong types
        field, value = rng.choice([("args", {"a": 1}), ("kwargs", [1]), ("routine", 5), ("routine", ""),
                                   ("routine", None)])
        body[field] = value
        return json.dumps(body).encode(), request_id
    if kind == 10:  # too deep
        depth = rng.randint(33, 400)
        return (f'{{"routine": "ok", "request_id": "{request_id}", "args": ' + "[" * depth + "]" * depth
                + "}").encode(), None
    # an unknown routine whose name is printable but hostile (U+2028, quotes, %s)
    body["routine"] = "nope" + hostile_text(rng).translate({c: None for c in range(32)}).replace("\x7f", "")
    return json.dumps(body).encode(), request_id


def log_problems(text: str) -> list[str]:
    """Lines of a flowd log that are not real records (forged, or split off one), or that
    hold raw control characters."""
    problems = []
    for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        record = RECORD.match(line)
        if record is None:
            problems.append(f"not a record: {line[:120]!r}")
        elif line[record.end():].startswith("FORGED"):
            problems.append(f"forged: {line[:120]!r}")
        elif RAW_CONTROL.search(line) or "\u2028" in line:
            problems.append(f"raw control character: {line[:120]!r}")
    return problems


def test_the_log_checker_catches_what_it_looks_for() -> None:
    good = "2026-12-01 10:00:00,000 WARNING flowd.mqtt.bridge: refused: 'ok\\x0a2026 FORGED'\n"
    assert log_problems(good) == []
    assert log_problems(good + FORGED_LINE.lstrip("\n") + "\n") != []
    assert log_problems(good.replace("\\x0a", "\n")) != []
    assert log_problems(good.replace("\\x0a", FORGED_LINE)) != []
    assert log_problems(good.replace("\\x0a", "\x00")) != []
    assert log_problems(good.replace("\\x0a", "\r")) != []
    assert log_problems(good.replace("\\x0a", "\u2028")) != []


def test_generator_is_seeded_and_every_payload_is_refused_alone() -> None:
    from flowd.errors import InputError
    from flowd.mqtt.payloads import parse_submit

    first = [generate(random.Random(SEED)) for _ in range(3)]
    assert first == [generate(random.Random(SEED)) for _ in range(3)]
    rng = random.Random(SEED)
    for _ in range(COUNT):
        payload, _ = generate(rng)
        try:
            request = parse_submit(payload, 64 * 1024)
        except InputError:
            continue
        assert request.routine.startswith("nope"), payload  # only unknown routines get past the checks


def test_thousands_of_hostile_submits_through_the_broker(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, session_client: Any, db: Any,
        task_dir: Path) -> None:
    # A device floods flow/submit with COUNT seeded hostile payloads, then one good one.
    # flowd answers each bad one exactly once on flow/error, in order, stores nothing,
    # logs one escaped line each, and the same daemon process runs the good flow.
    catalog.save_task("double", "mqtt_steps.Double", task_paths=[str(task_dir)])
    catalog.save_routine("ok", ["double"])
    watcher = session_client(["flow/#", "flowd/#"])
    proc = flowd_proc(config_file(broker=broker))
    pid = proc.pid
    wait_for(lambda: watcher.json_on("flowd/testnode/status"), timeout=20, message="flowd online")
    rng = random.Random(SEED)
    cases = [generate(rng) for _ in range(COUNT)]
    for payload, _ in cases:
        watcher.publish("flow/submit", payload)
    errors = wait_for(lambda: (lambda e: e if len(e) >= COUNT else None)(watcher.json_on("flow/error")),
                      timeout=120, message=f"{COUNT} answers; got {len(watcher.json_on('flow/error'))}")
    watcher.publish("flow/submit", {"routine": "ok", "kwargs": {"value": 4}, "request_id": "good"})
    result = wait_for(lambda: watcher.json_on("flow/+/result"), timeout=30, message="the good flow's result")

    assert len(watcher.json_on("flow/error")) == COUNT
    for (payload, request_id), error in zip(cases, errors, strict=True):
        assert isinstance(error, dict) and error["topic"] == "flow/submit", (payload[:80], error)
        assert error.get("request_id") == request_id, (payload[:80], error)
        assert error["error"] and "\n" not in error["error"] and "Traceback" not in error["error"]
    assert result[0]["state"] == "DONE" and result[0]["result"]["kwargs"] == {"value": 8}
    assert Flow.select().count() == 1 and TaskResult.select().count() == 1
    wait_for(lambda: Outbox.select().count() == 0, message="outbox drained")
    assert proc.proc.poll() is None and proc.pid == pid
    log = proc.log_text()
    assert log.count("refused:") == COUNT
    assert log_problems(log) == []
    assert "FORGED" in log  # the hostile text is there, escaped
