"""The names flows and routines take (SPEC 1): states, modes, status settings, triggers,
as the plain text the database stores.

No imports at all, so flowctl's parser offers them without loading the database layer
(``store.models`` builds its ``FlowState`` enum from these), and the per-step path
compares plain strings: an enum member's ``.value`` is a Python property (~0.7 µs here),
and that path names a dozen states per flow.
"""

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
