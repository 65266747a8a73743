"""Wake-up datagrams: a wait ends on one, and a drain empties the socket without waiting."""

from __future__ import annotations

import time
from pathlib import Path

from flowd.service.wakeup import WakeSocket, send_wakeup


def test_a_wait_ends_on_a_wakeup_and_drain_takes_every_one_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "wake.sock"
    assert send_wakeup(path) is False  # nobody listening
    wake = WakeSocket(path)
    try:
        assert wake.drain() is False and wake.wait(0) is False
        for _ in range(5):
            assert send_wakeup(path) is True
        started = time.monotonic()
        assert wake.drain() is True and wake.drain() is False  # all five taken at once
        assert wake.wait(0.05) is False and time.monotonic() - started >= 0.05
        send_wakeup(path)
        assert wake.wait(5) is True and time.monotonic() - started < 2
    finally:
        wake.close()
    assert not path.exists()
