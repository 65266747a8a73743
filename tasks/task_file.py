"""Append readings to a file, one JSON line each: a simple local log of sensor data."""

import datetime
import json
import os

from flowd.task import Task


class AppendLine(Task):
    """Appends {"at", "flow", <kwargs[keys] or all kwargs>} as one JSON line to `path`.

    The line is flushed and fsynced so a power cut does not lose a reading the flow
    reported as stored.
    """

    def perform(self, *args, path, keys=None, **kwargs):
        record = {key: kwargs.get(key) for key in keys} if keys else dict(kwargs)
        line = json.dumps({"at": datetime.datetime.now(datetime.UTC).isoformat(),
                           "flow": self.flow_id, **record}, sort_keys=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return None
