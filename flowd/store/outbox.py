"""The outbox table: what the daemon publishes, written in the transaction that decided it."""

from __future__ import annotations

import datetime as dt

from flowd.store.rows import encode, execute


def add_outbox(topic: str, payload: str, correlation_data: str | None, now: dt.datetime,
               node_id: str | None = None) -> None:
    execute("INSERT INTO outbox (topic, payload, qos, retain, correlation_data, created_at, node_id) "
            "VALUES (?, ?, 1, ?, ?, ?, ?)", (topic, payload, encode("retain", False), correlation_data,
                                             encode("created_at", now), node_id))


