"""Task scripts of the several-node tests: each execution is logged with its node and times."""

import json
import os
import time

from flowd.task import Task, Wait


def _log(log, step, start):
    line = json.dumps({"node": os.environ.get("FLOWD_TEST_NODE", "?"), "flow": step.flow_id,
                       "position": step.position, "attempt": step.attempt, "start": start,
                       "end": time.time()}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Logged(Task):
    """Sleeps ``sleep`` seconds and appends one JSON line per execution to ``log``: which
    node ran which step of which flow, from when to when (one short O_APPEND write)."""

    def perform(self, *args, log, sleep=0.0, **kwargs):
        start = time.time()
        time.sleep(float(sleep))
        _log(log, self, start)
        return args, kwargs


class Awaits(Task):
    """Logged like ``Logged``, then waits for a message on ``topic`` whose payload has ``"i": i``."""

    def perform(self, *args, log, topic, i, **kwargs):
        _log(log, self, time.time())
        return Wait(topic, match={"i": i})
