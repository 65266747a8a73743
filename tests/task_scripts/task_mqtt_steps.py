"""Task scripts for the daemon/MQTT tests."""

import os
import time

from flowd.task import Task


class Double(Task):
    """Doubles `value`."""

    def perform(self, *args, value=1, **kwargs):
        return args, {**kwargs, "value": value * 2}


class Nap(Task):
    """Sleeps `nap` seconds; with `marker`, first creates that file (the test knows the step started)."""

    def perform(self, *args, nap=0.5, marker=None, **kwargs):
        if marker:
            with open(marker, "a") as handle:
                handle.write(f"{self.flow_id}:{self.attempt}\n")
        time.sleep(float(nap))
        return args, {**kwargs, "napped": nap}


class Note(Task):
    """Appends one line per run to `counter` (runs are counted across processes)."""

    def perform(self, *args, counter, **kwargs):
        with open(counter, "a") as handle:
            handle.write(f"{self.flow_id}:{self.position}\n")
            handle.flush()
            os.fsync(handle.fileno())
        return args, {**kwargs, "counter": counter}
