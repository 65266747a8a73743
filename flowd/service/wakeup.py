"""Wake a sleeping reader in another process with one datagram on a Unix socket.

The reader binds the socket; writers send a byte after they commit work. Nobody
listening (daemon stopped) is normal: the datagram is dropped and the work waits in
the database. A full socket buffer means the reader is already awake with work queued.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

_sender: tuple[int, socket.socket] | None = None


def send_wakeup(path: str | os.PathLike[str]) -> bool:
    """Send one wake-up datagram; False when nobody listens (never raises).

    One unbound socket per process serves every call (it is on the per-step path).
    """
    global _sender
    if _sender is None or _sender[0] != os.getpid():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        _sender = (os.getpid(), sock)
    try:
        _sender[1].sendto(b"!", os.fspath(path))
        return True
    except OSError:
        return False


def drain(sock: socket.socket) -> bool:
    """Read everything waiting on the non-blocking ``sock`` (wake-ups: their bytes mean
    nothing); True if there was something."""
    woken = False
    while True:
        try:
            if not sock.recv(64):
                return woken  # a stream socket whose peer closed
            woken = True
        except OSError:  # BlockingIOError: nothing more; InterruptedError, or the socket is gone
            return woken


class WakeSocket:
    """The reading end: ``wait(timeout)`` returns early when a wake-up arrives.

    Bind it before forking readers: every forked child shares the one socket and a
    datagram wakes whichever child reads it first.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.fspath(self.path))
        self.sock.setblocking(False)

    @classmethod
    def adopt(cls, path: str | os.PathLike[str], fd: int) -> WakeSocket:
        """The socket bound at ``path`` by another process, inherited as descriptor ``fd``."""
        wake = cls.__new__(cls)
        wake.path = Path(path)
        wake.sock = socket.socket(fileno=fd)
        wake.sock.setblocking(False)
        return wake

    def wait(self, timeout: float, also: int | None = None) -> bool:
        """Block up to ``timeout`` s, or until file descriptor ``also`` is readable;
        True if woken by a datagram. Drains every pending datagram."""
        try:
            watched: list[int] = [self.sock.fileno()] if also is None else [self.sock.fileno(), also]
            readable, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            return False
        if self.sock.fileno() not in readable:
            return False
        return self.drain()

    def drain(self) -> bool:
        """Read every pending datagram without waiting; True if there was one."""
        return drain(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, unlink: bool = True) -> None:
        self.sock.close()
        if unlink:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
