"""The web console and ``/metrics`` that ``flowd run`` serves (SPEC 11).

``flowd run`` reads the password (``auth.load_password``) before it forks its
workers, then starts :class:`flowd.web.lazy.LazyConsole` with its other threads: it
listens on the console's port at once, and imports the web libraries (waitress, bottle,
prometheus_client) at the first connection, in the daemon's main process only.
Everything the console shows or changes goes through :mod:`flowd.api`, like flowctl.

- ``auth``: password hash, sessions, CSRF tokens, login throttle (standard library only);
- ``lazy``: the port taken at start, the server loaded at the first connection;
- ``changes``: what started and ended, read from the database (standard library only);
- ``metrics``: the Prometheus families, fed by ``changes`` at each scrape;
- ``app``: the routes (bottle) and their pages (``views/*.tpl``, ``static/``);
- ``server``: waitress on its own thread.
"""
