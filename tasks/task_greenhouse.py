"""The README's worked example: a sensor reading turned into degrees, and an alarm."""

from flowd.task import Task


class Reading(Task):
    """Turns a raw sensor value into degrees."""
    def perform(self, *args, raw, offset=0.0, **kwargs):
        return {"celsius": raw / 10 + offset}     # next step gets (same args, this dict)


class Alarm(Task):
    """Publishes greenhouse/alarm when `celsius` is over `limit`; passes its input on."""
    def perform(self, *args, celsius, limit=30, **kwargs):
        if celsius > limit:
            self.publish("greenhouse/alarm", {"celsius": celsius})
        return None                                # pass the input on unchanged
