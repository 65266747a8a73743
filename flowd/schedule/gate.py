"""Builds the scheduler only once a routine has a schedule.

The scheduler brings APScheduler, whose import alone costs the daemon ~5 MiB (issue 12
measured 86 modules: asyncio, concurrent.futures, importlib.metadata for its plug-ins).
A node without schedules never pays it: like the scheduler itself, the gate looks at the
definitions version every time the daemon's loop asks (every 2 s), and the first time an
enabled routine has a schedule it starts the real :class:`flowd.schedule.scheduler.Scheduler`,
which from then on runs as before (missed slots, reloads) and stays.

>>> gate = SchedulerGate(config, engine); gate.start(); gate.check_for_changes(); gate.shutdown()
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flowd import catalog
from flowd.config import Config
from flowd.engine.engine import Engine
from flowd.store.models import definitions_version

if TYPE_CHECKING:
    from flowd.schedule.scheduler import Scheduler

log = logging.getLogger(__name__)


def has_schedules() -> bool:
    """Is some enabled routine scheduled? (the routines :meth:`Scheduler.reload` plans)"""
    return catalog.has_scheduled_routines()


class SchedulerGate:
    """The daemon's scheduler, built on first need; the same four calls as the real one."""

    def __init__(self, config: Config, engine: Engine):
        self.config = config
        self.engine = engine
        self.scheduler: Scheduler | None = None
        self._seen_version: int | None = None

    def start(self) -> None:
        self.check_for_changes()

    def check_for_changes(self) -> bool:
        """Reload (or start) when tasks or routines changed since the last look; True if it did."""
        if self.scheduler is not None:
            return self.scheduler.check_for_changes()
        version = definitions_version()
        if version == self._seen_version:
            return False
        self._seen_version = version
        if not has_schedules():
            return False
        from flowd.schedule.scheduler import Scheduler

        log.info("schedules: a routine has a schedule; starting the scheduler")
        self.scheduler = Scheduler(self.config, self.engine)
        self.scheduler.start()
        return True

    def reload(self) -> None:
        """SIGHUP: rebuild the jobs, or look again whether one is needed now."""
        if self.scheduler is not None:
            self.scheduler.reload()
        else:
            self._seen_version = None
            self.check_for_changes()

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
