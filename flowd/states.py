"""The names flows and routines take (SPEC 1): states, modes, status settings, triggers,
as the plain text the database stores.

Nothing heavy is imported, so flowctl's parser offers them without loading the database
layer (``store.models`` builds its ``FlowState`` enum from these), and the per-step path
compares plain strings: an enum member's ``.value`` is a Python property (~0.7 µs here),
and that path names a dozen states per flow.

``TRANSITIONS`` is the one table of the moves a flow's state may make. The store checks
every state it writes against it (``store.update_flow``): a move it does not list is a
bug, refused before anything is written. A new flow starts in INIT (an insert, not a
move). RUNNING -> RUNNING is the next step, a retry or an interrupted attempt queued
again; WAITING -> DONE is a last step whose wait or sub-flow ended; FAILED or CANCELLED
-> INIT is ``flowctl retry``. ``tests/test_transitions.py`` walks it.
"""

from flowd.errors import FlowdError

STATES = ("INIT", "RUNNING", "WAITING", "DONE", "FAILED", "CANCELLED")
INIT, RUNNING, WAITING, DONE, FAILED, CANCELLED = STATES
ENDED_STATES = (DONE, FAILED, CANCELLED)
ACTIVE_STATES = (INIT, RUNNING, WAITING)
MODES = ("parallel", "queued", "single", "restart")  # how a routine admits a new flow
PARALLEL, QUEUED, SINGLE, RESTART = MODES
# Which flow/<id>/status messages a routine sends (SPEC 4.4): every state change and
# every finished step, state changes only, or none (the result is still published).
STATUS_MODES = ("steps", "states", "off")
TRIGGERS = ("mqtt", "schedule", "cli", "api", "flow")

TRANSITIONS: dict[str, frozenset[str]] = {
    INIT: frozenset({RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({RUNNING, WAITING, DONE, FAILED, CANCELLED}),
    WAITING: frozenset({RUNNING, DONE, FAILED, CANCELLED}),
    DONE: frozenset(),
    FAILED: frozenset({INIT}),
    CANCELLED: frozenset({INIT}),
}


class IllegalTransition(FlowdError):
    """A move the table does not allow (a bug, not a user's mistake)."""


def check_transition(flow_id: int, old: str, new: str) -> None:
    """Refuse flow ``flow_id``'s move from ``old`` to ``new`` unless the table allows it."""
    if new not in TRANSITIONS.get(old, ()):  # a state the table does not know allows nothing
        raise IllegalTransition(f"flow {flow_id} cannot move from {old} to {new}")
