"""What the web console and /metrics read (SPEC 11): changes since the last scrape.

``/metrics`` counts flows and step attempts as they start and end, from the database
(steps run in other processes). Each scrape asks for what is newer than the ids it saw
last, for the rows still open then, and for every flow not ended; values come back as
plain tuples, without per-value decoding, since a busy minute brings thousands.
"""

from __future__ import annotations

from collections.abc import Iterable

from flowd.store.models import ENDED_STATES
from flowd.store.rows import execute, is_sqlite

_CHUNK = 500


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _chunks(ids: Iterable[int]) -> list[list[int]]:
    found = sorted(set(ids))
    return [found[i:i + _CHUNK] for i in range(0, len(found), _CHUNK)]


def newest_ids() -> tuple[int, int]:
    """(highest flow id, highest attempt id); 0 for an empty table."""
    flow = execute("SELECT MAX(id) FROM flow").fetchone()[0]
    attempt = execute("SELECT MAX(id) FROM task_result").fetchone()[0]
    return int(flow or 0), int(attempt or 0)


def flow_changes(after_id: int | None, watched: Iterable[int] = ()) -> list[tuple[int, str, str, str | None]]:
    """(id, routine, state, finished_at as text) of every flow newer than ``after_id``, of
    the ``watched`` ones and of every flow not ended (``after_id=None``: those only)."""
    head = "SELECT id, routine, state, finished_at FROM flow WHERE "
    queries: list[tuple[str, tuple[object, ...]]] = [
        (head + f"state NOT IN ({_marks(len(ENDED_STATES))})", tuple(ENDED_STATES))]
    if after_id is not None:
        queries.append((head + "id > ?", (after_id,)))
    queries += [(head + f"id IN ({_marks(len(chunk))})", tuple(chunk)) for chunk in _chunks(watched)]
    found: dict[int, tuple[int, str, str, str | None]] = {}
    for text, params in queries:
        for flow_id, routine, state, finished in execute(text, params).fetchall():
            found[flow_id] = (int(flow_id), str(routine), str(state), None if finished is None else str(finished))
    return sorted(found.values())


def attempt_changes(after_id: int | None, watched: Iterable[int] = ()
                    ) -> list[tuple[int, int, str, str, float | None]]:
    """(id, flow id, routine, task, seconds it took or None while it runs) of every step
    attempt newer than ``after_id`` and of the ``watched`` ones (``after_id=None``: the
    attempts still running). The database works out how long each took: no time is
    parsed in Python."""
    head = (f"SELECT t.id, t.flow_id, f.routine, t.task, {_took()} FROM task_result t "
            "JOIN flow f ON f.id = t.flow_id WHERE ")
    queries: list[tuple[str, tuple[object, ...]]] = [
        (head + "t.id > ?", (after_id,)) if after_id is not None else (head + "t.finished_at IS NULL", ())]
    queries += [(head + f"t.id IN ({_marks(len(chunk))})", tuple(chunk)) for chunk in _chunks(watched)]
    found: dict[int, tuple[int, int, str, str, float | None]] = {}
    for text, params in queries:
        for attempt_id, flow_id, routine, task, took in execute(text, params).fetchall():
            found[attempt_id] = (int(attempt_id), int(flow_id), str(routine), str(task),
                                 None if took is None else max(float(took), 0.0))
    return sorted(found.values())


def _took() -> str:
    """Seconds from ``t.started_at`` to ``t.finished_at`` (NULL while it runs), exact to the
    microsecond. SQLite keeps times as text, 'YYYY-MM-DD HH:MM:SS[.ffffff]': whole seconds
    from strftime('%s') of the first 19 characters (given the fraction, it may round up),
    the fraction from character 20 on ('' counts as 0)."""
    if is_sqlite():
        return ("CASE WHEN t.finished_at IS NULL OR t.started_at IS NULL THEN NULL ELSE "
                "(strftime('%s', substr(t.finished_at, 1, 19)) - strftime('%s', substr(t.started_at, 1, 19))) "
                "+ (substr(t.finished_at, 20) - substr(t.started_at, 20)) END")
    return "EXTRACT(EPOCH FROM (t.finished_at - t.started_at))"
