"""What every flowctl command shares: exit codes, argument types, the context (config,
database, output) and the sentences for a database that cannot be used.

Like the rest of flowctl, nothing heavy is imported before a command needs it.
"""

from __future__ import annotations

import argparse
import os
import sys

from flowd.errors import InputError
from flowd.states import STATES

# typing, json, datetime, shutil and sqlite3 cost ~20 ms together on a PC, several
# times that on a Pi: --help needs none of them, so they are imported where used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from flowd.config import Config
    from flowd.engine.engine import Engine

EXIT_OK, EXIT_FLOW_FAILED, EXIT_USAGE, EXIT_STORE = 0, 1, 2, 3
EXIT_WAIT_TIMEOUT, EXIT_INTERRUPTED = 124, 130


class UsageError(InputError):
    """The command line itself is wrong (argparse's complaints end up here)."""


# --------------------------------------------------------------------------- parsing helpers
def parse_value(text: str) -> Any:
    """A ``k=v`` value or a positional argument: JSON when it parses, else the string.

    NaN and Infinity stay strings: they cannot travel as JSON.
    """
    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    import json

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def parse_pairs(pairs: Sequence[str] | None, option: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; raises UsageError for a pair without '='."""
    result: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} {pair!r} is not key=value; write it like {option} city=Oslo "
                             f"or {option} 'limits={{\"max\": 3}}'")
        result[key.strip()] = parse_value(value)
    return result


def duration_arg(text: str) -> float:
    from flowd.config import parse_duration

    try:
        return parse_duration(parse_value(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole(text: str, not_whole: str, minimum: int, too_small: str) -> int:
    """``text`` as an int of at least ``minimum``, or argparse's error (``too_small`` may
    name the ``{value}``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(not_whole) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(too_small.format(value=value))
    return value


def count_arg(text: str) -> int:
    return _whole(text, f"must be a whole number, not {text!r}", 0, "must not be negative, not {value}")


def positive_arg(text: str) -> int:
    value = count_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def flow_id_arg(text: str) -> int:
    return _whole(text, f"a flow id is a whole number (see 'flowctl flows'), not {text!r}", 1,
                  "a flow id is a positive number, not {value}")


def state_arg(text: str) -> str:
    if text.upper() not in STATES:
        raise argparse.ArgumentTypeError(f"unknown state {text!r}; states are {', '.join(STATES)}")
    return text.upper()


# --------------------------------------------------------------------------- context
class Context:
    """What every command needs: the parsed arguments, the config, the database."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.json: bool = bool(args.json)
        self._config: Config | None = None
        self.fresh = False  # no database yet: reads show an empty one
        self.created: Any = None  # the database this command made (a Path)

    @property
    def config(self) -> Config:
        if self._config is None:
            from flowd.config import load_config

            self._config = load_config(self.args.config)
        return self._config

    def open_database(self, *, create: bool = False) -> None:
        """Open the database without the queue (reads; catalog changes).

        A SQLite file that is not there yet (flowd never ran with this configuration) is
        never made silently: ``create`` (a command that stores a task or routine) makes it
        and says so on stderr; a read answers from an empty database in memory, so there
        is simply nothing to list (``self.fresh``).
        """
        from flowd import api

        path = api.database_file(self.config.database)
        if path is not None and not path.exists():
            if not create:
                from flowd.config import DatabaseSection

                self.fresh = True
                api.open_database(DatabaseSection(url="sqlite:///:memory:"), create=True)
                return
            self.created = path
        api.open_database(self.config.database, create=create)

    def finish(self, succeeded: bool) -> None:
        """Say that the command made the database, or take back the one it made for nothing."""
        if self.created is None:
            return
        if succeeded:
            print(f"flowctl: note: created the database {self.created} (flowd has not run with this "
                  "configuration yet)", file=sys.stderr)
            return
        from flowd import api

        api.close_database()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.created}{suffix}")
            except FileNotFoundError:
                pass

    def engine(self) -> Engine:
        """Open the database and the queue (submitting, cancelling, retrying)."""
        from flowd import api

        return api.configure(self.config)

    def emit(self, data: Any, text: str) -> None:
        if self.json:
            import json

            print(json.dumps(data, ensure_ascii=False, indent=2))
        elif text:
            print(text)


# --------------------------------------------------------------------------- failures
def redact(url: str) -> str:
    """A database URL without its password (``postgresql://u:***@host/db``)."""
    from flowd.config import redact_url

    return redact_url(url)
