"""Sentences that help a person past a mistake: "did you mean ...?" for a mistyped
name (difflib), and what to do when the broker cannot be reached."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowd.config import Config

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"did you mean 'status'?"``, or ``""`` when nothing known is close to ``word``."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def explain_invalid_choice(message: str) -> str:
    """argparse's "invalid choice: 'stauts' (choose from 'status', ...)" with the closest one named."""
    match = _INVALID_CHOICE.search(message)
    if match is None:
        return message
    choices = re.findall(r"'([^']*)'", match.group(2))
    hint = did_you_mean(match.group(1), choices)
    return f"{message}; {hint}" if hint else message


def known_names(kind: str) -> list[str]:
    """The stored routines or tasks (for a "does not exist" error); empty when the
    database is not open or ``kind`` names something else."""
    from flowd import catalog
    from flowd.store.models import database

    if database.obj is None:
        return []
    names = {"routine": catalog.routine_names, "task": catalog.task_names}.get(kind)
    return names() if names is not None else []


def with_suggestion(exc: Exception) -> str:
    """The error's sentence; for a routine or task that does not exist, with the closest stored name."""
    from flowd.errors import NotFoundError

    message = str(exc)
    if isinstance(exc, NotFoundError) and isinstance(exc.name, str):
        hint = did_you_mean(exc.name, known_names(exc.kind))
        message = f"{message}; {hint}" if hint else message
    return message


def broker_hint(config: Config) -> str:
    """What "broker NOT connected" means, and how to check and start one."""
    m = config.mqtt
    return (f"NOT connected to {m.host}:{m.port} ([mqtt] host, port); check: `mosquitto_pub -h {m.host} -p {m.port} "
            "-t test -m hi` (an error: no broker there); a local one: `sudo apt-get install mosquitto` (starts at "
            "once) or `sudo systemctl start mosquitto`; flowd's log says why it cannot connect")
