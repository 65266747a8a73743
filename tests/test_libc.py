"""flowd.service.libc: the heap handed back to the kernel, and only once per busy spell."""

from __future__ import annotations

import subprocess
import sys
import time

from flowd.service import libc

HOLES = """
import sys
from flowd.service.service import libc

def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

# 40 MB of malloc'd blocks (over obmalloc's 512 bytes, under the mmap threshold), then all
# freed but the last, which pins the top of the heap: the freed pages stay resident
blocks = [bytearray(2000) for _ in range(20_000)]
last = blocks[-1]
del blocks
before = rss_kib()
if sys.argv[1] == "trim":
    libc.trim_heap()
print(before - rss_kib())
"""


def _freed_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", HOLES, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


def test_trim_heap_gives_freed_pages_back_and_without_it_they_stay() -> None:
    assert _freed_kib("trim") > 20_000  # most of the 40 MB leaves the resident set
    assert _freed_kib("keep") < 2_000   # the control: without the trim they stay resident


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_trim_comes_once_a_busy_spell_is_over_and_not_while_it_lasts() -> None:
    trimmer = libc.HeapTrimmer()
    trimmer.idle_point(known_idle=True)
    assert trimmer.trims == 0  # nothing done since it was made: nothing to give back

    _burn(libc.BUSY_CPU_S + 0.05)
    trimmer.idle_point()
    assert trimmer.trims == 0  # busy since the last call: the spell is not over
    trimmer.idle_point()
    assert trimmer.trims == 1  # idle since the last call, after a busy spell
    trimmer.idle_point()
    assert trimmer.trims == 1  # once per spell

    _burn(libc.BUSY_CPU_S + 0.05)
    trimmer.idle_point(known_idle=True)  # a worker about to sleep for want of work
    assert trimmer.trims == 2
