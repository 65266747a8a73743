"""Task scripts used by the core tests."""

import json
import os
import time

from flowd.task import SubFlow, Task, Wait


def _count(path, label):
    """Append one line per execution so tests can count runs across processes."""
    with open(path, "a") as handle:
        handle.write(label + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class Add(Task):
    def perform(self, *args, n=1, total=0, **kwargs):
        return args, {**kwargs, "total": total + n}


class Tuple(Task):
    def perform(self, *args, **kwargs):
        return ["x", *args], {"got": sorted(kwargs)}


class Dict(Task):
    def perform(self, *args, **kwargs):
        return {"seen_args": list(args), **kwargs}


class Nothing(Task):
    def perform(self, *args, **kwargs):
        return None


class Results(Task):
    """Returns what it sees of earlier steps and its context."""

    def perform(self, *args, **kwargs):
        return args, {"results": self.results, "position": self.position, "attempt": self.attempt,
                      "flow_id": self.flow_id}


class Count(Task):
    """Counts its executions in `counter` (a file), optionally sleeping first."""

    def perform(self, *args, counter, label="run", sleep=0, **kwargs):
        if sleep:
            time.sleep(float(sleep))
        _count(counter, f"{label}:{self.flow_id}:{self.position}")
        return args, {**kwargs, "counter": counter, "label": label}


class Fail(Task):
    def perform(self, *args, **kwargs):
        raise ValueError("sensor answered garbage")


class FailTimes(Task):
    """Fails until it has run `times` times (counted in `counter`)."""

    def perform(self, *args, counter, times=2, **kwargs):
        _count(counter, f"attempt:{self.attempt}")
        with open(counter) as handle:
            runs = len(handle.read().splitlines())
        if runs <= times:
            raise RuntimeError(f"failing on purpose, run {runs}")
        return args, {**kwargs, "runs": runs}


class Sleep(Task):
    def perform(self, *args, seconds=1, **kwargs):
        time.sleep(float(seconds))
        return args, kwargs


class SleepForever(Task):
    def perform(self, *args, **kwargs):
        while True:
            time.sleep(1)


class SwallowAll(Task):
    """Sleeps inside `except Exception`: a timeout must still stop it."""

    def perform(self, *args, **kwargs):
        while True:
            try:
                time.sleep(1)
            except Exception:
                pass


class NotJson(Task):
    def perform(self, *args, **kwargs):
        return {"reading": {"when": object()}}


class BadShape(Task):
    def perform(self, *args, **kwargs):
        return 42


class WaitFor(Task):
    def perform(self, *args, topic, match=None, wait_timeout=None, **kwargs):
        return Wait(topic, match=match, timeout=wait_timeout)


class Spawn(Task):
    def perform(self, *args, child, **kwargs):
        return SubFlow(child, *args, **kwargs)


class Dump(Task):
    """Writes its kwargs to `path` as JSON."""

    def perform(self, *args, path, **kwargs):
        with open(path, "w") as handle:
            json.dump({"args": list(args), "kwargs": kwargs, "results": self.results}, handle)
        return None
