"""Self-checks of the power-cut filesystem (tests/lossyfs.py): it must drop exactly the
unsynced writes, host SQLite in WAL mode shared by several processes, and catch the two
failures the power-cut suite looks for (lost commits at NORMAL, corruption after a
checkpoint under OFF) before its silence about flowd can mean anything."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from lossyfs import LossyMount, fuse_missing


@pytest.fixture
def lossy(tmp_path: Path) -> Iterator[LossyMount]:
    """A mounted lossyfs over ``tmp_path/backing`` on ``tmp_path/mnt``; unmounted at teardown."""
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    mount = LossyMount(tmp_path / "backing", tmp_path / "mnt")
    mount.mount()
    yield mount
    mount.close()


def cut_and_remount(mount: LossyMount) -> dict[str, object]:
    report = mount.cut()
    mount.mount()
    return report


def run_until_killed(code: str, timeout: float = 60) -> None:
    """Run ``code`` in a new Python process that prints 'ready' when done, then SIGKILL it
    there: nothing it opened is closed cleanly (no checkpoint at close), as at a crash."""
    script = code + "\nprint('ready', flush=True)\nimport time\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"writer failed: {line}{proc.stderr.read() if proc.stderr else ''}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def test_a_cut_keeps_exactly_the_synced_bytes(lossy: LossyMount) -> None:
    mnt = lossy.mountpoint
    with open(mnt / "synced", "wb", buffering=0) as f:  # fsynced, then more appended without a sync
        f.write(b"kept")
        os.fsync(f.fileno())
        f.write(b" lost")
    with open(mnt / "overwritten", "wb", buffering=0) as f:  # a partial overwrite after the fsync
        f.write(b"A" * 10_000)
        os.fdatasync(f.fileno())
        f.seek(4090)
        f.write(b"B" * 20)
    with open(mnt / "shrunk", "wb", buffering=0) as f:  # truncated below, then past, its synced size
        f.write(b"C" * 9000)
        os.fsync(f.fileno())
        f.truncate(10)
    with open(mnt / "grown", "wb", buffering=0) as f:
        f.write(b"D" * 100)
        os.fsync(f.fileno())
        f.truncate(50_000)
    (mnt / "never-synced").write_bytes(b"gone")
    with open(mnt / "reopened", "wb", buffering=0) as f:  # synced, then rewritten through O_TRUNC
        f.write(b"old")
        os.fsync(f.fileno())
    (mnt / "reopened").write_bytes(b"new contents")
    (mnt / "tmp").write_bytes(b"renamed without a sync")  # the classic zero-length file
    os.rename(mnt / "tmp", mnt / "final")
    with open(mnt / "fully-synced", "wb", buffering=0) as f:
        f.write(b"E" * 5000)
        os.fsync(f.fileno())

    report = cut_and_remount(lossy)
    assert report["cut"] is True and report["files"] == 7

    assert (mnt / "synced").read_bytes() == b"kept"
    assert (mnt / "overwritten").read_bytes() == b"A" * 10_000
    assert (mnt / "shrunk").read_bytes() == b"C" * 9000
    assert (mnt / "grown").read_bytes() == b"D" * 100
    assert (mnt / "never-synced").read_bytes() == b""
    assert (mnt / "reopened").read_bytes() == b"old"
    assert (mnt / "final").read_bytes() == b"" and not (mnt / "tmp").exists()  # metadata is durable at once
    assert (mnt / "fully-synced").read_bytes() == b"E" * 5000
    # A second cut with nothing written loses nothing more.
    assert cut_and_remount(lossy)["files"] == 0
    assert (mnt / "overwritten").read_bytes() == b"A" * 10_000


def test_shared_mmap_and_unix_sockets_work_across_processes(lossy: LossyMount) -> None:
    # SQLite's -shm is mmap'd MAP_SHARED by every connection: a write through one
    # process's mapping must be seen through another's (no direct_io on this mount).
    path = lossy.mountpoint / "shared"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mine:
        mine[100:105] = b"world"
        subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import mmap
            with open({str(path)!r}, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
                assert m[100:105] == b"world", m[100:105]
                m[0:5] = b"hello"
        """)], check=True, timeout=30)
        assert mine[0:5] == b"hello"
    # flowd's wake-up sockets may live on the mount.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as reader, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as writer:
        reader.bind(str(lossy.mountpoint / "wake.sock"))
        writer.sendto(b"!", str(lossy.mountpoint / "wake.sock"))
        reader.settimeout(5)
        assert reader.recv(8) == b"!"


