"""Task scripts for the web console tests."""

import os
import time

from flowd.task import Task


class Slow(Task):
    """Sleeps ``seconds``, then passes its input on with ``slept`` added."""

    def perform(self, *args, seconds=1.0, **kwargs):
        time.sleep(float(seconds))
        return args, {**kwargs, "slept": seconds}


class NeedsMarker(Task):
    """Fails until the file ``marker`` exists: a flow to retry once it is fixed."""

    def perform(self, *args, marker, **kwargs):
        if not os.path.exists(marker):
            raise RuntimeError(f"the marker file {marker} is not there yet")
        return None


class PassOn(Task):
    """Returns every keyword it got, its task's options included (as careless tasks do)."""

    def perform(self, *args, **kwargs):
        return args, dict(kwargs)
