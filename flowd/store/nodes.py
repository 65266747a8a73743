"""Nodes on one database: each daemon's status row (``flowctl status``) and, on a shared
database (SPEC 10), each node's lease: which nodes are alive, and their flows.

A node renews its lease every third of ``[flowd] lease``; a node whose lease has
expired (killed, frozen, cut off) has its RUNNING flows taken over by the live ones.
On PostgreSQL every lease time is the server's clock, so nodes whose own clocks differ
still agree on who is late; on SQLite (one machine) it is this machine's clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from flowd.store.flows import select_flows
from flowd.store.models import FlowState, utcnow
from flowd.store.rows import Row, decode, decode_time, encode, encode_time, execute, is_sqlite

_COLUMNS = ("node_id", "pid", "version", "started_at", "heartbeat_at", "broker_connected", "stopped_at")


def save_heartbeat(node_id: str, pid: int, version: str, started_at: dt.datetime, heartbeat_at: dt.datetime,
                   broker_connected: bool) -> None:
    """Insert or refresh this node's row: running, with a fresh heartbeat (inside the caller's transaction)."""
    execute("INSERT INTO node_status (node_id, pid, version, started_at, heartbeat_at, broker_connected, stopped_at) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (node_id) DO UPDATE SET pid = excluded.pid, "
            "version = excluded.version, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
            "broker_connected = excluded.broker_connected, stopped_at = NULL",
            (node_id, pid, version, encode_time(started_at), encode_time(heartbeat_at),
             encode("broker_connected", broker_connected)))


def mark_node_stopped(node_id: str, now: dt.datetime) -> None:
    """This node stopped cleanly at ``now`` (inside the caller's transaction)."""
    execute("UPDATE node_status SET stopped_at = ?, heartbeat_at = ?, broker_connected = ? WHERE node_id = ?",
            (encode_time(now), encode_time(now), encode("broker_connected", False), node_id))


def node_statuses() -> list[Row]:
    """Every node that ever ran on this database, by node id."""
    found = execute("SELECT " + ", ".join(_COLUMNS) + " FROM node_status ORDER BY node_id").fetchall()
    return [Row({"node_id": node_id, "pid": pid, "version": version, "started_at": decode_time(started),
                 "heartbeat_at": decode_time(heartbeat), "broker_connected": bool(connected),
                 "stopped_at": decode_time(stopped)})
            for node_id, pid, version, started, heartbeat, connected, stopped in found]


# ---------------------------------------------------------------- leases (several nodes, SPEC 10)
_PG_NOW = "(clock_timestamp() AT TIME ZONE 'UTC')"


@dataclass(frozen=True)
class NodeInfo:
    """One node as ``flowctl status`` shows it."""

    node_id: str
    renewed_at: dt.datetime
    expires_at: dt.datetime
    online: bool
    running: int  # steps its workers hold now


def _now_sql() -> tuple[str, tuple[str, ...]]:
    """The current time as SQL and its parameters (the server's clock on PostgreSQL)."""
    if is_sqlite():
        return "?", (encode("renewed_at", utcnow()),)
    return _PG_NOW, ()


_RENEW_UPDATE = ("ON CONFLICT (node_id) DO UPDATE SET renewed_at = excluded.renewed_at, "
                 "expires_at = excluded.expires_at, client_id = excluded.client_id, taken_by = NULL")


def renew_lease(node_id: str, lease_s: float, client_id: str) -> None:
    """Start or extend this node's lease by ``lease_s`` from now."""
    if is_sqlite():
        now = utcnow()
        execute("INSERT INTO node_lease (node_id, renewed_at, expires_at, client_id) VALUES (?, ?, ?, ?) "
                + _RENEW_UPDATE, (node_id, encode("renewed_at", now),
                                  encode("expires_at", now + dt.timedelta(seconds=lease_s)), client_id))
        return
    execute(f"INSERT INTO node_lease (node_id, renewed_at, expires_at, client_id) VALUES (?, {_PG_NOW}, "
            f"{_PG_NOW} + make_interval(secs => ?), ?) " + _RENEW_UPDATE, (node_id, lease_s, client_id))


def release_lease(node_id: str) -> None:
    """A clean stop: the lease ends now, so the others take over at once what is left."""
    now, params = _now_sql()
    execute(f"UPDATE node_lease SET expires_at = {now} WHERE node_id = ?", (*params, node_id))


def expired_nodes(except_node: str) -> list[str]:
    """Nodes other than ``except_node`` whose lease has expired, and that still have
    RUNNING flows or a broker session nobody ended (a node gone for good costs one
    cheap query)."""
    now, params = _now_sql()
    found = execute(f"SELECT l.node_id FROM node_lease l WHERE l.expires_at < {now} AND l.node_id <> ? "
                    "AND (l.taken_by IS NULL OR EXISTS (SELECT 1 FROM flow f WHERE f.state = ? "
                    "AND f.node_id = l.node_id)) ORDER BY l.node_id",
                    (*params, except_node, FlowState.RUNNING.value)).fetchall()
    return [row[0] for row in found]


def claim_session(node_id: str, by_node: str) -> str | None:
    """The MQTT client id of an expired node whose broker session nobody has taken yet,
    now taken by ``by_node`` (one live node only); None when another node was first,
    or the node renewed its lease meanwhile. A claim marks the session as being drained
    (:func:`session_drained` ends the mark), in the same transaction: the node, back
    after renewing its lease (whose row this claim locks), sees it and waits."""
    now, params = _now_sql()
    row = execute(f"UPDATE node_lease SET taken_by = ? WHERE node_id = ? AND taken_by IS NULL AND expires_at < {now} "
                  "RETURNING client_id", (by_node, node_id, *params)).fetchone()
    if row is None or row[0] is None:
        return None
    execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_DRAIN_KEY + node_id, by_node))
    return str(row[0])


