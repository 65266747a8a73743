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


def send_wakeup(path: str | os.PathLike[str]) -> bool:
    """Send one wake-up datagram; False when nobody listens (never raises)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.sendto(b"!", os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


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

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s; True if woken. Drains every pending datagram."""
        try:
            readable, _, _ = select.select([self.sock], [], [], timeout)
        except InterruptedError:
            return False
        if not readable:
            return False
        woken = False
        while True:
            try:
                self.sock.recv(64)
                woken = True
            except (BlockingIOError, InterruptedError):
                return woken
            except OSError:
                return woken

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self, unlink: bool = True) -> None:
        self.sock.close()
        if unlink:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
