"""Every error flowd raises on purpose; each builds a sentence a person understands."""

from __future__ import annotations


class FlowdError(Exception):
    """Base of flowd's own errors; ``str(err)`` is the one-line message shown to people."""


class ConfigError(FlowdError):
    """The configuration file or one of its keys is wrong."""

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None):
        where = []
        if key:
            where.append(f"key '{key}'")
        if path:
            where.append(f"in {path}")
        prefix = f"config error ({' '.join(where)}): " if where else "config error: "
        super().__init__(prefix + message)
        self.key = key
        self.path = path


class InputError(FlowdError):
    """Something a user or a device sent is not acceptable (bad routine, bad payload...)."""


class NotFoundError(InputError):
    """A named thing (task, routine, flow, script) does not exist."""

    def __init__(self, kind: str, name: object, hint: str = ""):
        message = f"{kind} '{name}' does not exist"
        if hint:
            message += f"; {hint}"
        super().__init__(message)
        self.kind = kind
        self.name = name


class StoreUnavailable(FlowdError):
    """The database or the queue cannot be reached (missing, locked, unreadable)."""


class TaskScriptError(FlowdError):
    """A task script cannot be found, imported, or is not a Task."""


class StepError(FlowdError):
    """A step produced something flowd cannot pass on (e.g. a value that is not JSON)."""


class DatabaseDamaged(StoreUnavailable):
    """A SQLite file of flowd is damaged: SQLite's own check or a query says so."""

    def __init__(self, path: object, problem: str, *, what: str = "database", found_by: str = "quick_check"):
        super().__init__(f"the {what} {path} is damaged: {problem} (found by {found_by}); flowd does not run on a "
                         "damaged file: see 'flowctl db check', then, with flowd stopped, 'flowctl db recover' "
                         "salvages what can be read into a new file and keeps the damaged one beside it")
        self.path = path
        self.problem = problem
        self.what = what
        self.found_by = found_by


class FlowWaitTimeout(FlowdError, TimeoutError):
    """``api.wait_flow``: the flow did not end in time; it goes on. ``flow`` is it as last seen."""

    def __init__(self, flow_id: int, timeout: float, state: str, flow: object = None):
        super().__init__(f"flow {flow_id} did not end within {timeout:g}s (it is {state}); it goes on")
        self.flow_id = flow_id
        self.timeout = timeout
        self.state = state
        self.flow = flow


class DuplicateRequest(Exception):
    """Another process stored a flow with the same ``request_id`` at the same instant
    (several nodes on one database); the transaction that tried is rolled back. Not a
    FlowdError: nobody made a mistake, and callers that do not expect it keep failing
    the way a database error does."""

    def __init__(self, request_id: str):
        super().__init__(f"a flow with request_id {request_id!r} was stored by another process at the same moment")
        self.request_id = request_id
