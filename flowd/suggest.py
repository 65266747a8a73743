"""'Did you mean ...?' for a mistyped name: the closest known names (difflib)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

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
    from flowd.models import Routine, Task, database

    if database.obj is None:
        return []
    model: Any = {"routine": Routine, "task": Task}.get(kind)
    if model is None:
        return []
    return [str(row.name) for row in model.select(model.name)]