def test_sqlite_wal_locks_work_across_processes(lossy: LossyMount) -> None:
    # Three processes increment one counter in IMMEDIATE transactions: any broken lock or
    # incoherent -shm shows as a lost update, "locked" errors past the timeout, or corruption.
    db = lossy.mountpoint / "counter.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("CREATE TABLE c (v INTEGER)")
        conn.execute("INSERT INTO c VALUES (0)")
    conn.close()
    code = textwrap.dedent(f"""
        import sqlite3
        conn = sqlite3.connect({str(db)!r}, timeout=30, isolation_level=None)
        for _ in range(300):
            conn.execute("BEGIN IMMEDIATE")
            (v,) = conn.execute("SELECT v FROM c").fetchone()
            conn.execute("UPDATE c SET v = ?", (v + 1,))
            conn.execute("COMMIT")
        conn.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT v FROM c").fetchone() == (900,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


def write_rows(db: Path, synchronous: str, rows: int) -> None:
    """One committed transaction per row (about a page each), then kill -9."""
    run_until_killed(textwrap.dedent(f"""
        import sqlite3
        conn = sqlite3.connect({str(db)!r}, isolation_level=None)
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, pad BLOB)")
        conn.execute("PRAGMA synchronous = {synchronous}")
        for i in range({rows}):
            conn.execute("INSERT INTO t (pad) VALUES (randomblob(1000))")
    """))


def read_back(db: Path) -> tuple[list[int], str]:
    conn = sqlite3.connect(db)
    try:
        ids = [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
        return ids, conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_sqlite_wal_normal_loses_commits_full_keeps_them(lossy: LossyMount) -> None:
    # 3,000 rows commit past SQLite's automatic checkpoint (1,000 WAL pages) a few times;
    # at NORMAL only a checkpoint syncs the WAL, so the cut takes the commits after the last
    # one; the database stays intact and what is left is a prefix. At FULL nothing is lost.
    rows = 3000
    write_rows(lossy.mountpoint / "normal.db", "NORMAL", rows)
    write_rows(lossy.mountpoint / "full.db", "FULL", rows)
    cut_and_remount(lossy)

    ids, integrity = read_back(lossy.mountpoint / "normal.db")
    assert integrity == "ok"
    assert 0 < len(ids) < rows, f"NORMAL kept {len(ids)} of {rows} commits"
    assert ids == list(range(1, len(ids) + 1))
    ids, integrity = read_back(lossy.mountpoint / "full.db")
    assert (len(ids), integrity) == (rows, "ok")


def checkpoint_then_restart_the_wal(db: Path, relaxed: str) -> None:
    """Commits and a checkpoint at ``relaxed``, then FULL commits that restart the WAL."""
    run_until_killed(textwrap.dedent(f"""
        import sqlite3
        conn = sqlite3.connect({str(db)!r}, isolation_level=None)
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, pad BLOB)")
        conn.execute("CREATE INDEX t_pad ON t (pad)")
        conn.execute("PRAGMA synchronous = {relaxed}")
        for i in range(200):
            conn.execute("INSERT INTO t (pad) VALUES (randomblob(800))")
        busy, log, done = conn.execute("PRAGMA wal_checkpoint").fetchone()
        assert busy == 0 and log == done, (busy, log, done)
        conn.execute("PRAGMA synchronous = FULL")
        for i in range(50):  # restarts the WAL from its start, and syncs it
            conn.execute("INSERT INTO t (pad) VALUES (randomblob(800))")
    """))


def test_a_checkpoint_under_synchronous_off_corrupts_the_database(lossy: LossyMount) -> None:
    # The bug of issue 11: under OFF the checkpoint copies pages into the database file
    # without any fsync; the next FULL commit restarts the WAL and syncs it, so after the
    # cut those pages exist nowhere durable. The same sequence at NORMAL is safe.
    checkpoint_then_restart_the_wal(lossy.mountpoint / "off.db", "OFF")
    checkpoint_then_restart_the_wal(lossy.mountpoint / "normal.db", "NORMAL")
    cut_and_remount(lossy)

    try:
        ids, integrity = read_back(lossy.mountpoint / "off.db")
    except sqlite3.DatabaseError as exc:  # the file cannot even be read
        ids, integrity = [], str(exc)
    assert integrity != "ok", f"the checkpoint under OFF left an intact database ({len(ids)} rows)"
    ids, integrity = read_back(lossy.mountpoint / "normal.db")
    assert (len(ids), integrity) == (250, "ok")