_DRAIN_KEY = "session_drain:"  # meta key: a live node is taking this node's broker session


def session_drained(node_id: str) -> None:
    """The live node that claimed ``node_id``'s session has disconnected from it."""
    execute("DELETE FROM meta WHERE key = ?", (_DRAIN_KEY + node_id,))


def session_drainer(node_id: str) -> str | None:
    """The live node taking ``node_id``'s broker session now, if one is."""
    row = execute("SELECT value FROM meta WHERE key = ?", (_DRAIN_KEY + node_id,)).fetchone()
    return str(row[0]) if row else None


def flows_of_expired_node(node_id: str) -> list[Row]:
    """The RUNNING flows ``node_id`` holds or must recover, if its lease has expired
    (checked again in the same statement: a node that renewed meanwhile keeps them).
    Inside a write transaction on PostgreSQL the rows are locked until it ends."""
    now, params = _now_sql()
    return select_flows(f"state = ? AND node_id = ? AND EXISTS (SELECT 1 FROM node_lease WHERE node_id = ? "
                        f"AND expires_at < {now})", (FlowState.RUNNING.value, node_id, node_id, *params))


def published_by(node_id: str | None) -> tuple[str, tuple[str, ...]]:
    """The outbox rows ``node_id`` publishes, as ``AND ...`` (with a trailing space) and
    its parameters: its own, those with no node (written before schema v6), and those of
    a node whose lease expired and whose session it took (``claim_session``: one live
    node, so those rows do not go out once per node). None: every row (one node)."""
    if node_id is None:
        return "", ()
    now, params = _now_sql()
    return (f"AND (node_id = ? OR node_id IS NULL OR node_id IN (SELECT node_id FROM node_lease "
            f"WHERE expires_at < {now} AND taken_by = ?)) ", (node_id, *params, node_id))


def lease_of(node_id: str) -> tuple[dt.datetime, dt.datetime, bool] | None:
    """(renewed at, expires at, still valid) of a node's lease; None: it never had one."""
    now, params = _now_sql()
    row = execute(f"SELECT renewed_at, expires_at, expires_at >= {now} FROM node_lease WHERE node_id = ?",
                  (*params, node_id)).fetchone()
    if row is None:
        return None
    return decode("renewed_at", row[0]), decode("expires_at", row[1]), bool(row[2])


def list_nodes() -> list[NodeInfo]:
    """Every node that ever held a lease on this database, with its running steps."""
    now, params = _now_sql()
    running = dict(execute("SELECT node_id, COUNT(*) FROM flow WHERE state = ? AND worker_pid IS NOT NULL "
                           "AND node_id IS NOT NULL GROUP BY node_id", (FlowState.RUNNING.value,)).fetchall())
    found = execute(f"SELECT node_id, renewed_at, expires_at, expires_at >= {now} FROM node_lease "
                    "ORDER BY node_id", params).fetchall()
    return [NodeInfo(node_id, decode("renewed_at", renewed), decode("expires_at", expires), bool(online),
                     int(running.get(node_id, 0))) for node_id, renewed, expires, online in found]
