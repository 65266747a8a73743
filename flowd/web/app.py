"""The console's routes (SPEC 11): pages, actions, ``/metrics`` and ``/healthz``.

One bottle application per console. Every page is rendered on the server (readable
with JavaScript off); ``static/console.js`` only refreshes a running flow's trace in
place. Every change is a POST carrying the session's CSRF token, answered with a
redirect (or the same page with the error, the input kept). Reads and changes go
through :mod:`flowd.api`; task options are never asked for, so never shown.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import bottle

from flowd import __version__, api
from flowd.cli.display import human_duration, human_size, local_time, parse_iso, script_frame, span
from flowd.config import Config, is_loopback_host
from flowd.errors import FlowdError, InputError, NotFoundError, StoreUnavailable
from flowd.store.models import ACTIVE_STATES, ENDED_STATES, FlowState
from flowd.web.auth import LoginThrottle, PasswordHash, Session, Sessions
from flowd.web.changes import Changes
from flowd.web.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
VIEWS = HERE / "views"
STATIC = HERE / "static"
COOKIE = "flowd_session"
STATES = tuple(state.value for state in FlowState)
PAGE_SIZE = 50
LAST_FAILED = 8
INPUT_MAX = 64 * 1024
OPEN_PATHS = ("/static/", "/login")
NO_SESSION_PATHS = ("/static/", "/metrics", "/healthz")  # scrapers keep no cookie: no session each time
SECURITY_HEADERS = {
    # Nothing from elsewhere, no inline script: a value shown on a page can never run.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def when(text: str | None) -> str:
    """An ISO time from the api in the machine's zone, to the second."""
    return local_time(parse_iso(text))


def took(start: str | None, end: str | None) -> str:
    """How long from ``start`` to ``end`` (or until now)."""
    return human_duration(span(parse_iso(start), parse_iso(end)))


def pretty(value: Any) -> str:
    """A JSON value for a <pre>: on one line when short, else indented."""
    line = json.dumps(value, ensure_ascii=False)
    return line if len(line) <= 64 else json.dumps(value, indent=2, ensure_ascii=False)


HELPERS: dict[str, Any] = {"when": when, "took": took, "pretty": pretty, "human_size": human_size,
                           "human_duration": human_duration, "script_frame": script_frame,
                           "STATES": STATES, "ACTIVE_STATES": ACTIVE_STATES, "ENDED_STATES": ENDED_STATES,
                           "version": __version__, "urlencode": urlencode}


def parse_run_input(text: str) -> tuple[list[Any], dict[str, Any]]:
    """The run form's JSON: ``{"args": [...], "kwargs": {...}}``, both optional, as on
    ``flow/submit``. Raises InputError saying what is wrong."""
    text = text.strip()
    if not text:
        return [], {}
    if len(text) > INPUT_MAX:
        raise InputError(f"the input is {len(text)} characters long; at most {INPUT_MAX} are accepted")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"the input is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(value, dict):
        raise InputError(f'the input must be a JSON object like {{"kwargs": {{"raw": 312}}}}, '
                         f"not {type(value).__name__}")
    unknown = sorted(set(value) - {"args", "kwargs"})
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} in the input: it takes \"args\" (a list) and \"kwargs\" "
                         f'(an object), e.g. {{"kwargs": {{{json.dumps(unknown[0])}: ...}}}}')
    args, kwargs = value.get("args", []), value.get("kwargs", {})
    if not isinstance(args, list):
        raise InputError(f'"args" must be a list, not {type(args).__name__}')
    if not isinstance(kwargs, dict):
        raise InputError(f'"kwargs" must be an object, not {type(kwargs).__name__}')
    return args, kwargs


def _refuse_constant(name: str) -> Any:
    raise InputError(f"the input contains {name}, which is not JSON")


