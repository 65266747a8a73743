"""The power-cut suite's step (tests/test_powercut.py)."""

import json
import os
import time
import uuid

from flowd.task import Task


class Record(Task):
    """Appends one fsynced line per execution to `log` (a file outside the lossy mount)
    and adds a token unique to this execution to the output, so a step that runs again
    changes the flow's result."""

    def perform(self, *args, log, rid, **kwargs):
        token = uuid.uuid4().hex[:12]
        line = json.dumps({"rid": rid, "uid": self.flow_uid, "pos": self.position, "t": time.time(),
                           "token": token})
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return args, {**kwargs, "rid": rid, f"p{self.position}": token}
