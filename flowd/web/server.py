"""The console's HTTP server: waitress on a thread of ``flowd run``.

waitress is pure Python, keeps to a fixed pool of threads (two here: a device has few
visitors) and needs nothing compiled. The server binds when :meth:`Console.start`
runs, after the daemon has forked its workers, so no worker holds the port.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from waitress import wasyncore
from waitress.server import create_server

from flowd.config import Config
from flowd.errors import ConfigError
from flowd.web.app import ConsoleApp
from flowd.web.auth import PasswordHash

log = logging.getLogger(__name__)

THREADS = 2
MAX_BODY = 1024 * 1024  # a form with a run's JSON input; waitress would take 1 GiB


class Console:
    """The web console and ``/metrics``, served until :meth:`stop`.

    >>> console = Console(config, password)   # password: auth.load_password(...) or None
    >>> console.start()                       # raises ConfigError if it cannot listen
    >>> console.stop()
    """

    def __init__(self, config: Config, password: PasswordHash | None):
        self.config = config
        self.app = ConsoleApp(config, password)
        self._map: dict[int, Any] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.config.web.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> None:
        host, port = self.config.web.address
        try:
            self._server = create_server(self.app.wsgi, map=self._map, host=host, port=port, threads=THREADS,
                                         ident="flowd", clear_untrusted_proxy_headers=True,
                                         channel_timeout=30, expose_tracebacks=False,
                                         max_request_body_size=MAX_BODY, max_request_header_size=64 * 1024)
        except OSError as exc:
            raise ConfigError(f"the console cannot listen on {self.config.web.listen}: {exc.strerror}",
                              key="web.listen", path=self.config.path) from None
        self._thread = threading.Thread(target=self._serve, name="web-console", daemon=True)
        self._thread.start()
        log.info("web console on %s%s", self.url, " (password required)" if self.app.password else "")

    def _serve(self) -> None:
        try:
            self._server.run()
        except Exception:
            log.exception("web console: the server stopped")

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every connection, then the worker threads."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # Closing belongs to the server's own loop thread: the trigger runs it there.
        server.trigger.pull_trigger(lambda: wasyncore.close_all(self._map))
        if self._thread is not None:
            self._thread.join(timeout)
        server.task_dispatcher.shutdown(timeout=timeout)
