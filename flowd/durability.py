"""The SQLite file's write lock and its durability point, shared by every flowd process.

At ``[database] synchronous = full`` every commit syncs the WAL inside COMMIT, and
PostgreSQL commits are durable: :func:`make_durable` has nothing to do. At ``normal`` a
commit leaves its WAL frames in the page cache; one ``fsync`` of the WAL file (from any
process) makes every commit made before it durable. A checkpoint syncs the WAL before
it copies pages into the database and syncs the database after, so frames a later
writer overwrites are already safe. Threads that ask while a fsync runs wait for the
next one, which covers them all (group fsync).

What this module must never do: open and close SQLite's own ``-shm`` or database file.
POSIX locks belong to the process and the inode, so closing any descriptor of such a
file drops every lock SQLite's connection in this process holds on it; another process
may then rebuild the WAL index under a live connection, and commits are lost (the
power-cut suite caught exactly that when the WAL-index header was read here to let a
process skip a fsync another had made). The WAL file carries no locks.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Durability:
    """The durability point of this process (see the module)."""

    def __init__(self) -> None:
        self.wal_path: str | None = None   # set at synchronous = normal on SQLite only
        self._lock = threading.Lock()      # one fsync at a time
        self._gen_lock = threading.Lock()
        self._next_gen = 0                 # generation the next fsync to start gets
        self._synced_gen = -1              # latest generation whose fsync finished
        self._dir_synced: tuple[int, int] | None = None  # WAL inode whose directory entry was synced
        self.fsyncs = 0

    def configure(self, path: Path | None, synchronous: str) -> None:
        self.wal_path = f"{path}-wal" if path is not None and synchronous != "full" else None
        self._dir_synced = None

    def sync(self) -> None:
        if self.wal_path is None:
            return
        with self._gen_lock:
            wanted = self._next_gen  # a fsync that starts from now on covers my commits
        with self._lock:
            if self._synced_gen >= wanted:
                return
            with self._gen_lock:
                generation = self._next_gen
                self._next_gen += 1
            self._fsync_wal(self.wal_path)
            self._synced_gen = generation

    def _fsync_wal(self, wal_path: str) -> None:
        try:
            fd = os.open(wal_path, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: the last connection checkpointed (synced) everything and removed it
        try:
            os.fdatasync(fd)  # as SQLite syncs its WAL: the data and the size, not the times
            self.fsyncs += 1
            inode = os.fstat(fd)
            key = (inode.st_dev, inode.st_ino)
        finally:
            os.close(fd)
        if key != self._dir_synced:  # a new WAL file: its directory entry must survive too
            dir_fd = os.open(os.path.dirname(wal_path) or ".", os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self._dir_synced = key


class WriterLock:
    """The write lock of a SQLite file, taken before BEGIN IMMEDIATE: one ``flock`` per
    process (the file ``<db>-writer``) and one mutex per thread of the process.

    SQLite's own lock cannot be waited on: a busy writer is retried by sleeping, which
    costs statements, system calls and up to milliseconds of idle lock per try. A
    process blocked in ``flock`` sleeps in the kernel and wakes the moment the holder
    commits; the lock goes when its holder dies. Processes that do not take it (the
    sqlite3 shell) still meet SQLite's busy timeout. Without the file (no permission),
    writes fall back to that timeout alone.
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self._pid = 0
        self._fd: int | None = None
        self._mutex = threading.Lock()

    def configure(self, path: Path | None) -> None:
        self.path = f"{path}-writer" if path is not None else None
        self._pid, self._fd = 0, None

    def _file(self) -> int | None:
        if self._pid != os.getpid():  # a forked child: its own descriptor, its own flock
            self._pid, self._fd, self._mutex = os.getpid(), None, threading.Lock()
            if self.path is not None:
                try:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError:
                    self._fd = None
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        fd = self._file()
        with self._mutex:
            if fd is None:
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


durability = Durability()
writer_lock = WriterLock()


def make_durable() -> None:
    """Return once every commit made so far, by any process, survives a power cut.

    Call it before anything makes a change visible (SPEC 4.5: an acknowledgement, a
    published result, a reply). A no-op at ``synchronous = full`` and on PostgreSQL.
    """
    durability.sync()
