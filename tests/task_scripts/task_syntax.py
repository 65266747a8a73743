"""A script with a syntax error on line 6."""

from flowd.task import Task


class Oops(Task)
    def perform(self):
        return None
