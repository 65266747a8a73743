"""The console's HTTP server: waitress on a thread of ``flowd run``.

waitress is pure Python, keeps to a fixed pool of threads (two here: a device has few
visitors) and needs nothing compiled. It serves the sockets that
:mod:`flowd.web.lazy` bound and listened on at the daemon's start (after the fork, so
no worker holds the port); this module is imported only at the console's first
connection.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from waitress import trigger, wasyncore
from waitress.server import create_server

from flowd.config import Config
from flowd.web.app import ConsoleApp
from flowd.web.auth import PasswordHash
from flowd.web.changes import Changes

log = logging.getLogger(__name__)

THREADS = 2
MAX_BODY = 1024 * 1024  # a form with a run's JSON input; waitress would take 1 GiB


class Console:
    """The web console and ``/metrics``, served on listening sockets until :meth:`stop`.

    >>> console = Console(config, password, sockets, changes)  # see flowd.web.lazy
    >>> console.start()
    >>> console.stop()
    """

    def __init__(self, config: Config, password: PasswordHash | None, sockets: list[socket.socket],
                 changes: Changes | None = None):
        self.config = config
        self.sockets = sockets
        self.app = ConsoleApp(config, password, changes)
        self._map: dict[int, Any] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server = create_server(self.app.wsgi, map=self._map, sockets=self.sockets, threads=THREADS,
                                     ident="flowd", clear_untrusted_proxy_headers=True,
                                     channel_timeout=30, expose_tracebacks=False,
                                     max_request_body_size=MAX_BODY, max_request_header_size=64 * 1024)
        self._thread = threading.Thread(target=self._serve, name="web-console", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._server.run()
        except Exception:
            log.exception("web console: the server stopped")

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening sockets and every connection, then the worker threads."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # Closing belongs to the server's own loop thread: a trigger runs it there (each
        # listening socket has one; with several, the server object itself has none).
        wake = next(d for d in list(self._map.values()) if isinstance(d, trigger.trigger))
        wake.pull_trigger(lambda: wasyncore.close_all(self._map))
        if self._thread is not None:
            self._thread.join(timeout)
        server.task_dispatcher.shutdown(timeout=timeout)
