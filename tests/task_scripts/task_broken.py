"""A script that raises while it is imported."""

from flowd.task import Task

raise ImportError("the sensor library is not installed")


class Anything(Task):
    def perform(self, *args, **kwargs):
        return None
