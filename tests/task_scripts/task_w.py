"""Task scripts for the wait and sub-flow tests (SPEC 2.1), referred to as ``w.<Class>``."""

import os
import time

from flowd.task import SubFlow, Task, Wait


def _append(path, line):
    """One line per execution, fsynced, so tests count runs across processes."""
    with open(path, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class Mark(Task):
    """Appends `label` to the args and to kwargs["marks"]: every step's output differs,
    and the path a value took through flows and sub-flows shows in the result."""

    def perform(self, *args, label, marks=(), **kwargs):
        return [*args, label], {**kwargs, "marks": [*marks, label]}


class Await(Task):
    """Waits for a message on `topic` whose payload contains `match`, for `wait_timeout`
    seconds (`later_timeout` from the second attempt on); with `counter`, notes each
    attempt first."""

    def perform(self, *args, topic, match=None, wait_timeout=None, later_timeout=None, counter=None, **kwargs):
        if counter:
            _append(counter, f"{self.flow_id}:{self.attempt}")
        timeout = later_timeout if self.attempt > 1 and later_timeout is not None else wait_timeout
        return Wait(topic, match=match, timeout=timeout)


class Seen(Task):
    """Returns what it sees: its input, its place and every earlier step's output."""

    def perform(self, *args, **kwargs):
        return list(args), {"seen_kwargs": kwargs, "results": self.results, "position": self.position,
                            "attempt": self.attempt}


class Spawn(Task):
    """Starts routine `child` as a sub-flow with this step's input."""

    def perform(self, *args, child, **kwargs):
        return SubFlow(child, *args, **kwargs)


class Explode(Task):
    def perform(self, *args, **kwargs):
        raise RuntimeError("child exploded on purpose")


class FailFirst(Task):
    """Fails the first time it runs (runs counted in `counter`), then passes its input on."""

    def perform(self, *args, counter, **kwargs):
        _append(counter, f"{self.flow_id}:{self.attempt}")
        with open(counter) as handle:
            runs = len(handle.read().splitlines())
        if runs == 1:
            raise RuntimeError("first run fails on purpose")
        return list(args), {**kwargs, "runs": runs}


class Linger(Task):
    """Writes `marker` (so the test knows it started), then sleeps `seconds`."""

    def perform(self, *args, marker, seconds=120, **kwargs):
        _append(marker, str(self.flow_id))
        time.sleep(float(seconds))
        return list(args), kwargs
