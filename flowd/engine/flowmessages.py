"""What flowd publishes about a flow (SPEC 4.2) and how a waiting flow's ``match``
is compared with an event (SPEC 2.1): plain functions of a flow row, shared by the
engine, the MQTT bridge and the foreground runner."""

from __future__ import annotations

from json.encoder import encode_basestring
from typing import Any

from flowd.store.models import WAITING, dumps, isoformat


def flow_status_payload(flow: Any, child_id: int | None = None) -> dict[str, Any]:
    """``flow/<id>/status`` (SPEC 4.2); ``flow`` is a Flow model or a store row;
    ``child_id`` names the sub-flow a WAITING flow waits for."""
    steps = flow.steps or []
    task = steps[flow.position] if 0 <= flow.position < len(steps) else None
    payload: dict[str, Any] = {
        "flow_id": flow.id, "uid": flow.uid, "routine": flow.routine, "request_id": flow.request_id,
        "state": flow.state, "position": flow.position, "steps": len(steps), "task": task,
        "trigger": flow.trigger,
    }
    if flow.state == WAITING and flow.wait_topic:
        payload["waiting_for"] = {"topic": flow.wait_topic, "match": flow.wait_match}
    elif flow.state == WAITING and child_id is not None:
        payload["waiting_for"] = {"flow": child_id}
    if flow.error:
        payload["error"] = flow.error
    return payload


def flow_result_payload(flow: Any) -> dict[str, Any]:
    """``flow/<id>/result`` (SPEC 4.2)."""
    return {
        "flow_id": flow.id, "uid": flow.uid, "routine": flow.routine, "request_id": flow.request_id,
        "state": flow.state, "result": flow.result, "error": flow.error, "trigger": flow.trigger,
        "started_at": isoformat(flow.started_at), "finished_at": isoformat(flow.finished_at),
    }


def flow_result_text(flow: Any, result_json: str | None = None) -> str:
    """``dumps(flow_result_payload(flow))``, the same text. ``result_json``: the result's
    JSON text when the caller has it (a worker's last output, encoded once when it was
    checked): written in as it is, not encoded a second time inside the payload."""
    if result_json is None:
        return dumps(flow_result_payload(flow))
    return (f'{{"flow_id":{int(flow.id)},"uid":{quoted(flow.uid)},"routine":{quoted(flow.routine)},'
            f'"request_id":{quoted(flow.request_id)},"state":{quoted(flow.state)},"result":{result_json},'
            f'"error":{quoted(flow.error)},"trigger":{quoted(flow.trigger)},'
            f'"started_at":{quoted(isoformat(flow.started_at))},"finished_at":{quoted(isoformat(flow.finished_at))}}}')


def quoted(value: str | None) -> str:
    """A text as ``dumps`` writes it (ensure_ascii off), None as null."""
    return "null" if value is None else encode_basestring(value)


def payload_matches(match: dict[str, Any] | None, payload: Any) -> bool:
    """True when every key/value of ``match`` is in the JSON object ``payload``."""
    if not match:
        return True
    if not isinstance(payload, dict):
        return False
    return all(key in payload and same_json(payload[key], value) for key, value in match.items())


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (Python's == says it is); 1 equals 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
