"""The systemd journal's native protocol, spoken directly, for when python-systemd is absent.

An install without ``libsystemd-dev`` cannot build python-systemd, yet journald still
wants structured entries: ``FLOW_ID``/``ROUTINE``/``TASK`` fields and a ``PRIORITY``
per record, not plain stdout lines. The protocol is small (systemd.io/JOURNAL_NATIVE_PROTOCOL):
one datagram of ``KEY=value`` lines to ``/run/systemd/journal/socket``, a value holding
a newline sent as ``KEY``, newline, 64-bit little-endian length, the bytes, newline. An
entry too big for one datagram goes in a sealed memfd whose descriptor is passed
instead (``SCM_RIGHTS``), which is what libsystemd's ``sd_journal_send`` does.

>>> handler = JournalHandler()
>>> logging.getLogger().addHandler(handler)
>>> logging.getLogger("flowd.engine.engine").warning("flow %d failed", 7, extra={"FLOW_ID": 7})
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog priorities (what journalctl -p filters on) for Python's levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7
# journald's rule for field names: upper-case letters, digits and '_', not starting with
# '_' (those are trusted fields journald sets itself) or a digit, at most 64 characters.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def priority_of(levelno: int) -> int:
    """The syslog priority for a logging level (WARNING -> 4, what ``journalctl -p warning`` shows)."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


def is_field_name(name: str) -> bool:
    """True when journald accepts ``name`` as a field a client may set."""
    return _FIELD_NAME.fullmatch(name) is not None


def encode_entry(fields: Mapping[str, object]) -> bytes:
    """One journal entry in the native wire format; raises ValueError for a bad field name."""
    out = bytearray()
    for name, value in fields.items():
        if not is_field_name(name):
            raise ValueError(f"'{name}' is not a journal field name (A-Z, 0-9 and _, not starting with _)")
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "backslashreplace")
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """Sends encoded entries to journald; one unconnected socket, so a restarted journald
    (a new socket file) is reached without reconnecting."""

    def __init__(self, path: str = JOURNAL_SOCKET):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, object]) -> None:
        """Send one entry; raises OSError when journald cannot be reached."""
        data = encode_entry(fields)
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_in_memfd(data)

    def _send_in_memfd(self, data: bytes) -> None:
        """An entry over the datagram size limit: pass a sealed memfd holding it."""
        fd = os.memfd_create("flowd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            # journald only trusts a memfd nobody can change any more.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


class JournalHandler(logging.Handler):
    """A logging handler writing native journal entries.

    ``MESSAGE`` is the formatted record (no time or level in it: journald keeps both);
    ``PRIORITY`` follows the level; ``LOGGER``, ``THREAD_NAME`` and ``CODE_*`` say where
    it came from; every upper-case attribute of the record (``extra={"FLOW_ID": 12}``)
    becomes a field of its own. When journald cannot be reached the line goes to stderr
    with a ``<priority>`` prefix, which journald's stream reader still understands.
    """

    def __init__(self, identifier: str = "flowd", path: str = JOURNAL_SOCKET):
        super().__init__()
        self.identifier = identifier
        self.sender = JournalSender(path)

    def fields_of(self, record: logging.LogRecord) -> dict[str, object]:
        """The journal entry for ``record``."""
        fields: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": priority_of(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for name, value in record.__dict__.items():
            if value is not None and is_field_name(name):
                fields[name] = value
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields_of(record)
            try:
                self.sender.send(fields)
            except OSError:
                sys.stderr.write(f"<{fields['PRIORITY']}>{fields['MESSAGE']}\n")
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sender.close()
        super().close()
