"""The user contract: derive from :class:`Task`, return data, a :class:`Wait` or a :class:`SubFlow`.

Example, in ``tasks/task_example.py``::

    from flowd.task import Task

    class Double(Task):
        def perform(self, value, **kwargs):
            return {"value": value * 2}     # next step gets (same args, this dict)

Referred to as ``"example.Double"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Task:
    """Base class of every task script.

    flowd sets these before calling :meth:`perform`: ``flow_id``, ``flow_uid``,
    ``position`` (step index from 0), ``attempt`` (from 1), ``results`` (the output of
    every earlier step, in order, as ``{"args": [...], "kwargs": {...}}``), ``log`` (a
    logger that tags lines with the flow) and :meth:`publish`.
    """

    flow_id: int = 0
    flow_uid: str = ""
    routine: str = ""
    position: int = 0
    attempt: int = 1
    results: list[dict[str, Any]]
    log: logging.LoggerAdapter[logging.Logger]
    _publisher: Callable[[str, Any, int, bool], None] | None = None

    def __init__(self) -> None:
        self.results = []
        self.log = _PLAIN_LOG  # flowd sets one tagged with the flow before perform()

    def perform(self, *args: Any, **kwargs: Any) -> Any:
        """Do the work; return ``(args, kwargs)``, a dict, None, a Wait or a SubFlow."""
        raise NotImplementedError(f"{type(self).__name__} must define perform()")

    def publish(self, topic: str, payload: Any, qos: int = 1, retain: bool = False) -> None:
        """Publish through the outbox: stored now, sent once the broker is reachable."""
        if self._publisher is None:
            raise RuntimeError("publish() is only available while flowd runs the task")
        self._publisher(topic, payload, qos, retain)


_PLAIN_LOG = logging.LoggerAdapter(logging.getLogger("flowd.task"), {})  # holds nothing of a flow: shared


@dataclass(frozen=True)
class Wait:
    """Returned from ``perform``: pause the flow until an MQTT message on ``topic``
    whose JSON payload contains every key/value of ``match`` arrives (SPEC 2.1)."""

    topic: str
    match: dict[str, Any] | None = None
    timeout: float | None = None


@dataclass(frozen=True, init=False)
class SubFlow:
    """Returned from ``perform``: run ``routine`` as a child flow and continue with its result."""

    routine: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, routine: str, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "routine", routine)
        object.__setattr__(self, "args", tuple(args))
        object.__setattr__(self, "kwargs", dict(kwargs))
