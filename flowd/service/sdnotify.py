"""sd_notify: tell systemd (``Type=notify``) that flowd is ready, alive, reloading or stopping.

Uses ``systemd.daemon.notify`` when python-systemd is installed, else sends the same
datagram itself. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, and
watchdog pings are sent only when systemd asked for them (``$WATCHDOG_USEC``). This
module and ``logs.py`` are the systemd seam, so they read those variables themselves.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

try:  # the C binding is optional: the datagram below is all it does
    from systemd import daemon as _systemd_daemon
except ImportError:
    _systemd_daemon = None


def send_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; False when not under systemd."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if _systemd_daemon is not None and address == os.environ.get("NOTIFY_SOCKET"):
        return bool(_systemd_daemon.notify(state))
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
        sock.sendall(state.encode("utf-8"))
        return True
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", address, exc)
        return False
    finally:
        sock.close()


class Notifier:
    """The daemon's side of the systemd protocol.

    >>> notifier = Notifier()
    >>> notifier.ready(); notifier.status("0 running, 0 queued, broker connected")
    >>> if notifier.watchdog_due(): notifier.watchdog()
    """

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = dict(os.environ if env is None else env)
        self.enabled = bool(self.env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = self._watchdog_interval()
        self._last_status: str | None = None
        self._last_ping = 0.0

    def _watchdog_interval(self) -> float | None:
        """Half of systemd's WatchdogSec, or None when no watchdog is armed for us."""
        usec = self.env.get("WATCHDOG_USEC", "")
        pid = self.env.get("WATCHDOG_PID", "")
        if not self.enabled or not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        return int(usec) / 1e6 / 2

    def _send(self, state: str) -> bool:
        if not self.enabled:
            return False
        return send_notify(state, self.env)

    def ready(self) -> None:
        self._send(f"READY=1\nMAINPID={os.getpid()}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload units match this to the reload they asked for.
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """Send ``STATUS=`` only when the text changed (systemctl status shows the last one)."""
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog_due(self, now: float | None = None) -> bool:
        if self.watchdog_interval is None:
            return False
        now = time.monotonic() if now is None else now
        return now - self._last_ping >= min(self.watchdog_interval, 1.0)

    def watchdog(self, now: float | None = None) -> None:
        if self.watchdog_interval is None:
            return
        self._last_ping = time.monotonic() if now is None else now
        self._send("WATCHDOG=1")