class ConsoleApp:
    """The WSGI application: ``ConsoleApp(config, password, changes).wsgi`` for the server
    (``changes``: the /metrics baseline taken at the daemon's start; None: from now on)."""

    def __init__(self, config: Config, password: PasswordHash | None, changes: Changes | None = None):
        self.config = config
        self.password = password
        self.sessions = Sessions()
        self.throttle = LoginThrottle()
        self.metrics = Metrics(changes)
        self._templates: dict[str, bottle.SimpleTemplate] = {}
        self.wsgi = bottle.Bottle(catchall=True)
        self.wsgi.config["json.enable"] = False
        self._routes()

    # ------------------------------------------------------------------ plumbing
    def _routes(self) -> None:
        app = self.wsgi
        app.add_hook("before_request", self._before)
        app.add_hook("after_request", self._after)
        get, post = app.get, app.post
        get("/")(self._guard(self.home))
        get("/routines")(self._guard(self.routines))
        post("/routines/<name>/run")(self._guard(self.run_routine))
        post("/routines/<name>/<action:re:enable|disable>")(self._guard(self.enable_routine))
        get("/flows")(self._guard(self.flows))
        get("/flows/<flow_id:int>")(self._guard(self.flow))
        get("/flows/<flow_id:int>/live")(self._guard(self.flow_live))
        post("/flows/<flow_id:int>/<action:re:cancel|retry>")(self._guard(self.flow_action))
        get("/metrics")(self._guard(self.metrics_text))
        get("/healthz")(self.healthz)
        get("/login")(self._guard(self.login_page))
        post("/login")(self._guard(self.login))
        post("/logout")(self._guard(self.logout))
        get("/static/<name:path>")(self.static)
        for code in (404, 405, 500):
            app.error(code)(self._error_page)

    def _render(self, name: str, **values: Any) -> str:
        template = self._templates.get(name)
        if template is None:
            template = self._templates[name] = bottle.SimpleTemplate(name=name, lookup=[str(VIEWS)])
        session: Session | None = bottle.request.environ.get("flowd.session")
        return str(template.render(**HELPERS, node_id=self.config.flowd.node_id, csrf=session.csrf if session else "",
                                   logged_in=bool(self.password and session and session.authenticated),
                                   path=bottle.request.path, **values))

    def _guard(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """A user's mistake becomes a page with its sentence; the console never dies of a request."""
        def guarded(**kwargs: Any) -> Any:
            try:
                return handler(**kwargs)
            except bottle.HTTPResponse:
                raise
            except NotFoundError as exc:
                return self._message(404, "Not found", str(exc))
            except StoreUnavailable as exc:
                return self._message(503, "Database unavailable", str(exc))
            except FlowdError as exc:
                return self._message(400, "Refused", str(exc))
            except Exception:
                log.exception("web console: %s %r failed", bottle.request.method, bottle.request.path)
                return self._message(500, "Internal error", "the request failed; the daemon's log says why")
        return guarded

    def _message(self, status: int, title: str, text: str) -> str:
        bottle.response.status = status
        return self._render("message.tpl", title=title, text=text)

    def _error_page(self, error: bottle.HTTPError) -> str:
        return self._render("message.tpl", title=error.status_line, text=str(error.body or ""))

    def _before(self) -> None:
        request = bottle.request
        if self.password is None and not self._is_loopback_host(request.get_header("Host", "")):
            # A page elsewhere that resolves its own name to 127.0.0.1 (DNS rebinding) gets nothing.
            raise bottle.HTTPResponse("This console answers only to loopback names (127.0.0.1, localhost, [::1]).\n",
                                      status=403, headers={"Content-Type": "text/plain; charset=utf-8"})
        session = self.sessions.get(request.get_cookie(COOKIE))
        if session is None and not request.path.startswith(NO_SESSION_PATHS):
            session = self.sessions.new(authenticated=self.password is None)
            bottle.response.set_cookie(COOKIE, session.id, path="/", httponly=True, samesite="strict")
        request.environ["flowd.session"] = session
        if request.method == "POST" and (session is None or not session.has_token(request.forms.get("csrf"))):
            raise bottle.HTTPResponse(self._render("message.tpl", title="403 Forbidden",
                                                   text="this form has no valid CSRF token (the page is old or the "
                                                        "console restarted): reload the page and try again"),
                                      status=403)
        if self.password is None or (session is not None and session.authenticated):
            return
        if request.path.startswith(OPEN_PATHS):
            return
        if request.path in ("/metrics", "/healthz"):
            if self.config.web.open_metrics or self._has_basic_auth():
                return
            raise bottle.HTTPResponse("log in, or send the console's password with HTTP basic authentication\n",
                                      status=401, headers={"WWW-Authenticate": 'Basic realm="flowd"',
                                                           "Content-Type": "text/plain; charset=utf-8"})
        target = request.fullpath + (f"?{request.query_string}" if request.query_string else "")
        raise bottle.HTTPResponse(status=303, headers={"Location": "/login?" + urlencode({"next": target})})

    def _after(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            bottle.response.set_header(name, value)
        if not bottle.request.path.startswith("/static/"):
            bottle.response.set_header("Cache-Control", "no-store")

    @staticmethod
    def _is_loopback_host(header: str) -> bool:
        host = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        return is_loopback_host(host.strip("[]"))

    def _has_basic_auth(self) -> bool:
        header = bottle.request.get_header("Authorization", "")
        if not header.startswith("Basic ") or self.password is None or self.throttle.wait_left() > 0:
            return False
        try:
            _, _, given = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if self.password.matches(given):
            return True
        self.throttle.failed()
        return False

    @staticmethod
    def _see_other(location: str) -> bottle.HTTPResponse:
        return bottle.HTTPResponse(status=303, headers={"Location": location})

    # ------------------------------------------------------------------ pages
    def home(self) -> str:
        overview = api.node_overview()
        failed = api.summarize_flows(state="FAILED", limit=LAST_FAILED)
        return self._render("home.tpl", title="Overview", o=overview, failed=failed)

    def routines(self, errors: dict[str, str] | None = None, inputs: dict[str, str] | None = None) -> str:
        return self._render("routines.tpl", title="Routines", routines=api.describe_routines(),
                            errors=errors or {}, inputs=inputs or {})

    def flows(self) -> str:
        query = bottle.request.query
        state = (query.get("state") or "").upper() or None
        routine = query.get("routine") or None
        before = query.get("before") or None
        if state is not None and state not in STATES:
            raise InputError(f"unknown state {state!r}; states are {', '.join(STATES)}")
        if before is not None and not before.isdigit():
            raise InputError(f"'before' must be a flow id, not {before!r}")
        rows = api.summarize_flows(state, routine, PAGE_SIZE + 1, int(before) if before else None)
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        filters = {k: v for k, v in (("state", state), ("routine", routine)) if v}
        older = "/flows?" + urlencode({**filters, "before": rows[-1]["id"]}) if more else None
        newest = "/flows?" + urlencode(filters) if before else None
        names = [r["name"] for r in api.describe_routines()]
        return self._render("flows.tpl", title="Flows", flows=rows, state=state, routine=routine, older=older,
                            newest=newest, routine_names=names, counts=api.counts_by_state())

    def flow(self, flow_id: int) -> str:
        data = api.describe_flow(flow_id)
        return self._render("flow.tpl", title=f"Flow {flow_id}", f=data)

    def flow_live(self, flow_id: int) -> str:
        """The flow page's body alone, for console.js to swap in while the flow runs."""
        return self._render("flow_body.tpl", f=api.describe_flow(flow_id))

    def login_page(self, error: str | None = None) -> str:
        if self.password is None:
            raise self._see_other("/")
        return self._render("login.tpl", title="Log in", error=error, next=self._next_page())

    def healthz(self) -> Any:
        bottle.response.content_type = "application/json"
        try:
            overview = api.node_overview()
        except Exception as exc:
            log.warning("web console: /healthz: the database cannot be read: %s", exc)
            bottle.response.status = 503
            return json.dumps({"status": "unavailable", "error": f"the database cannot be read: {exc}"})
        return json.dumps({"status": "ok", "node_id": overview["node_id"], "version": __version__,
                           "broker_connected": overview["broker_connected"], "queue_depth": overview["queue_depth"]})

    def metrics_text(self) -> bytes:
        bottle.response.content_type = CONTENT_TYPE
        return self.metrics.render()

    def static(self, name: str) -> Any:
        response = bottle.static_file(name, root=str(STATIC))
        response.set_header("Cache-Control", "max-age=3600")
        return response

    # ------------------------------------------------------------------ actions (POST, CSRF checked)
    def run_routine(self, name: str) -> Any:
        text = bottle.request.forms.getunicode("input", default="") or ""
        try:
            args, kwargs = parse_run_input(text)
            flow = api.submit_flow(name, *args, trigger="api", **kwargs)
        except NotFoundError:
            raise
        except InputError as exc:
            bottle.response.status = 400
            return self.routines(errors={name: str(exc)}, inputs={name: text})
        log.info("web console: flow %d (%s) started", flow.id, name)
        return self._see_other(f"/flows/{flow.id}")

    def enable_routine(self, name: str, action: str) -> Any:
        api.set_routine_enabled(name, action == "enable")
        log.info("web console: routine %s %sd", name, action)
        return self._see_other("/routines")

    def flow_action(self, flow_id: int, action: str) -> Any:
        try:
            if action == "cancel":
                api.cancel_flow(flow_id)
            else:
                api.retry_flow(flow_id)
        except NotFoundError:
            raise
        except InputError as exc:
            bottle.response.status = 409
            return self._render("flow.tpl", title=f"Flow {flow_id}", f=api.describe_flow(flow_id), error=str(exc))
        log.info("web console: flow %d: %s", flow_id, "cancelled" if action == "cancel" else "retried")
        return self._see_other(f"/flows/{flow_id}")

    def login(self) -> Any:
        if self.password is None:
            return self._see_other("/")
        wait = self.throttle.wait_left()
        if wait > 0:
            bottle.response.status = 429
            bottle.response.set_header("Retry-After", str(math.ceil(wait)))
            return self.login_page(error=f"too many failed logins: try again in {math.ceil(wait)} s")
        if not self.password.matches(bottle.request.forms.getunicode("password", default="") or ""):
            wait = self.throttle.failed()
            # REMOTE_ADDR is the socket's peer; bottle's remote_addr would believe X-Forwarded-For.
            log.warning("web console: a failed login from %s; the next try waits %.0f s",
                        bottle.request.environ.get("REMOTE_ADDR"), wait)
            bottle.response.status = 401
            return self.login_page(error="wrong password")
        self.throttle.succeeded()
        old: Session | None = bottle.request.environ.get("flowd.session")
        if old is not None:
            self.sessions.end(old.id)  # a fresh id after login: a planted cookie gains nothing
        session = self.sessions.new(authenticated=True)
        response = self._see_other(self._next_page())
        response.set_cookie(COOKIE, session.id, path="/", httponly=True, samesite="strict")
        return response

    def logout(self) -> Any:
        session: Session | None = bottle.request.environ.get("flowd.session")
        if session is not None:
            self.sessions.end(session.id)
        response = self._see_other("/login" if self.password else "/")
        response.delete_cookie(COOKIE, path="/")
        return response

    @staticmethod
    def _next_page() -> str:
        target = bottle.request.forms.getunicode("next") or bottle.request.query.getunicode("next") or "/"
        # Only a path on this console: never an address elsewhere.
        return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"
