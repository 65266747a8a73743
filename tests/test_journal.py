"""flowd.service.journal: the journal's native protocol, received by a real AF_UNIX datagram socket.

The receiving end below decodes what journald would (systemd.io/JOURNAL_NATIVE_PROTOCOL),
including an entry passed as a sealed memfd. tests/test_booted_debian.py shows the same
entries arriving in a real journald.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowd.service.journal import JournalHandler, JournalSender, encode_entry, is_field_name, priority_of


def decode_entry(data: bytes) -> dict[str, bytes]:
    """journald's reading of one entry: KEY=value lines, or KEY, length, bytes."""
    fields: dict[str, bytes] = {}
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value
            i = end + 1
        else:
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            fields[line.decode()] = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n", "a binary field ends with a newline"
            i = end + 10 + size
    return fields


class JournalSocket:
    """journald's end: one bound datagram socket; entries come inline or as a memfd."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(5)
        self.sealed: list[int] = []

    def receive(self) -> dict[str, bytes]:
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(struct.calcsize("i")))
        for level, kind, payload in ancillary:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            (fd,) = struct.unpack("i", payload[:struct.calcsize("i")])
            try:
                self.sealed.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return decode_entry(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[JournalSocket]:
    sock = JournalSocket(tmp_path / "journal.sock")
    yield sock
    sock.close()


def test_the_decoder_reads_both_forms_and_catches_a_bad_length() -> None:
    # The harness first: a hand-made entry in both forms reads back; a wrong length does not.
    good = b"MESSAGE=hi\nTRACE\n" + struct.pack("<Q", 3) + b"a\nb\n"
    assert decode_entry(good) == {"MESSAGE": b"hi", "TRACE": b"a\nb"}
    with pytest.raises((AssertionError, ValueError, struct.error)):
        decode_entry(b"TRACE\n" + struct.pack("<Q", 2) + b"a\nb\n")


def test_values_with_newlines_use_the_length_form_and_bad_names_are_refused() -> None:
    entry = encode_entry({"MESSAGE": "line 1\nline 2", "FLOW_ID": 12, "ROUTINE": "tür"})
    assert decode_entry(entry) == {"MESSAGE": b"line 1\nline 2", "FLOW_ID": b"12", "ROUTINE": "tür".encode()}
    assert b"MESSAGE\n" in entry and b"FLOW_ID=12\n" in entry
    for bad in ("_PID", "flow_id", "1ST", "A-B", "", "X" * 65):
        assert not is_field_name(bad)
        with pytest.raises(ValueError, match="not a journal field name"):
            encode_entry({bad: "x"})
    assert is_field_name("FLOW_ID") and is_field_name("X" * 64)


def test_priorities_follow_the_levels() -> None:
    # journalctl -p warning shows priorities 0..4: warnings and errors must land there.
    assert [priority_of(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                             logging.CRITICAL)] == [7, 6, 4, 3, 2]
    assert priority_of(logging.WARNING + 5) == 4 and priority_of(5) == 7


def test_handler_sends_fields_priority_and_a_message_without_time_or_level(journal_socket: JournalSocket) -> None:
    handler = JournalHandler(identifier="flowd", path=journal_socket.path)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log = logging.getLogger("flowd.test_journal")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("flow %d step %d/%d (%s): failed", 7, 2, 3, "read",
                    extra={"FLOW_ID": 7, "ROUTINE": "greenhouse", "TASK": "read"})
        entry = journal_socket.receive()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("while testing")
        failed = journal_socket.receive()
    finally:
        log.removeHandler(handler)
        handler.close()
    assert entry["MESSAGE"] == b"flowd.test_journal: flow 7 step 2/3 (read): failed"
    assert entry["PRIORITY"] == b"4" and entry["SYSLOG_IDENTIFIER"] == b"flowd"
    assert (entry["FLOW_ID"], entry["ROUTINE"], entry["TASK"]) == (b"7", b"greenhouse", b"read")
    assert entry["LOGGER"] == b"flowd.test_journal" and entry["CODE_FUNC"] == b"test_handler_sends_fields_" \
        b"priority_and_a_message_without_time_or_level"
    assert failed["PRIORITY"] == b"3"
    assert failed["MESSAGE"].startswith(b"flowd.test_journal: while testing\nTraceback")
    assert b"RuntimeError: boom" in failed["MESSAGE"]


def test_an_entry_over_the_datagram_limit_goes_in_a_sealed_memfd(journal_socket: JournalSocket) -> None:
    big = "x" * 400_000
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # Proof that one datagram cannot carry it, so the memfd path is what is tested.
        with pytest.raises(OSError, match="too long"):
            plain.sendto(encode_entry({"MESSAGE": big}), journal_socket.path)
    finally:
        plain.close()
    sender = JournalSender(journal_socket.path)
    try:
        sender.send({"MESSAGE": big, "FLOW_ID": 3})
        entry = journal_socket.receive()
    finally:
        sender.close()
    assert entry == {"MESSAGE": big.encode(), "FLOW_ID": b"3"}
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    assert journal_socket.sealed == [seals]


def test_without_journald_the_line_goes_to_stderr_with_its_priority(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = JournalHandler(path=str(tmp_path / "no-journald.sock"))
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    record = logging.LogRecord("flowd.x", logging.ERROR, __file__, 1, "flow %d lost", (4,), None)
    handler.emit(record)
    handler.close()
    assert capsys.readouterr().err == "<3>flowd.x: flow 4 lost\n"


def test_journal_stream_without_python_systemd_or_journald_logs_to_stderr(
        tmp_path: Path, restore_root_logger: None) -> None:
    # Without python-systemd flowd uses its own handler, but only where journald's socket
    # is: a handler with nobody listening would lose every line.
    from flowd.config import build_config
    from flowd.service import journal
    from flowd.service.logs import setup_logging

    hidden = sys.modules.get("systemd.journal", False)
    sys.modules["systemd.journal"] = None  # type: ignore[assignment]  # what "import" takes for "not installed"
    try:
        kind = setup_logging(build_config({}, env={}), env={"JOURNAL_STREAM": "8:1"})
        handlers = logging.getLogger().handlers
    finally:
        if hidden is False:
            del sys.modules["systemd.journal"]
        else:
            sys.modules["systemd.journal"] = hidden  # type: ignore[assignment]
    expected = "journal" if os.path.exists(journal.JOURNAL_SOCKET) else "stderr"
    assert kind == expected
    if expected == "journal":
        assert any(isinstance(h, journal.JournalHandler) for h in handlers)


def test_flowds_native_journal_handler_escapes_text_from_outside(
        journal_socket: JournalSocket, monkeypatch: pytest.MonkeyPatch) -> None:
    # The handler setup_logging installs without python-systemd: a newline in a routine
    # name or a message (a payload's text) must not start a forged line in MESSAGE or a field.
    from flowd.service import journal, logs

    monkeypatch.setattr(journal, "JOURNAL_SOCKET", journal_socket.path)
    monkeypatch.setattr(journal.JournalHandler, "__init__", _pointing_at(journal_socket.path))
    handler = logs._native_journal_handler()
    assert handler is not None
    log = logging.getLogger("flowd.test_journal_escape")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("refused %s", "x\n2026-12-01 00:00:00 ERROR forged", extra={"ROUTINE": "r\nPRIORITY=0"})
        entry = journal_socket.receive()
    finally:
        log.removeHandler(handler)
        handler.close()
    assert entry["MESSAGE"] == b"flowd.test_journal_escape: refused x\\x0a2026-12-01 00:00:00 ERROR forged"
    assert entry["ROUTINE"] == b"r\\x0aPRIORITY=0" and entry["PRIORITY"] == b"4"


def _pointing_at(path: str) -> object:
    original = JournalHandler.__init__

    def init(self: JournalHandler, *args: object, **kwargs: object) -> None:
        kwargs["path"] = path
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    return init
