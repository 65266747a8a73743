"""Logging set-up for the daemon: the systemd journal with structured fields, or stderr.

Under systemd (``$JOURNAL_STREAM`` set) records go to journald with ``FLOW_ID``,
``ROUTINE`` and ``TASK`` fields taken from the record's ``extra`` and a priority per
level: through python-systemd when it is installed, else through ``flowd.journal``,
which speaks the same native protocol itself. Otherwise they go to stderr. Never both:
journald already captures stderr, so two handlers would log every line twice.
python-systemd's ``JournalHandler`` silently drops records when there is no journald
socket, which is why the choice follows ``$JOURNAL_STREAM`` (and flowd's own handler
is used only where the socket exists).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from flowd import journal
from flowd.config import Config

JOURNAL_FIELDS = ("FLOW_ID", "ROUTINE", "TASK")
STDERR_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s%(fields)s"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_HANDLER_MARK = "_flowd_handler"


class _FieldsFilter(logging.Filter):
    """Shows the journal fields on stderr too, as ``[flow=12 routine=x task=y]``."""

    def filter(self, record: logging.LogRecord) -> bool:
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
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler


def _native_journal_handler() -> logging.Handler | None:
    if not os.path.exists(journal.JOURNAL_SOCKET):
        return None
    handler: logging.Handler = journal.JournalHandler(identifier="flowd")
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
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
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
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
