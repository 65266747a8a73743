"""The durability point shared across processes (flowd.durability), on the power-cut
filesystem: a fsync skipped because another process synced must never lose a commit,
and one with nothing new to cover costs no fsync."""

from __future__ import annotations

import json
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
    conn.execute("PRAGMA synchronous = NORMAL")   # as flowd's connections: no fsync in COMMIT
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, pad BLOB)")
    print("ready", flush=True)
    for line in sys.stdin:
        for _ in range(int(line)):
            conn.execute("INSERT INTO t (pad) VALUES (randomblob(500))")
        print("ok", flush=True)
""")

SYNCER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from flowd.durability import Durability
    point = Durability()
    point.configure(Path(sys.argv[1]), "normal")
    point.sync()
    print(json.dumps({"fsyncs": point.fsyncs, "skipped": point.skipped}))
""")


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


def sync_from_another_process(db: Path) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SYNCER, str(db)], capture_output=True, text=True, env=env,
                         timeout=60, check=True)
    counts: dict[str, int] = json.loads(out.stdout)
    return counts


def rows_after_cut(lossy: LossyMount, db: Path) -> int:  # noqa: F811
    cut_and_remount(lossy)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


def test_a_sync_from_any_process_covers_every_commit_and_is_skipped_when_nothing_is_new(
        lossy: LossyMount, writer: Writer) -> None:  # noqa: F811
    db = lossy.mountpoint / "shared.db"
    writer.commit(100)
    assert sync_from_another_process(db) == {"fsyncs": 1, "skipped": 0}
    assert sync_from_another_process(db) == {"fsyncs": 0, "skipped": 1}  # nobody committed since
    writer.commit(100)
    assert sync_from_another_process(db) == {"fsyncs": 1, "skipped": 0}  # new frames: synced, not skipped
    writer.kill()
    assert rows_after_cut(lossy, db) == 200


def test_without_a_sync_the_cut_takes_the_commits(lossy: LossyMount, writer: Writer) -> None:  # noqa: F811
    # The check above can fail: commits nobody synced are gone after the cut.
    db = lossy.mountpoint / "shared.db"
    writer.commit(100)
    assert sync_from_another_process(db)["fsyncs"] == 1
    writer.commit(100)
    writer.kill()
    assert rows_after_cut(lossy, db) == 100


def test_a_stale_record_never_skips_a_fsync(lossy: LossyMount, writer: Writer) -> None:  # noqa: F811
    # A record left by an earlier WAL (a restart after a checkpoint changes the salts)
    # or garbage in the file: the header does not match, so the process syncs.
    db = lossy.mountpoint / "shared.db"
    writer.commit(50)
    Path(f"{db}-synced").write_bytes(b"\x00" * 24)
    assert sync_from_another_process(db) == {"fsyncs": 1, "skipped": 0}
    Path(f"{db}-synced").write_bytes(b"garbage")
    writer.commit(50)
    assert sync_from_another_process(db) == {"fsyncs": 1, "skipped": 0}
    writer.kill()
    assert rows_after_cut(lossy, db) == 100
