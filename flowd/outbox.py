"""Store and forward: everything flowd publishes is a row here first (SPEC 4.4).

``add_message`` is called inside the transaction that changes state, so a message
exists if and only if the change it reports was committed. The daemon's publisher
sends rows in id order and deletes each only after the broker's PUBACK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowd.models import Outbox, dumps
from flowd.wakeup import send_wakeup

WAKE_SOCKET_NAME = "wake-outbox.sock"


def add_message(topic: str, payload: Any, *, qos: int = 1, retain: bool = False,
                correlation_data: str | None = None) -> None:
    """Queue a message; call inside the caller's transaction, then :func:`notify` after commit."""
    text = payload if isinstance(payload, str) else dumps(payload)
    Outbox.insert(topic=topic, payload=text, qos=qos, retain=retain,
                  correlation_data=correlation_data).execute()


def notify(state_dir: str | Path) -> None:
    """Wake the daemon's publisher (no-op when the daemon is not running)."""
    send_wakeup(Path(state_dir) / WAKE_SOCKET_NAME)
