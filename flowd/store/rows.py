"""The one row type of the store and the value encodings of its columns.

A ``Row`` is a flow or an attempt as plain attributes (``flow.state``), decoded once
when read; ``execute`` runs one statement on the process's database connection, with
the placeholders the backend wants (SQLite ``?``, PostgreSQL ``%s``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import peewee

from flowd.store.models import ACTIVE_STATES, database, dumps, loads

FLOW_COLUMNS = (
    "id", "uid", "routine", "steps", "state", "position", "args", "kwargs", "request_id", "trigger", "reply_to",
    "correlation_data", "admitted", "dispatch_token", "worker_pid", "step_attempt", "interruptions",
    "next_attempt_at", "deadline", "result", "error", "created_at", "started_at", "finished_at", "updated_at",
    "parent_id", "depth", "wait_topic", "wait_match", "wait_until", "node_id",
)
RESULT_COLUMNS = ("id", "flow_id", "position", "task", "attempt", "state", "input", "output", "error", "worker_pid",
                  "started_at", "finished_at", "node_id")
_JSON = {"steps", "args", "kwargs", "result", "wait_match", "input", "output"}
_TIMES = {"next_attempt_at", "deadline", "created_at", "started_at", "finished_at", "updated_at", "wait_until",
          "renewed_at", "expires_at"}
_BOOLS = {"admitted"}
TIME_COLUMNS, BOOL_COLUMNS = frozenset(_TIMES), frozenset(_BOOLS)
T = TypeVar("T")
CODED_COLUMNS = frozenset(_JSON | _TIMES | _BOOLS)  # the columns :func:`encode` and :func:`decode` change


class Row:
    """A row as plain attributes (``flow.state``), like a peewee model instance."""

    __slots__ = ("__dict__",)

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # columns are set in __init__; this only types them
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value

    @property
    def is_ended(self) -> bool:
        return self.state not in ACTIVE_STATES


def decode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON:
        return loads(value)
    if name in _TIMES and isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    if name in _BOOLS:
        return bool(value)
    return value


def encode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON:
        return dumps(value)
    if name in _TIMES and isinstance(value, dt.datetime) and is_sqlite():
        return _time_text(value)
    if isinstance(value, bool) and is_sqlite():
        return int(value)
    return value


_last_time: tuple[dt.datetime | None, str] = (None, "")


def _time_text(value: dt.datetime) -> str:
    """A time as SQLite stores it. A transaction stamps many rows with the same ``now``
    (a worker's round: every flow's attempts and updates): that one object is written
    out once, not once per column and flow."""
    global _last_time
    last = _last_time  # one read: another thread may replace it, never half of it
    if last[0] is value:
        return last[1]
    text = value.isoformat(sep=" ")
    _last_time = (value, text)
    return text


def padded(count: int) -> int:
    """How many rows a statement for ``count`` rows is written for, when the extra rows
    change nothing (a VALUES row of NULLs joins nothing, an id repeated in ``IN`` matches
    once): on SQLite the next power of two, on PostgreSQL ``count``.

    SQLite keeps one prepared statement per SQL text (the driver's 128, least recently
    used). A text per row count, as a worker's rounds of 1 to 80 steps wrote them, was
    prepared again most of the time: ~0.3 ms for a 20-row UPDATE here, more than it
    takes to run. Powers of two give a handful of texts per statement."""
    if count <= 1 or not is_sqlite():
        return count
    return 1 << (count - 1).bit_length()


def padded_ids(ids: list[T]) -> list[T]:
    """``ids`` for an ``IN`` list of :func:`padded` length: the last repeated (it matches once)."""
    return ids + ids[-1:] * (padded(len(ids)) - len(ids))


def runs(items: list[T], largest: int) -> Iterator[list[T]]:
    """``items`` in consecutive runs for multi-row INSERTs, whose rows cannot be padded:
    on SQLite runs of a power of two rows each, at most ``largest`` (19 rows: 16, 2, 1),
    for the reason of :func:`padded`; on PostgreSQL runs of ``largest``."""
    start = 0
    while start < len(items):
        left = len(items) - start
        size = min(largest, left) if not is_sqlite() else min(largest, 1 << (left.bit_length() - 1))
        yield items[start:start + size]
        start += size


def is_sqlite() -> bool:
    return isinstance(database.obj, peewee.SqliteDatabase)


def sql_bool(value: bool) -> Any:
    """A boolean as the backend wants it as a parameter (SQLite 0/1, PostgreSQL bool)."""
    return encode("admitted", value)


_postgres_sql: dict[str, str] = {}


def _sql(text: str) -> str:
    """Adapt '?' placeholders to the backend's paramstyle (PostgreSQL wants %s)."""
    if is_sqlite():
        return text
    cached = _postgres_sql.get(text)
    if cached is None:
        cached = _postgres_sql[text] = text.replace("?", "%s")
    return cached


def execute(text: str, params: Iterable[Any] = ()) -> Any:
    return database.obj.execute_sql(_sql(text), tuple(params))


_coded_columns: dict[tuple[str, ...], tuple[str, ...]] = {}


def rows(cursor: Any, columns: tuple[str, ...]) -> list[Row]:
    """The cursor's rows, each decoded once. Only the columns with an encoding (JSON,
    times, booleans) go through :func:`decode`: a flow has 31 columns and 13 of them."""
    coded = _coded_columns.get(columns)
    if coded is None:
        coded = _coded_columns[columns] = tuple(c for c in columns if c in _JSON or c in _TIMES or c in _BOOLS)
    found = []
    for raw in cursor.fetchall():
        values = dict(zip(columns, raw, strict=True))
        for name in coded:
            if values[name] is not None:
                values[name] = decode(name, values[name])
        found.append(Row(values))
    return found




def encode_time(value: dt.datetime | None) -> Any:
    """A time as the backend stores it (SQLite: ISO text, as peewee writes it; PostgreSQL: timestamp)."""
    return encode("started_at", value)


def decode_time(value: Any) -> dt.datetime | None:
    """A stored time back to a naive-UTC datetime (SQLite returns the text)."""
    decoded: dt.datetime | None = decode("started_at", value)
    return decoded
