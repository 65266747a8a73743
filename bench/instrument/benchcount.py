"""Counters for the bench's instrumented pass: SQL statements and transactions per process
(written by ``sitecustomize.py`` in the counted processes) and fsync-family calls
(written by ``synccount.c``, LD_PRELOADed), read back by ``run_bench.py``.

Nothing here is imported by flowd. A process gets counted when it starts with this folder
on ``PYTHONPATH`` and ``FLOWD_BENCH_COUNT_DIR`` set: ``sitecustomize`` then wraps
``sqlite3.connect`` so every new connection gets a trace callback
(``Connection.set_trace_callback``, called once per statement execution) that classifies
the statement by its first keyword and follows the connection's transaction state.

Each process (and each forked child, from its first statement after the fork) has its own
file ``<pid>-<monotonic ns>.sql`` in that folder, a small memory-mapped table of int64
counters per database file name. The counters are updated in place, so the file is current
at every moment and stays behind when the process ends, by ``os._exit`` or a signal
included: no flushing, no thread, no atexit. ``synccount.c`` keeps the same kind of table
(``<pid>-<ns>.sync``) per synced file name.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

ENV_DIR = "FLOWD_BENCH_COUNT_DIR"

# ---------------------------------------------------------------- layout (shared with synccount.c)
NAME_BYTES = 64
SQL_METRICS = ("statements", "select", "insert", "update", "delete", "begin", "commit", "rollback",
               "write_commits", "autocommit_writes", "savepoint", "release", "pragma", "other")
SQL_SLOT_WORDS = 24  # 8 words of name, then up to 16 counters
SQL_SLOTS = 16
SYNC_METRICS = ("fsync", "fdatasync", "sync_file_range", "syncfs")
SYNC_SLOT_WORDS = 12  # 8 words of name, then 4 counters (struct slot in synccount.c)
SYNC_SLOTS = 32

_WRITES = {"INSERT": "insert", "UPDATE": "update", "DELETE": "delete", "REPLACE": "insert",
           "CREATE": "other", "DROP": "other", "ALTER": "other"}
_IDX = {name: i for i, name in enumerate(SQL_METRICS)}


# ---------------------------------------------------------------- writer (in the counted process)
class _Table:
    """This process's counter file, opened on first use (and again in a forked child)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.words: Any = None
        self.slots: dict[str, int] = {}
        self.pid = 0

    def base(self, db: str) -> int | None:
        if (self.words is None or self.pid != os.getpid()) and not self._open():
            return None
        slot = self.slots.get(db)
        if slot is None:
            if len(self.slots) >= SQL_SLOTS - 1:
                db = "(other)"
                slot = self.slots.get(db)
            if slot is None:
                slot = len(self.slots)
                self.slots[db] = slot
                name = db.encode()[:NAME_BYTES - 1]
                start = slot * SQL_SLOT_WORDS * 8
                self.words.obj[start:start + NAME_BYTES] = name.ljust(NAME_BYTES, b"\0")
        return slot * SQL_SLOT_WORDS + 8

    def _open(self) -> bool:
        import mmap
        import time

        self.pid = os.getpid()
        self.slots = {}
        self.words = None
        size = SQL_SLOTS * SQL_SLOT_WORDS * 8
        try:
            fd = os.open(os.path.join(self.folder, f"{self.pid}-{time.monotonic_ns()}.sql"),
                         os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError:
            return False
        try:
            os.ftruncate(fd, size)
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.words = memoryview(mem).cast("q")
        return True


def _db_name(database: Any) -> str:
    text = os.fsdecode(database) if isinstance(database, (str, bytes, os.PathLike)) else str(database)
    if text.startswith("file:"):
        text = text[5:].split("?", 1)[0]
    return os.path.basename(text) or text


def install() -> None:
    """Wrap ``sqlite3.connect`` (and ``sqlite3.dbapi2.connect``) to count every connection's statements."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return
    import _thread
    import sqlite3
    import sqlite3.dbapi2

    table = _Table(folder)
    lock = [_thread.allocate_lock()]

    def after_fork_in_child() -> None:
        lock[0] = _thread.allocate_lock()  # a lock held by a thread that is not in this child
        table.words = None

    os.register_at_fork(after_in_child=after_fork_in_child)
    original = sqlite3.dbapi2.connect

    def make_callback(db: str) -> Any:
        state = {"txn": False, "wrote": False, "sp": 0, "sp_txn": False}

        def trace(sql: str) -> None:
            head = sql.lstrip()[:24].upper()
            word = head.split(None, 1)[0] if head else ""
            with lock[0]:
                base = table.base(db)
                if base is None:
                    return
                w = table.words
                w[base] += 1  # statements
                metric = _WRITES.get(word)
                if metric is not None:
                    w[base + _IDX[metric]] += 1
                    if state["txn"]:
                        state["wrote"] = True
                    else:
                        w[base + _IDX["autocommit_writes"]] += 1
                elif word in ("SELECT", "WITH", "VALUES"):
                    w[base + _IDX["select"]] += 1
                elif word == "BEGIN":
                    w[base + _IDX["begin"]] += 1
                    state.update(txn=True, wrote=False, sp=0, sp_txn=False)
                elif word in ("COMMIT", "END"):
                    w[base + _IDX["commit"]] += 1
                    if state["wrote"]:
                        w[base + _IDX["write_commits"]] += 1
                    state.update(txn=False, wrote=False, sp=0, sp_txn=False)
                elif word == "ROLLBACK" and " TO " not in f" {head} ":
                    w[base + _IDX["rollback"]] += 1
                    state.update(txn=False, wrote=False, sp=0, sp_txn=False)
                elif word == "SAVEPOINT":
                    w[base + _IDX["savepoint"]] += 1
                    if not state["txn"]:  # a SAVEPOINT outside a transaction starts one
                        w[base + _IDX["begin"]] += 1
                        state.update(txn=True, wrote=False, sp=0, sp_txn=True)
                    state["sp"] += 1
                elif word == "RELEASE":
                    w[base + _IDX["release"]] += 1
                    state["sp"] = max(0, state["sp"] - 1)
                    if state["sp"] == 0 and state["sp_txn"]:
                        w[base + _IDX["commit"]] += 1
                        if state["wrote"]:
                            w[base + _IDX["write_commits"]] += 1
                        state.update(txn=False, wrote=False, sp_txn=False)
                elif word == "PRAGMA":
                    w[base + _IDX["pragma"]] += 1
                else:
                    w[base + _IDX["other"]] += 1

        return trace

    def connect(database: Any, *args: Any, **kwargs: Any) -> Any:
        conn = original(database, *args, **kwargs)
        try:
            conn.set_trace_callback(make_callback(_db_name(database)))
        except Exception:  # never break the counted program
            pass
        return conn

    connect.__wrapped__ = original  # type: ignore[attr-defined]
    sqlite3.dbapi2.connect = connect
    sqlite3.connect = connect


# ---------------------------------------------------------------- reader (run_bench.py)
def _read_table(path: Path, slots: int, slot_words: int, metrics: tuple[str, ...]) -> dict[str, dict[str, int]]:
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    out: dict[str, dict[str, int]] = {}
    for slot in range(slots):
        start = slot * slot_words * 8
        chunk = data[start:start + slot_words * 8]
        if len(chunk) < slot_words * 8:
            break
        name = chunk[:NAME_BYTES].split(b"\0", 1)[0].decode(errors="replace")
        if not name:
            continue
        values = struct.unpack_from(f"<{len(metrics)}q", chunk, NAME_BYTES)
        out[name] = dict(zip(metrics, values, strict=True))
    return out


def snapshot(folder: Path, pids: set[int] | None = None) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
    """Every counter file in ``folder`` (or only those of ``pids``): {"sql"|"sync": {file: {name: counts}}}."""
    out: dict[str, dict[str, Any]] = {"sql": {}, "sync": {}}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for entry in entries:
        stem, _, ext = entry.name.rpartition(".")
        if pids is not None and int(stem.split("-", 1)[0] or 0) not in pids:
            continue
        if ext == "sql":
            out["sql"][entry.name] = _read_table(Path(entry.path), SQL_SLOTS, SQL_SLOT_WORDS, SQL_METRICS)
        elif ext == "sync":
            out["sync"][entry.name] = _read_table(Path(entry.path), SYNC_SLOTS, SYNC_SLOT_WORDS, SYNC_METRICS)
    return out


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """What happened between two snapshots, summed over processes: {"sql"|"sync": {name: counts}}.
    A file that appeared in between (a process started, or first counted, meanwhile) starts at 0."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for kind in ("sql", "sync"):
        total: dict[str, dict[str, int]] = {}
        for fname, tables in after.get(kind, {}).items():
            old = before.get(kind, {}).get(fname, {})
            for name, counts in tables.items():
                acc = total.setdefault(name, {})
                prev = old.get(name, {})
                for metric, value in counts.items():
                    acc[metric] = acc.get(metric, 0) + value - prev.get(metric, 0)
        out[kind] = total
    return out


def summarize(d: dict[str, dict[str, dict[str, int]]], flows: int) -> dict[str, Any]:
    """Per-flow figures from a :func:`delta`: statements, transactions, fsyncs; by database / file."""
    n = max(1, flows)
    sql = d.get("sql", {})
    sync = d.get("sync", {})

    def tx(c: dict[str, int]) -> dict[str, int]:
        return {"all": c.get("commit", 0) + c.get("rollback", 0) + c.get("autocommit_writes", 0),
                "write": c.get("write_commits", 0) + c.get("autocommit_writes", 0)}

    by_db = {}
    for name, c in sorted(sql.items()):
        t = tx(c)
        by_db[name] = {"statements": round(c.get("statements", 0) / n, 2),
                       "write_transactions": round(t["write"] / n, 2), "transactions": round(t["all"] / n, 2),
                       "counts": c}
    by_file = {}
    for name, c in sorted(sync.items()):
        by_file[name] = {"syncs": round(sum(c.values()) / n, 2), "counts": c}
    statements = sum(c.get("statements", 0) for c in sql.values())
    writes = sum(tx(c)["write"] for c in sql.values())
    alltx = sum(tx(c)["all"] for c in sql.values())
    syncs = sum(sum(c.values()) for c in sync.values())
    return {"flows": flows, "statements_per_flow": round(statements / n, 2),
            "write_transactions_per_flow": round(writes / n, 2), "transactions_per_flow": round(alltx / n, 2),
            "fsyncs_per_flow": round(syncs / n, 2), "by_database": by_db, "syncs_by_file": by_file}
