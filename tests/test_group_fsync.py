"""The durability point shared across processes (flowd.store.durability), on the power-cut
filesystem: a fsync from any process covers every commit made before it, one skipped
because another process synced never loses a commit, one with nothing new to cover
costs nothing, and making something durable never drops the SQLite locks its own
process holds."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from lossyfs import LossyMount
from test_lossyfs import cut_and_remount, lossy  # noqa: F401 - the fixture

WRITER = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode = wal")
    conn.execute("PRAGMA synchronous = NORMAL")   # as flowd's at normal: no fsync in COMMIT
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, pad BLOB)")
    print("ready", flush=True)
    for line in sys.stdin:
        for _ in range(int(line)):
            conn.execute("INSERT INTO t (pad) VALUES (randomblob(500))")
        print("ok", flush=True)
""")

SYNCER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from flowd.store.durability import Durability
    point = Durability()
    point.configure(Path(sys.argv[1]), "normal")
    point.sync()
    print(point.fsyncs, point.skipped)
""")

# A reader holding a read transaction (a lock on the -shm file) while its process makes
# something durable; argv[2] "shm" also opens and closes the -shm itself, as a bug would.
READER = textwrap.dedent("""
    import os, sqlite3, sys
    from pathlib import Path
    from flowd.store.durability import Durability
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM t").fetchone()   # the read lock on the snapshot
    point = Durability()
    point.configure(Path(sys.argv[1]), "normal")
    point.sync()
    if sys.argv[2] == "shm":
        os.close(os.open(sys.argv[1] + "-shm", os.O_RDONLY))
    print("holding", flush=True)
    sys.stdin.readline()
""")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Writer:
    """A process holding one connection open (no checkpoint at close: it is killed)."""

    def __init__(self, db: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.read() == "ready"

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def commit(self, rows: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{rows}\n")
        self.proc.stdin.flush()
        assert self.read() == "ok"

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def writer(lossy: LossyMount) -> Iterator[Writer]:  # noqa: F811 - the fixture imported above
    found = Writer(lossy.mountpoint / "shared.db")
    yield found
    if found.proc.poll() is None:
        found.kill()


def sync_from_another_process(db: Path) -> tuple[int, int]:
    """(fsyncs, skipped) of one make_durable in a new process."""
    out = subprocess.run([sys.executable, "-c", SYNCER, str(db)], capture_output=True, text=True, env=env(),
                         timeout=60, check=True)
    fsyncs, skipped = out.stdout.split()
    return int(fsyncs), int(skipped)


def rows_after_cut(lossy: LossyMount, db: Path) -> int:  # noqa: F811
    cut_and_remount(lossy)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


def test_a_sync_from_any_process_covers_the_commits_of_the_others(lossy: LossyMount, writer: Writer) -> None:  # noqa: F811
    db = lossy.mountpoint / "shared.db"
    writer.commit(100)
    assert sync_from_another_process(db) == (1, 0)
    assert sync_from_another_process(db) == (0, 1)  # nobody committed since: skipped
    writer.commit(100)
    assert sync_from_another_process(db) == (1, 0)  # new frames: synced, not skipped
    writer.kill()
    assert rows_after_cut(lossy, db) == 200


def test_a_stale_record_never_skips_a_fsync(lossy: LossyMount, writer: Writer) -> None:  # noqa: F811
    db = lossy.mountpoint / "shared.db"
    writer.commit(50)
    Path(f"{db}-synced").write_bytes(b"\x00" * 24)
    assert sync_from_another_process(db) == (1, 0)
    Path(f"{db}-synced").write_bytes(b"garbage")
    writer.commit(50)
    assert sync_from_another_process(db) == (1, 0)
    writer.kill()
    assert rows_after_cut(lossy, db) == 100


def test_without_a_sync_the_cut_takes_the_commits(lossy: LossyMount, writer: Writer) -> None:  # noqa: F811
    # The check above can fail: commits nobody synced are gone after the cut.
    db = lossy.mountpoint / "shared.db"
    writer.commit(100)
    assert sync_from_another_process(db) == (1, 0)
    writer.commit(100)
    writer.kill()
    assert rows_after_cut(lossy, db) == 100


def checkpoint_while_a_reader_holds(tmp_path: Path, mode: str) -> tuple[int, int, int]:
    db = tmp_path / f"{mode}.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = wal")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, pad BLOB)")
    conn.execute("INSERT INTO t (pad) VALUES (randomblob(500))")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "holding"
        conn.execute("INSERT INTO t (pad) VALUES (randomblob(500))")  # a frame the reader's snapshot predates
        busy, log, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return int(busy), int(log), int(done)
    finally:
        assert reader.stdin is not None
        reader.stdin.close()
        reader.wait(30)
        conn.close()


def test_making_durable_keeps_the_locks_sqlite_holds_in_the_same_process(tmp_path: Path) -> None:
    # A reader's snapshot must keep the WAL from being reset under it: the checkpoint
    # reports busy. Closing a descriptor of the -shm in the reader's process drops its
    # lock (POSIX locks are per process and inode), and the checkpoint then truncates
    # the WAL under a live reader: the control proves the check sees it.
    assert checkpoint_while_a_reader_holds(tmp_path, "flowd")[0] == 1
    assert checkpoint_while_a_reader_holds(tmp_path, "shm")[0] == 0
