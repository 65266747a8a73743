"""The Python API (SPEC 3): submit, inspect, cancel and retry flows from any process.

Works with the daemon stopped: a submitted flow is stored and queued, and runs when
workers are there. The first call configures this process from the default config
lookup; call :func:`configure` first to choose the file or pass a Config.

>>> from flowd import api
>>> flow = api.submit_flow("fetch-weather", "arg0", city="Oslo", request_id="r-17")
>>> api.get_flow(flow.id).state
'INIT'
>>> api.wait_flow(flow.id, timeout=30).state      # blocks until it ends (TimeoutError after 30 s)
'DONE'
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flowd import store
from flowd.config import Config, DatabaseSection, load_config
from flowd.errors import InputError, NotFoundError
from flowd.models import FlowState, Routine, database, init_database, utcnow
from flowd.store import Row

TYPE_CHECKING = False
if TYPE_CHECKING:
    from flowd.engine import Engine

_engine: Engine | None = None
_database_open = False


def configure(config: Config | str | None = None, *, create: bool = False) -> Engine:
    """Open the database and queue of ``config`` (a Config, a file path, or the default lookup).

    A SQLite database that does not exist yet is created only with ``create=True`` (the
    daemon does it at its first start); otherwise StoreUnavailable says where it was
    looked for, so a script run with the wrong configuration never makes an empty one.
    """
    global _engine
    from flowd import queue
    from flowd.engine import Engine

    cfg = config if isinstance(config, Config) else load_config(config)
    init_database(cfg.database, create=create)
    queue.configure_queue(cfg)
    _engine = Engine(cfg, enqueue=queue.enqueue_flow, enqueue_many=queue.enqueue_flows)
    return _engine


def open_database(section: DatabaseSection, *, create: bool = False) -> None:
    """Open only the database of ``section``: enough for reads (flows, traces, counts),
    without the queue or the engine (flowctl's read-only commands load neither)."""
    global _database_open
    init_database(section, create=create)
    _database_open = True


def engine() -> Engine:
    """This process's engine, configured on first use."""
    return _engine if _engine is not None else configure()


def _reading() -> None:
    """Reads need the database only; configure everything on first use, as before."""
    if _engine is None and not _database_open:
        configure()


def reset() -> None:
    """Close this process's database connection and forget the configuration."""
    global _engine, _database_open
    _engine = None
    _database_open = False
    if database.obj is not None and not database.obj.is_closed():
        database.obj.close()


def check_flow_input(args: Any, kwargs: dict[str, Any]) -> None:
    """Raise InputError when a flow's input cannot be stored as JSON (a set, NaN, a lone surrogate)."""
    from flowd.runner import check_json

    try:
        check_json({"args": list(args), "kwargs": kwargs}, "the flow's input")
    except Exception as exc:
        raise InputError(str(exc).replace(" returned", " contains")) from None


def submit_flow(routine: str | Routine, *args: Any, request_id: str | None = None, reply_to: str | None = None,
                trigger: str = "api", **kwargs: Any) -> Row:
    """Store and queue a flow of ``routine``; returns at once. A repeated ``request_id``
    returns the flow already started with it."""
    check_flow_input(args, kwargs)
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        raise InputError(f"request_id must be a non-empty string, not {request_id!r}")
    row, _ = engine().submit(routine, args, kwargs, request_id=request_id, reply_to=reply_to, trigger=trigger)
    return row


def get_flow(flow_id: int) -> Row:
    """The flow with its current state, position, result and error."""
    _reading()
    flow = store.get_flow(flow_id)
    if flow is None:
        raise NotFoundError("flow", flow_id, "list flows with 'flowctl flows'")
    return flow


def flow_trace(flow_id: int) -> list[Row]:
    """Every attempt of every step of a flow, in order."""
    get_flow(flow_id)
    return store.flow_trace(flow_id)


def cancel_flow(flow_id: int, reason: str = "cancelled by request") -> Row:
    """Cancel a flow that has not ended (its running step is interrupted)."""
    return engine().cancel(flow_id, reason=reason)


def retry_flow(flow_id: int) -> Row:
    """Resume a FAILED or CANCELLED flow from the step that did not finish."""
    return engine().retry(flow_id)


def wait_flow(flow_id: int, timeout: float | None = None) -> Row:
    """Block until the flow ends (started anywhere: this process, flowctl, MQTT, another
    node); returns it. Raises FlowWaitTimeout (a TimeoutError) after ``timeout`` s, the
    flow going on. Woken by the flow's messages on the broker, with a slow check of the
    database when the broker is away (see flowd.waiting)."""
    from flowd.waiting import FlowWaiter

    config = engine().config
    get_flow(flow_id)
    with FlowWaiter(config, flow_id) as waiter:
        return waiter.wait(timeout)


def list_flows(state: str | None = None, routine: str | None = None, limit: int = 50) -> list[Row]:
    """Newest flows first, optionally filtered."""
    if state and state.upper() not in FlowState.__members__:
        raise InputError(f"unknown state '{state}'; states are {', '.join(FlowState.__members__)}")
    _reading()
    return store.list_flows(state.upper() if state else None, routine, limit)


def counts_by_state() -> dict[str, int]:
    """How many flows are in each state."""
    _reading()
    return store.count_flows_by_state()


def prune(older_than: float, now: dt.datetime | None = None, *, dry_run: bool = False) -> int:
    """Delete flows that ended more than ``older_than`` seconds ago, with their results,
    and give the freed pages back to the file system (SPEC 9); how many. ``dry_run``
    only counts them."""
    _reading()
    cutoff = (now or utcnow()) - dt.timedelta(seconds=older_than)
    if dry_run:
        return store.count_ended_flows(cutoff)
    return store.prune_ended_flows(cutoff)
