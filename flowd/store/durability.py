"""The SQLite file's write lock and its durability point, shared by every flowd process.

Every SQLite connection runs at ``PRAGMA synchronous = NORMAL``: a commit leaves its WAL
frames in the page cache, and one ``fsync`` of the WAL file (from any process) makes
every commit made before it durable. A checkpoint syncs the WAL before it copies pages
into the database and syncs the database after, so frames a later writer overwrites are
already safe, and the file is never left inconsistent.

The fsync happens in :func:`make_durable`, after the commit has released the write lock,
not inside COMMIT as SQLite's FULL would do it: the next writer does not wait for the
disk (on an SD card, milliseconds). It is shared three ways:

- threads of one process that ask while a fsync runs wait for the next one, which covers
  them all;
- a process skips the fsync when no commit was made since the last one, by any process:
  the WAL-index header (the ``-shm`` file, https://www.sqlite.org/walformat.html) names
  the last committed frame, and after each fsync the frame it covered is written to
  ``<db>-synced``. A worker syncs its round before it tells the daemon about it; the
  daemon's publisher then finds nothing left to sync;
- when in doubt (no ``-shm``, a header being rewritten, a record unreadable) it syncs.

The ``-shm`` is read through one descriptor per process, opened once and never closed
while its file exists: POSIX locks belong to the process and the inode, so closing any
descriptor of the file would drop every lock SQLite's connections in this process hold
on it, and another process could then rebuild the WAL index under a live connection
(commits lost: the power-cut suite caught exactly that, and ``tests/test_group_fsync.py``
shows it). The database file itself is never opened here.

``[database] synchronous`` decides only who asks: at ``full`` also every worker round
(a step's output is on disk before the flow's next step starts,
:func:`make_step_durable`); at ``normal`` only what makes something visible (SPEC 4.5).
PostgreSQL commits are durable: nothing to do.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HEADER = 48            # one copy of the WAL-index header; two copies open the -shm file
_KEY = slice(16, 40)    # mxFrame, nPage, the last frame's checksum and the WAL salts


class Durability:
    """The durability point of this process (see the module)."""

    def __init__(self) -> None:
        self.wal_path: str | None = None   # SQLite only
        self.each_step = True              # [database] synchronous = full
        self._lock = threading.Lock()      # one fsync at a time
        self._gen_lock = threading.Lock()
        self._next_gen = 0                 # generation the next fsync to start gets
        self._synced_gen = -1              # latest generation whose fsync finished
        self._dir_synced: tuple[int, int] | None = None  # WAL inode whose directory entry was synced
        self.fsyncs = 0
        self.skipped = 0
        self._shm_fd: int | None = None   # never closed while the file exists (see the module)

    def configure(self, path: Path | None, synchronous: str) -> None:
        self.wal_path = f"{path}-wal" if path is not None else None
        self.each_step = synchronous == "full"
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
            self._sync_wal(self.wal_path)
            self._synced_gen = generation

    def _sync_wal(self, wal_path: str) -> None:
        base = wal_path[:-len("-wal")]
        committed = self._last_commit(base + "-shm")  # read before the fsync: it covers this frame
        if committed is not None and committed == _read_record(base + "-synced"):
            self.skipped += 1
            return  # some process synced it already, and nobody committed since
        if not self._fsync_wal(wal_path):
            return
        if committed is not None:
            _write_record(base + "-synced", committed)

    def _last_commit(self, shm_path: str) -> bytes | None:
        """What names the last committed WAL frame, from the WAL-index header; None when
        it cannot be read or SQLite is rewriting it (its two copies differ)."""
        fd = self._shm_fd
        try:
            if fd is not None and os.fstat(fd).st_nlink == 0:
                # The last connection anywhere closed and removed it: no lock of ours is on
                # that inode any more, so this descriptor may go; a new file has a new inode.
                os.close(fd)
                fd = self._shm_fd = None
            if fd is None:
                fd = self._shm_fd = os.open(shm_path, os.O_RDONLY | os.O_CLOEXEC)
            header = os.pread(fd, 2 * _HEADER, 0)
        except OSError:
            return None
        if len(header) < 2 * _HEADER or header[:_HEADER] != header[_HEADER:] or not header[12]:  # isInit
            return None
        return header[_KEY]

    def _fsync_wal(self, wal_path: str) -> bool:
        try:
            fd = os.open(wal_path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # no WAL: the last connection checkpointed (synced) everything and removed it
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
        return True


def _read_record(path: str) -> bytes | None:
    try:  # no Python file object: it costs more than the three system calls
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        record = os.pread(fd, 64, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return record if len(record) == _KEY.stop - _KEY.start else None


def _write_record(path: str, committed: bytes) -> None:
    """One small write at offset 0, no fsync: after a power cut the record may be stale,
    the WAL-index header is rebuilt anyway, and a stale record only costs a fsync."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.pwrite(fd, committed, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    published result, a reply). A no-op on PostgreSQL.
    """
    durability.sync()


def make_step_durable() -> None:
    """After a worker's round commit, before the next steps start: at ``synchronous =
    full`` the outputs just committed are on disk first, so a power cut re-runs at most
    the steps that were running; at ``normal`` the next durability point covers them."""
    if durability.each_step:
        durability.sync()
