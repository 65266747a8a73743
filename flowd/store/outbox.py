"""The outbox table: what the daemon publishes, written in the transaction that decided it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection

from flowd.store.nodes import published_by
from flowd.store.rows import encode, execute, padded_ids


def add_outbox(topic: str, payload: str, correlation_data: str | None, now: dt.datetime,
               node_id: str | None = None) -> None:
    execute("INSERT INTO outbox (topic, payload, qos, retain, correlation_data, created_at, node_id) "
            "VALUES (?, ?, 1, ?, ?, ?, ?)", (topic, payload, encode("retain", False), correlation_data,
                                             encode("created_at", now), node_id))


def insert_message(topic: str, payload: str, qos: int, retain: bool, correlation_data: str | None,
                   now: dt.datetime, node_id: str | None = None) -> None:
    """One message to publish, any QoS and retain flag (inside the caller's transaction);
    ``node_id``: the node whose publisher sends it (several nodes on one database)."""
    execute("INSERT INTO outbox (topic, payload, qos, retain, correlation_data, created_at, node_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (topic, payload, qos, encode("retain", retain), correlation_data,
                                             encode("created_at", now), node_id))


def messages_after(after_id: int, limit: int, publisher: str | None = None
                   ) -> list[tuple[int, str, str, int, bool, str | None]]:
    """Up to ``limit`` messages with an id above ``after_id``, in id order, as
    (id, topic, payload, qos, retain, correlation_data) tuples: the publisher's hot path.
    ``publisher``: only those this node publishes (several nodes, see ``published_by``)."""
    mine, params = published_by(publisher)
    found = execute("SELECT id, topic, payload, qos, retain, correlation_data FROM outbox WHERE id > ? "
                    f"{mine}ORDER BY id LIMIT ?", (after_id, *params, limit)).fetchall()
    return [(row_id, topic, payload, qos, bool(retain), correlation)
            for row_id, topic, payload, qos, retain, correlation in found]


def delete_messages(ids: Collection[int]) -> None:
    """Delete these messages (published and acknowledged), inside the caller's transaction."""
    ids = list(ids)
    for start in range(0, len(ids), 512):
        chunk = padded_ids(ids[start:start + 512])
        execute(f"DELETE FROM outbox WHERE id IN ({', '.join('?' * len(chunk))})", chunk)


def message_ids_up_to(last_id: int, publisher: str | None = None) -> list[int]:
    """Ids of the messages at or below ``last_id`` (that ``publisher`` publishes)."""
    mine, params = published_by(publisher)
    return [int(row[0]) for row in execute(f"SELECT id FROM outbox WHERE id <= ? {mine}ORDER BY id",
                                           (last_id, *params)).fetchall()]


def message_id_span() -> tuple[int, int] | None:
    """(lowest id, highest id) of the messages waiting; None when there is none."""
    low, high = execute("SELECT MIN(id), MAX(id) FROM outbox").fetchone()
    return None if low is None else (int(low), int(high))


def count_messages() -> int:
    """How many messages wait to be published (or acknowledged)."""
    return int(execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def has_messages(publisher: str | None = None) -> bool:
    mine, params = published_by(publisher)
    return execute(f"SELECT 1 FROM outbox WHERE 1 = 1 {mine}LIMIT 1", params).fetchone() is not None


def drop_oldest_messages(count: int, keep: Collection[int]) -> int:
    """Delete the ``count`` oldest messages not in ``keep`` (handed to the client), inside
    the caller's transaction; returns how many went."""
    keep = list(keep)
    spare = f"WHERE id NOT IN ({', '.join('?' * len(keep))}) " if keep else ""
    cursor = execute(f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox {spare}ORDER BY id LIMIT ?)",
                     (*keep, int(count)))
    return int(cursor.rowcount)
