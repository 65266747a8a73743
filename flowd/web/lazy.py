"""The console's port, taken when ``flowd run`` starts; the web libraries, at the first visit.

waitress, bottle and prometheus_client (and the console's own modules) cost the
daemon's process about 6 MiB of PSS, which an idle device never needs. So the daemon
binds and listens at start, as before (a port already taken is one ERROR line then,
and flows run without the console), and a thread waits on the listening sockets with
:mod:`selectors`, standard library only. The first connection imports
:mod:`flowd.web.server` and hands it the same sockets, still listening: that
connection waits in their backlog during the import (a few hundred milliseconds on a
small device), then is served like any other.

The ``/metrics`` baseline (:class:`flowd.web.changes.Changes`) is taken at start too,
so the first scrape counts every flow and step since the daemon started.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from flowd.config import Config
from flowd.errors import ConfigError
from flowd.web.changes import Changes

if TYPE_CHECKING:
    from flowd.web.auth import PasswordHash

log = logging.getLogger(__name__)

BACKLOG = 1024  # waitress's own default


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (``localhost``: 127.0.0.1 and ::1),
    bound as waitress binds its own. Raises OSError; nothing stays open then."""
    found = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                               socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[str, int]] = set()
    try:
        for family, kind, proto, _, address in found:
            key = (str(address[0]).split("%", 1)[0], int(address[1]))
            if key in seen:  # getaddrinfo may give the same address twice
                continue
            seen.add(key)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class LazyConsole:
    """The console's port from :meth:`start`, its server from the first connection.

    >>> console = LazyConsole(config, password)   # password: auth.load_password(...) or None
    >>> console.start()                           # raises ConfigError if it cannot listen
    >>> console.stop()
    """

    def __init__(self, config: Config, password: PasswordHash | None):
        self.config = config
        self.password = password
        self._sockets: list[socket.socket] = []
        self._changes: Changes | None = None
        self._server: Any = None  # flowd.web.server.Console, once loaded
        self._lock = threading.Lock()
        self._stopping = False
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.config.web.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> None:
        self._changes = Changes()  # what exists now is not counted by /metrics
        host, port = self.config.web.address
        try:
            self._sockets = listen(host, port)
        except OSError as exc:
            raise ConfigError(f"the console cannot listen on {self.config.web.listen}: {exc.strerror or exc}",
                              key="web.listen", path=self.config.path) from None
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._wait, name="web-console-door", daemon=True)
        self._thread.start()
        log.info("web console on %s%s", self.url, " (password required)" if self.password else "")

    def _wait(self) -> None:
        """Until the first connection (then load the server) or :meth:`stop`."""
        assert self._wake is not None
        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                selector.register(sock, selectors.EVENT_READ)
            selector.register(self._wake[0], selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake[0] in ready:
                    return
                if ready:
                    break
        self._load()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            from flowd.web.server import Console

            server = Console(self.config, self.password, self._sockets, self._changes)
        except Exception:
            log.exception("web console: it cannot be loaded; its port is closed, flows run as usual")
            self._close_sockets()
            return
        with self._lock:
            if self._stopping:
                self._close_sockets()
                return
            try:
                server.start()
            except Exception:
                log.exception("web console: it cannot start; its port is closed, flows run as usual")
                self._close_sockets()
                return
            self._server = server
        log.info("web console: loaded at the first connection (%.0f ms)", 1000 * (time.monotonic() - started))

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening sockets and, once loaded, every connection and the server's threads."""
        with self._lock:
            self._stopping = True
            server = self._server
        if server is not None:
            server.stop(timeout)
        elif self._wake is not None:
            self._wake[1].send(b"x")
            if self._thread is not None:
                self._thread.join(timeout)
        self._close_sockets()
        if self._wake is not None:
            for end in self._wake:
                end.close()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
