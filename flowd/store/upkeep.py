"""Housekeeping on the flow tables: pruning ended flows (SPEC 9)."""

from __future__ import annotations

import datetime as dt

from flowd.store.models import ENDED_STATES, write_transaction
from flowd.store.rows import encode_time, execute, is_sqlite

_ENDED_BEFORE = f"state IN ({', '.join('?' * len(ENDED_STATES))}) AND finished_at < ?"


def count_ended_flows(cutoff: dt.datetime) -> int:
    """How many flows ended before ``cutoff`` (what a prune would delete)."""
    return int(execute(f"SELECT COUNT(*) FROM flow WHERE {_ENDED_BEFORE}", (*ENDED_STATES, encode_time(cutoff)))
               .fetchone()[0])


def prune_ended_flows(cutoff: dt.datetime) -> int:
    """Delete flows that ended before ``cutoff`` with their attempts, in one transaction;
    on SQLite, give the freed pages back to the file system. Returns how many flows went."""
    params = (*ENDED_STATES, encode_time(cutoff))
    with write_transaction():
        # Children keep their own rows; unlink them so the parent can go.
        execute(f"UPDATE flow SET parent_id = NULL WHERE parent_id IN (SELECT id FROM flow WHERE {_ENDED_BEFORE})",
                params)
        execute(f"DELETE FROM task_result WHERE flow_id IN (SELECT id FROM flow WHERE {_ENDED_BEFORE})", params)
        removed = int(execute(f"DELETE FROM flow WHERE {_ENDED_BEFORE}", params).rowcount)
    if removed and is_sqlite():
        execute("PRAGMA incremental_vacuum").fetchall()
    return removed
