"""flowd's JSON text: the one encoding used in the database and on MQTT, and the check
that a value can be stored as JSON, naming what cannot.

Its own module, below the store and the engine: the models encode columns with it, the
runner checks each step's output, the api and the catalog a flow's input and a task's
options.
"""

from __future__ import annotations

import json
import math
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from json.scanner import c_make_scanner  # type: ignore[attr-defined]
from typing import Any

from flowd.errors import FlowdError, StepError
from flowd.mqtt.payloads import has_surrogate

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# JSONEncoder.encode builds a C encoder at every call; this one is built once. Without
# the circular-reference check (markers None: a shared dict would be shared by threads),
# a value that contains itself fails as one nested too deep does, with RecursionError.
_C_ENCODE = (c_make_encoder(None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, False)
             if c_make_encoder is not None else None)


def dumps(value: Any) -> str:
    """Compact JSON, the one encoding used in the database and on MQTT.

    One encoder for the process: ``json.dumps`` with these options builds a new
    JSONEncoder at every call, which cost more than encoding a step's output. An empty
    list or object (a submit's usual args) is written out without the encoder."""
    kind = type(value)
    if (kind is list or kind is dict) and not value:
        return "[]" if kind is list else "{}"
    if _C_ENCODE is None:
        return _ENCODER.encode(value)
    return "".join(_C_ENCODE(value, 0))


_C_SCAN = c_make_scanner(json.JSONDecoder()) if c_make_scanner is not None else None


def loads(text: str) -> Any:
    """``json.loads`` of a JSON text as flowd writes it (nothing around the value): the C
    scanner at once, without the wrapper's checks and whitespace matches (half the cost
    of a step's output). Anything else goes to ``json.loads``, with its errors."""
    if _C_SCAN is not None:
        try:
            value, end = _C_SCAN(text, 0)
        except StopIteration:
            pass
        else:
            if end == len(text):
                return value
    return json.loads(text)


def check_json(value: Any, label: str, *, verb: str = "returned", error: type[FlowdError] = StepError) -> str:
    """The value as stored (:func:`dumps`); raise ``error`` naming the first value that
    JSON cannot carry, by its path ("{label} {verb} a value that ...": a step's output
    is what it returned, a flow's input what it contains).

    The common case costs one encode and one decode in C: a value that reads back equal
    to itself is plain JSON. Only a value that does not (NaN, a lone surrogate, a key
    that is not a string, a tuple, an object JSON cannot carry) is walked in Python,
    to name the problem or to find there is none.
    """
    text: str | None = None
    try:
        text = dumps(value)
        text.encode("utf-8")
        if loads(text) == value:
            return text
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        text = None
    try:
        problem = _first_non_json(value, "")
    except RecursionError:
        raise error(f"{label} {verb} a value nested too deeply to be stored as JSON") from None
    if problem is not None:
        path, bad = problem
        if isinstance(bad, str):
            raise error(f"{label} {verb} a string with a lone surrogate (\\ud800-\\udfff, not UTF-8) "
                            f"at '{path.lstrip('.') or '(the value itself)'}': {_short(bad)}")
        raise error(f"{label} {verb} a value that is not JSON-serialisable at '{path.lstrip('.')}': "
                        f"{type(bad).__name__} {_short(bad)}")
    if text is not None:
        return text  # plain JSON that reads back otherwise: tuples, say, as arrays
    try:
        return dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise error(f"{label} {verb} a value that cannot be stored as JSON: {exc}") from None


def _first_non_json(value: Any, path: str) -> tuple[str, Any] | None:
    if isinstance(value, str):
        return (path, value) if has_surrogate(value) else None
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _first_non_json(item, f"{path}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or has_surrogate(key):
                return (f"{path}.{key!r}", key)
            found = _first_non_json(item, f"{path}.{key}")
            if found:
                return found
        return None
    return (path, value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
