"""The node_status table: one row per daemon, its heartbeat, read by ``flowctl status``."""

from __future__ import annotations

import datetime as dt

from flowd.store.rows import Row, decode_time, encode, encode_time, execute

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
