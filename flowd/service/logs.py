"""Logging set-up for the daemon: the systemd journal with structured fields, or stderr.

Under systemd (``$JOURNAL_STREAM`` set) records go to journald with ``FLOW_ID``,
``ROUTINE`` and ``TASK`` fields taken from the record's ``extra`` and a priority per
level: through python-systemd when it is installed, else through ``flowd.service.journal``,
which speaks the same native protocol itself. Otherwise they go to stderr. Never both:
journald already captures stderr, so two handlers would log every line twice.
python-systemd's ``JournalHandler`` silently drops records when there is no journald
socket, which is why the choice follows ``$JOURNAL_STREAM`` (and flowd's own handler
is used only where the socket exists).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from flowd.config import Config
from flowd.service import journal

JOURNAL_FIELDS = ("FLOW_ID", "ROUTINE", "TASK")
STDERR_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s%(fields)s"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_HANDLER_MARK = "_flowd_handler"
# Control characters (C0, DEL, C1), Unicode line/paragraph separators and lone surrogates.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def escape(text: str) -> str:
    """``text`` on one line: control characters, line separators and lone surrogates
    written as ``\\xNN`` / ``\\uNNNN``, so text from outside can never forge a log line."""
    return _UNSAFE.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape_lines(text: str) -> str:
    return "\n".join(escape(line) for line in text.split("\n"))


def format_exception_safely(exc: BaseException) -> str:
    """The traceback Python prints, with each exception's message escaped onto one line:
    a message may carry text from outside (a payload, a task's output)."""
    chain: list[tuple[str | None, BaseException]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    header: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((header, current))
        if current.__cause__ is not None:
            current, header = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, header = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for header, item in reversed(chain):
        if item.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(_escape_lines(entry.rstrip("\n")) + "\n" for entry in traceback.format_tb(item.__traceback__))
        parts.extend(escape(line.rstrip("\n")) + "\n"
                     for line in traceback.format_exception_only(type(item), item))
        if header is not None:
            parts.append(header)
    return "".join(parts).rstrip("\n")


class SafeFormatter(logging.Formatter):
    """A Formatter that escapes the message and the journal fields onto one line, and
    each exception message of a traceback (``escape``)."""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = None  # another formatter may have cached an unescaped traceback
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape(record.message)
        return super().formatMessage(safe)

    def formatException(self, ei: Any) -> str:
        if ei[1] is None:
            return super().formatException(ei)
        return format_exception_safely(ei[1])

    def formatStack(self, stack_info: str) -> str:
        return _escape_lines(stack_info)


class _EscapeFields(logging.Filter):
    """Escapes the journal fields (a routine or task name may come from outside)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in JOURNAL_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, escape(value))
        return True


class _FieldsFilter(_EscapeFields):
    """Shows the journal fields on stderr too, as ``[flow=12 routine=x task=y]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        parts = [f"{name.lower().replace('_id', '')}={getattr(record, name)}"
                 for name in JOURNAL_FIELDS if getattr(record, name, None) is not None]
        record.fields = f" [{' '.join(parts)}]" if parts else ""
        return True


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return _native_journal_handler()
    # JournalHandler passes every upper-case attribute of the record (our ``extra``
    # FLOW_ID/ROUTINE/TASK) as a journal field, and maps the level to PRIORITY.
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="flowd")
    handler.setFormatter(SafeFormatter("%(name)s: %(message)s"))
    handler.addFilter(_EscapeFields())
    return handler


def _native_journal_handler() -> logging.Handler | None:
    if not os.path.exists(journal.JOURNAL_SOCKET):
        return None
    handler: logging.Handler = journal.JournalHandler(identifier="flowd")
    handler.setFormatter(SafeFormatter("%(name)s: %(message)s"))
    handler.addFilter(_EscapeFields())
    return handler


def setup_logging(config: Config, env: Mapping[str, str] | None = None) -> str:
    """Install flowd's one handler on the root logger; returns ``"journal"`` or ``"stderr"``.

    Calling it again (SIGHUP) replaces the handler and applies the new level.
    """
    env = os.environ if env is None else env
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    handler = _journal_handler() if env.get("JOURNAL_STREAM") else None
    kind = "journal"
    if handler is None:
        kind = "stderr"
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter(STDERR_FORMAT))
        handler.addFilter(_FieldsFilter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    set_level(config.flowd.log_level)
    return kind


def set_level(name: str) -> None:
    """Apply ``[flowd] log_level``; paho and huey stay at WARNING unless debugging."""
    level = _LEVELS.get(name, logging.INFO)
    logging.getLogger().setLevel(level)
    for noisy in ("huey", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)
    logging.getLogger("peewee").setLevel(logging.WARNING)  # its DEBUG is every SQL statement
