"""Example tasks: the seed's VeryLong, and small arithmetic steps for trying flows out."""

import time

from flowd.task import Task


class VeryLong(Task):
    """Sleeps `seconds` (default 10), then passes its input on: a stand-in for slow work."""

    def perform(self, *args, seconds=10, **kwargs):
        self.log.info("sleeping %ss", seconds)
        time.sleep(float(seconds))
        return args, {**kwargs, "slept": seconds}


class Step(Task):
    """Sets kwargs[`key`] = kwargs[`source`] + 1 (or 1 when there is no source)."""

    def perform(self, *args, key="a", source=None, **kwargs):
        value = kwargs.get(source, 0) + 1 if source else 1
        return args, {**kwargs, key: value}


class Echo(Task):
    """Returns None: its input goes on unchanged."""

    def perform(self, *args, **kwargs):
        return None
