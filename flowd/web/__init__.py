"""The web console and ``/metrics`` that ``flowd run`` serves (SPEC 11).

``flowd run`` reads the password (``auth.load_password``) before it forks its
workers, then starts :class:`flowd.web.server.Console` with its other threads: the web
libraries (waitress, bottle, prometheus_client) are imported in the daemon's main
process only, after the fork. Everything the console shows or changes goes through
:mod:`flowd.api`, like flowctl.

- ``auth``: password hash, sessions, CSRF tokens, login throttle (standard library only);
- ``metrics``: the Prometheus families, counted from the database at each scrape;
- ``app``: the routes (bottle) and their pages (``views/*.tpl``, ``static/``);
- ``server``: waitress on its own thread.
"""
