"""Start-up recovery: the database says what was under way; the queue is rebuilt from it.

Runs in the daemon before the worker pool starts, so no step can be running: every
attempt still marked RUNNING was cut short (kill -9, power loss) and is recorded as
interrupted; every admitted flow that has not ended is queued again at its current
step. Steps whose results were committed are never run again.
"""

from __future__ import annotations

import logging

from flowd.config import Config
from flowd.engine.engine import Engine
from flowd.queue import queue

log = logging.getLogger(__name__)


def recover(config: Config, engine: Engine) -> int:
    """Rebuild the queue from the flows table; returns how many flows were queued."""
    if config.queue.backend == "sqlite":
        # Old messages carry stale tokens; dropping them keeps the queue small and exact.
        queue.flush_queue()
    count = engine.recover()
    if count:
        log.info("recovery: %d unfinished flow(s) queued again", count)
    return count
