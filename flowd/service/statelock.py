"""The state folder's lock: one daemon per folder, and ``flowctl db recover`` only while
none runs. Its own module, so the store can take it without the daemon's wiring."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from flowd.errors import FlowdError, StoreUnavailable

LOCK_FILE = "flowd.pid"


def lock_state_dir(folder: Path, purpose: str | None = None) -> int:
    """Take the state folder's lock (one daemon per folder; ``flowctl db recover`` takes it too).

    A POSIX lock: forked children do not inherit it, and the kernel drops it when this
    process dies. Raises FlowdError when someone holds it (StoreUnavailable naming the
    daemon when ``purpose`` says what flowctl wanted to do).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreUnavailable(f"cannot use the state folder {folder}: {exc.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if purpose:
            raise StoreUnavailable(f"flowd (pid {other}) is running with state_dir {folder}; stop it first "
                                   f"(systemctl stop flowd), then {purpose}") from None
        raise FlowdError(f"another flowd (pid {other}) is already running with state_dir {folder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_pid(folder: Path) -> int | None:
    """The pid of the daemon holding ``folder``'s lock, or None when none runs there.

    The pid written in the lock file is believed only while its lock is held: after a
    kill -9 the file still names a pid that may now be another process.
    """
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        return None  # we got the lock: nobody holds it
    finally:
        os.close(fd)


def unlock_state_dir(fd: int) -> None:
    """Release :func:`lock_state_dir`'s lock."""
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
