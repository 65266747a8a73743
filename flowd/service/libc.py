"""The few glibc calls flowd makes through ctypes: its one home for them.

Memory (issue 12, PSS on a Pi): CPython's larger allocations and SQLite's come from
glibc's malloc, which keeps what is freed for reuse. Each thread that allocates gets
an arena of its own, and a freed hole inside the heap is kept resident for good. So
the daemon asks for a single arena before it starts any thread (its threads mostly
take turns on the GIL anyway), and every process hands its free heap pages back to the
kernel (``malloc_trim``) once it is ready and whenever a busy spell has ended.

Elsewhere than glibc (musl) the calls are missing: then each is a no-op.
"""

from __future__ import annotations

import ctypes
import signal
import time
from typing import Any

M_ARENA_MAX = -8            # mallopt() parameter, from glibc's malloc.h
PR_SET_PDEATHSIG = 1        # prctl() option, from linux/prctl.h
BUSY_CPU_S = 0.2            # CPU used since the last trim that makes another one worth it
IDLE_CPU_S = 0.02           # at most this much CPU in the last interval: the busy spell is over

_handle: Any = None


def _libc() -> Any:
    """The C library, loaded once. The running program's symbols include libc's;
    ctypes.util.find_library("c") would run ldconfig in a child process."""
    global _handle
    if _handle is None:
        _handle = ctypes.CDLL(None, use_errno=True)
    return _handle


def _call(name: str, *args: int) -> None:
    """``name(*args)`` in the C library; nothing where it has no such function."""
    try:
        function = getattr(_libc(), name)
    except (OSError, AttributeError):
        return
    function(*args)


def use_one_malloc_arena() -> None:
    """One malloc arena for the whole process: call before any thread starts."""
    _call("mallopt", M_ARENA_MAX, 1)


def trim_heap() -> None:
    """Hand the pages malloc holds free back to the kernel (they leave RSS and PSS)."""
    _call("malloc_trim", 0)


def die_with_parent_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux prctl)."""
    _call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL)


class HeapTrimmer:
    """Trims the heap once a busy spell is over: after ``BUSY_CPU_S`` of this process's
    CPU, at the first call that finds the process (nearly) idle since the call before.
    A call costs one clock read; a trim, a walk over the heap, happens once per spell."""

    def __init__(self) -> None:
        self._cpu_at_trim = time.process_time()
        self._cpu_at_call = self._cpu_at_trim
        self.trims = 0

    def idle_point(self, *, known_idle: bool = False) -> None:
        """Called at a regular interval, or (``known_idle``) just before the process goes
        to sleep for want of work."""
        cpu = time.process_time()
        was_idle = known_idle or cpu - self._cpu_at_call <= IDLE_CPU_S
        self._cpu_at_call = cpu
        if was_idle and cpu - self._cpu_at_trim >= BUSY_CPU_S:
            trim_heap()
            self.trims += 1
            self._cpu_at_trim = time.process_time()
