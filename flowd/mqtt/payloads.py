"""Checks on what arrives from the network: MQTT payloads and submits (SPEC 4.1, 4.3).

Nothing here trusts its input. A payload is checked for size, UTF-8, nesting depth,
JSON syntax, keys given twice and lone surrogates (which no UTF-8 encoder can write
back out, so they could never be stored or answered) before anything looks inside it;
a submit then for its fields. Every refusal is a sentence naming what was wrong, with
the offending text shown escaped and shortened. Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

from flowd.errors import InputError
from flowd.mqtt.topics import is_valid_publish_topic

MAX_JSON_DEPTH = 32
MAX_ID_LENGTH = 256
SUBMIT_FIELDS = ("routine", "args", "kwargs", "request_id", "reply_to")
_SUBMIT_FIELD_SET = frozenset(SUBMIT_FIELDS)
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class SubmitRefused(InputError):
    """A submit flowd will not run; ``str()`` is the sentence published on ``flow/error``."""

    def __init__(self, message: str, request_id: str | None = None, reply_to: str | None = None):
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


class SubmitRequest(NamedTuple):
    """A checked submit (SPEC 4.1); a named tuple, made once per submit at a fraction
    of a frozen dataclass's cost."""

    routine: str
    args: list[Any]
    kwargs: dict[str, Any]
    request_id: str | None = None
    reply_to: str | None = None


# ---------------------------------------------------------------------- text
def has_control(text: str) -> bool:
    """True when ``text`` holds a control character (U+0000-U+001F, U+007F)."""
    return _CONTROL.search(text) is not None


def has_surrogate(text: str) -> bool:
    """True when ``text`` holds a lone surrogate (``"\\ud800"``), which UTF-8 cannot carry."""
    return _SURROGATE.search(text) is not None


def shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error sentence: escaped (``repr``) and cut to ``limit`` characters."""
    short = text if len(text) <= limit else text[:limit] + "..."
    return repr(short)


def find_surrogate(value: Any, path: str = "") -> str | None:
    """The path (``kwargs.city``, ``args[2]``) of the first string or key holding a lone
    surrogate in decoded JSON ``value``; ``"(the key 'x')"`` paths name a bad key. None if clean."""
    if isinstance(value, str):
        return path if has_surrogate(value) else None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = find_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and has_surrogate(key):
                return f"{path}.{shown(key)}".lstrip(".") or shown(key)
            found = find_surrogate(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------- JSON
def is_nested_deeper(text: str, limit: int) -> bool:
    """True when the JSON ``text`` nests arrays/objects deeper than ``limit``.

    Runs before ``json.loads``, whose recursion a 10,000-deep payload would exhaust.
    Counting brackets first keeps the usual small payload on the fast path.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    skip = -1
    for match in _JSON_SPECIAL.finditer(text):
        position = match.start()
        if position == skip:
            continue
        char = match.group()
        if in_string:
            if char == "\\":
                skip = position + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


class _DuplicateKey(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object, refusing a key given twice: JSON leaves it open which one wins."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"the key {shown(key)} is given twice in one object")
            seen.add(key)
    return result


# One decoder for the process: json.loads with options builds a new one per call. It
# keeps no state between calls, so threads share it.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)


def parse_json_payload(payload: bytes, max_payload: int, *, allow_surrogates: bool = False) -> Any:
    """Decode an MQTT payload as JSON safely; raises InputError with the reason.

    ``allow_surrogates=True`` leaves the check for lone surrogates to the caller
    (:func:`check_surrogates`), which can then name the request in its refusal."""
    if len(payload) > max_payload:
        raise InputError(f"the payload is {len(payload)} bytes; the limit is {max_payload} bytes (mqtt.max_payload)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the payload is not UTF-8 text (byte 0x{payload[exc.start]:02x} at offset "
                         f"{exc.start})") from None
    if is_nested_deeper(text, MAX_JSON_DEPTH):
        raise InputError(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        data = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"the payload is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except _DuplicateKey as exc:
        raise InputError(f"the payload is ambiguous: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InputError(f"the payload is not valid JSON: {exc}") from None
    # A surrogate can only arrive escaped ("\ud800"): raw, the bytes are not UTF-8.
    if not allow_surrogates and "\\u" in text:
        check_surrogates(data)
    return data


def check_surrogates(data: Any) -> None:
    """Raise InputError naming where decoded JSON ``data`` holds a lone surrogate."""
    where = find_surrogate(data)
    if where is not None:
        at = f" at '{where}'" if where else ""
        raise InputError(f"the payload holds a lone surrogate (a \\ud800-\\udfff escape not part of a pair){at}; "
                         "such text cannot be stored or sent as UTF-8")


def _describe_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------- submits
def _readable_request_id(value: Any) -> str | None:
    """``request_id`` when it may be echoed back in a refusal, else None."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and not (has_control(value)
                                                                             or has_surrogate(value)):
        return value
    return None


def is_reply_topic(value: Any) -> bool:
    """A topic flowd may answer on: publishable, no leading '$', no control characters."""
    return is_valid_publish_topic(value) and not value.startswith("$") and not has_control(value)


def parse_submit(payload: bytes, max_payload: int) -> SubmitRequest:
    """Check a ``flow/submit`` payload (SPEC 4.1/4.3); raises SubmitRefused saying what is wrong."""
    try:
        data = parse_json_payload(payload, max_payload, allow_surrogates=True)
    except InputError as exc:
        raise SubmitRefused(str(exc)) from None
    if not isinstance(data, dict):
        raise SubmitRefused(f'the payload must be a JSON object like {{"routine": "name"}}, not '
                            f"{_describe_type(data)}")
    request_id = _readable_request_id(data.get("request_id"))
    reply_to = data.get("reply_to")
    reply_to = reply_to if is_reply_topic(reply_to) else None

    def refuse(message: str) -> SubmitRefused:
        return SubmitRefused(message, request_id, reply_to)

    if b"\\u" in payload:  # a surrogate can only arrive as an escape
        try:
            check_surrogates(data)
        except InputError as exc:
            raise refuse(str(exc)) from None

    unknown = [] if _SUBMIT_FIELD_SET.issuperset(data) else sorted(str(key) for key in data
                                                                  if key not in SUBMIT_FIELDS)
    if unknown:
        raise refuse(f"unknown field {shown(unknown[0])} in the submit; the fields are {', '.join(SUBMIT_FIELDS)}")
    routine = data.get("routine")
    if routine is None:
        raise refuse("the submit has no 'routine'; send at least {\"routine\": \"name\"}")
    if not isinstance(routine, str) or not routine.strip():
        raise refuse(f"'routine' must be a non-empty string, not {_describe_type(routine)}")
    if has_control(routine):
        raise refuse(f"'routine' must not contain control characters, got {shown(routine)}")
    args = data.get("args")
    if args is not None and not isinstance(args, list):
        raise refuse(f"'args' must be an array, not {_describe_type(args)}")
    kwargs = data.get("kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise refuse(f"'kwargs' must be an object, not {_describe_type(kwargs)}")
    raw_id = data.get("request_id")
    if raw_id is not None and request_id is None:
        what = shown(raw_id) if isinstance(raw_id, str) else _describe_type(raw_id)
        raise refuse(f"'request_id' must be a non-empty string of at most {MAX_ID_LENGTH} characters without "
                     f"control characters, not {what}")
    raw_reply = data.get("reply_to")
    if raw_reply is not None and reply_to is None:
        what = shown(raw_reply, 80) if isinstance(raw_reply, str) else _describe_type(raw_reply)
        raise refuse(f"'reply_to' must be a topic to publish to (no '+', '#', leading '$' or control characters), "
                     f"not {what}")
    return SubmitRequest(routine=routine, args=args or [], kwargs=kwargs or {}, request_id=request_id,
                         reply_to=reply_to)
