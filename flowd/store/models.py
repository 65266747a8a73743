"""Peewee models and the database seam (SQLite by default, PostgreSQL by URL).

flowd's own tables are the source of truth for every flow: the huey queue only says
"look at flow N". Every process (daemon, workers, flowctl, scripts using ``flowd.api``)
calls ``migrations.init_database`` once and then uses these models.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import peewee
from peewee import (
    SQL,
    AutoField,
    BooleanField,
    CharField,
    DatabaseProxy,
    DateTimeField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

from flowd.config import DatabaseSection, redact_url
from flowd.errors import StoreUnavailable
from flowd.jsontext import dumps as dumps
from flowd.jsontext import loads as loads
from flowd.states import ACTIVE_STATES as ACTIVE_STATES
from flowd.states import CANCELLED as CANCELLED
from flowd.states import DONE as DONE
from flowd.states import ENDED_STATES as ENDED_STATES
from flowd.states import FAILED as FAILED
from flowd.states import INIT as INIT
from flowd.states import MODES as MODES
from flowd.states import RUNNING as RUNNING
from flowd.states import STATUS_MODES as STATUS_MODES
from flowd.states import TRIGGERS as TRIGGERS
from flowd.states import WAITING as WAITING
from flowd.store.durability import durability, writer_lock
from flowd.store.durability import make_durable as make_durable  # the durability point, here for every caller
from flowd.store.durability import make_step_durable as make_step_durable

database = DatabaseProxy()
BUSY_TIMEOUT_S = 15
IDLE_IN_TRANSACTION_S = 5  # PostgreSQL ends a transaction left idle this long (a frozen process)


class FlowState(StrEnum):
    """States of a flow (SPEC 1; their text: :mod:`flowd.states`)."""

    INIT = INIT
    RUNNING = RUNNING
    WAITING = WAITING
    DONE = DONE
    FAILED = FAILED
    CANCELLED = CANCELLED


class StepState(StrEnum):
    """States of one attempt of one step (a TaskResult)."""

    RUNNING = RUNNING
    DONE = DONE
    FAILED = FAILED
    CANCELLED = CANCELLED


_EPOCH = dt.datetime(1970, 1, 1)


def utcnow() -> dt.datetime:
    """Naive UTC now: every timestamp in the database is naive UTC.

    The epoch plus the clock's whole microseconds, as ``datetime.now`` truncates them:
    ``now(UTC).replace(tzinfo=None)`` cost 3x more (``replace`` parses keywords), and a
    worker asks for the time at every step."""
    return _EPOCH + dt.timedelta(0, 0, time.time_ns() // 1000)


def isoformat(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a ``Z``, as published on MQTT."""
    if value is None:
        return None
    if value.tzinfo is not None:  # rare: every stored time is naive, and replace() is not cheap
        value = value.replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


class JSONField(TextField):
    """JSON stored as text; works on SQLite and PostgreSQL alike."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else dumps(value)

    def python_value(self, value: Any) -> Any:
        return None if value is None else loads(value)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Task(BaseModel):
    """A named, stored use of a task script with its defaults."""

    id = AutoField()
    name = CharField(unique=True)
    script = CharField()
    options = JSONField(default=dict)
    retries = IntegerField(default=0)
    retry_delay = FloatField(default=1.0)
    retry_backoff_max = FloatField(default=300.0)
    timeout = FloatField(null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)


class Routine(BaseModel):
    """A named ordered list of Tasks, with its schedule and concurrency rules."""

    id = AutoField()
    name = CharField(unique=True)
    schedule = CharField(null=True)
    timezone = CharField(null=True)
    jitter = FloatField(null=True)
    mqtt = BooleanField(default=True)
    mode = CharField(default="parallel")
    max = IntegerField(default=10)
    timeout = FloatField(null=True)
    enabled = BooleanField(default=True)
    last_scheduled_run = DateTimeField(null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    # The SQL default makes a new database and an upgraded one (schema v4) the same.
    status = CharField(default="steps", constraints=[SQL("DEFAULT 'steps'")])

    def task_names(self) -> list[str]:
        """The routine's steps, in order, as task names."""
        query = (RoutineStep.select(RoutineStep.position, Task.name).join(Task)
                 .where(RoutineStep.routine == self).order_by(RoutineStep.position))
        return [row.task.name for row in query]


class RoutineStep(BaseModel):
    """Position ``position`` of a routine runs ``task`` (a task may appear twice)."""

    id = AutoField()
    routine = ForeignKeyField(Routine, backref="steps", on_delete="CASCADE")
    position = IntegerField()
    task = ForeignKeyField(Task, backref="uses", on_delete="RESTRICT")

    class Meta:
        indexes = ((("routine", "position"), True),)


class Flow(BaseModel):
    """One execution of a routine.

    ``steps`` freezes the routine's task names at submit, so editing a routine never
    changes a flow under way. ``dispatch_token`` is bumped every time the flow is put
    in the queue; a worker only runs a queue message whose token still matches, so a
    message duplicated by recovery runs nothing twice.
    """

    id = AutoField()
    uid = CharField()  # UUID4, never looked up: an index on it would write a random page per new flow
    routine = CharField()  # looked up through the (routine, state) index
    steps = JSONField()
    state = CharField(default=FlowState.INIT.value, index=True)
    position = IntegerField(default=0)
    args = JSONField(default=list)
    kwargs = JSONField(default=dict)
    request_id = CharField(null=True, unique=True)
    trigger = CharField(default="api")
    reply_to = CharField(null=True)
    correlation_data = TextField(null=True)
    admitted = BooleanField(default=False)
    dispatch_token = IntegerField(default=0)
    worker_pid = IntegerField(null=True)
    step_attempt = IntegerField(default=0)
    interruptions = IntegerField(default=0)
    next_attempt_at = DateTimeField(null=True)
    deadline = DateTimeField(null=True)
    result = JSONField(null=True)
    error = TextField(null=True)
    created_at = DateTimeField(default=utcnow)
    started_at = DateTimeField(null=True)
    finished_at = DateTimeField(null=True)
    updated_at = DateTimeField(default=utcnow)
    # Added in schema v2 (waits and sub-flows, SPEC 2.1).
    parent = ForeignKeyField("self", null=True, backref="children", on_delete="SET NULL")
    depth = IntegerField(default=0)
    wait_topic = CharField(null=True)
    wait_match = JSONField(null=True)
    wait_until = DateTimeField(null=True)
    # Added in schema v6 (several nodes, SPEC 10): the node whose worker holds the flow,
    # or that must recover it (set with worker_pid when claimed, cleared when queued).
    node_id = CharField(null=True)

    class Meta:
        indexes = ((("routine", "state"), False),)

    @property
    def is_ended(self) -> bool:
        return self.state in ENDED_STATES


class TaskResult(BaseModel):
    """One attempt of one step of a flow."""

    id = AutoField()
    flow = ForeignKeyField(Flow, backref="task_results", on_delete="CASCADE", index=False)  # (flow, ...) below
    position = IntegerField()
    task = CharField()
    attempt = IntegerField()
    state = CharField(default=StepState.RUNNING.value)
    input = JSONField(null=True)
    output = JSONField(null=True)
    error = TextField(null=True)
    worker_pid = IntegerField(null=True)
    started_at = DateTimeField(default=utcnow)
    finished_at = DateTimeField(null=True)
    node_id = CharField(null=True)  # schema v6: which node ran this attempt

    class Meta:
        indexes = ((("flow", "position", "attempt"), True),)


class Outbox(BaseModel):
    """A message waiting for the broker's PUBACK; deleted only once acknowledged."""

    id = AutoField()
    topic = CharField()
    payload = TextField()
    qos = IntegerField(default=1)
    retain = BooleanField(default=False)
    correlation_data = TextField(null=True)
    created_at = DateTimeField(default=utcnow)
    node_id = CharField(null=True)  # schema v6: the node that publishes it (another once its lease expired)


class NodeStatus(BaseModel):
    """What the daemon says about itself, for ``flowctl status``."""

    node_id = CharField(primary_key=True)
    pid = IntegerField()
    version = CharField()
    started_at = DateTimeField()
    heartbeat_at = DateTimeField()
    broker_connected = BooleanField(default=False)
    stopped_at = DateTimeField(null=True)


class NodeLease(BaseModel):
    """A node's claim to be alive on a shared database (SPEC 10), renewed every third of
    ``[flowd] lease``; once ``expires_at`` has passed, the live nodes take over its flows.
    Times are the database server's clock, so the nodes' own clocks may differ."""

    node_id = CharField(primary_key=True)
    renewed_at = DateTimeField()
    expires_at = DateTimeField()
    client_id = CharField(null=True)  # its MQTT client id: whose broker session to end
    taken_by = CharField(null=True)   # the live node that ended its session after the lease expired


class Meta(BaseModel):
    """Small key/value facts: schema version, definitions version, counters."""

    key = CharField(primary_key=True)
    value = TextField()


ALL_MODELS: list[type[Model]] = [Task, Routine, RoutineStep, Flow, TaskResult, Outbox, NodeStatus, NodeLease, Meta]


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL, or None for another backend."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


def _one_line(exc: BaseException) -> str:
    """A driver's message on one line (PostgreSQL's span several)."""
    return " ".join(str(exc).split())


def connect_database(section: DatabaseSection, *, create: bool = True,
                     busy_timeout: float = BUSY_TIMEOUT_S) -> peewee.Database:
    """Open the database for this process (its schema: ``migrations.init_database``).

    ``create=False`` refuses to create a missing SQLite file (flowctl reading a
    database that is not there yet); ``busy_timeout`` is how long a write waits for
    another process's lock. Raises StoreUnavailable when it cannot be used.
    """
    path = sqlite_path(section.url)
    if path is not None:
        if not create and not path.exists():
            raise StoreUnavailable(f"the database {path} does not exist yet: flowd creates it at its first start; "
                                   "if flowd has run, check the configuration file used ([flowd] state_dir, "
                                   "[database] url)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the state folder {path.parent}: {exc.strerror}") from None
        db: peewee.Database = peewee.SqliteDatabase(
            str(path),
            timeout=busy_timeout,
            pragmas={
                "auto_vacuum": "incremental",  # must come first: only takes effect before WAL and tables
                "journal_mode": "wal",
                # Both settings: a commit writes its WAL frames without a fsync, and
                # make_durable() syncs them, outside the write lock (flowd.store.durability).
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": int(busy_timeout * 1000),
            },
        )
    else:
        from playhouse.db_url import connect

        try:
            db = connect(section.url)
        except (peewee.ImproperlyConfigured, ImportError, RuntimeError) as exc:
            raise StoreUnavailable(f"the database {redact_url(section.url)} cannot be used: {_one_line(exc)}") from exc
        if isinstance(db, peewee.PostgresqlDatabase):
            # A process frozen inside a transaction (SIGSTOP, a stalled VM) would hold its
            # row locks, and with them another node's takeover, for as long as it sleeps.
            timeout = f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_S * 1000}"
            db.connect_params["options"] = " ".join(filter(None, [db.connect_params.get("options"), timeout]))
    durability.configure(path, section.synchronous)
    writer_lock.configure(path)
    database.initialize(db)
    try:
        old_umask = os.umask(0o077)
        try:
            db.connect(reuse_if_open=True)
        finally:
            os.umask(old_umask)
    except DATABASE_ERRORS as exc:
        raise unusable(section, exc) from exc
    return db


DATABASE_ERRORS = (peewee.DatabaseError, sqlite3.DatabaseError, peewee.InterfaceError, peewee.ImproperlyConfigured)


def unusable(section: DatabaseSection, exc: BaseException) -> StoreUnavailable:
    """The error for a database the driver refused to open or to read."""
    where = sqlite_path(section.url) or redact_url(section.url)
    return StoreUnavailable(f"the database {where} cannot be used: {_one_line(exc)}")


def reconnect_after_fork() -> None:
    """Forked processes must open their own connection (SQLite handles are per process)."""
    db = database.obj
    if db is not None:
        db._state.reset()  # drop the parent's handle without closing it under the parent


write_transactions = 0  # committed by this process (all threads): tests and benchmarks read it


@contextmanager
def write_transaction(sync: bool = True) -> Iterator[None]:
    """A short IMMEDIATE transaction: takes the write lock first, so read-then-write
    under contention never fails with "database is locked".

    With ``sync`` (the default) the change is on disk when the block exits (see
    :func:`make_durable`), so the caller may report it. ``sync=False`` is for a caller
    whose change becomes visible only through a path that calls :func:`make_durable`
    first: the outbox publisher before it sends, the MQTT bridge before it acknowledges.
    """
    global write_transactions
    db = database.obj
    if isinstance(db, peewee.SqliteDatabase):
        with _immediate(db):
            yield
        write_transactions += 1
        if sync:
            make_durable()
    else:
        try:
            with db.atomic():
                yield
        except (peewee.OperationalError, peewee.InterfaceError):
            if not db.in_transaction() and not db.is_connection_usable():
                # The server ended the session (a restart, or this process was frozen past
                # IDLE_IN_TRANSACTION_S): forget it, so the next statement connects anew.
                db._state.reset()
            raise
        write_transactions += 1


@contextmanager
def _immediate(db: peewee.SqliteDatabase) -> Iterator[None]:
    """BEGIN IMMEDIATE under this process's writer lock; a nested call is a savepoint."""
    if db.in_transaction():
        with db.atomic():
            yield
        return
    with writer_lock.held(), db.atomic(lock_type="IMMEDIATE"):
        yield


def get_meta(key: str, default: str | None = None) -> str | None:
    row = Meta.get_or_none(Meta.key == key)
    return row.value if row else default


def set_meta(key: str, value: str) -> None:
    Meta.insert(key=key, value=value).on_conflict(conflict_target=[Meta.key], update={Meta.value: value}).execute()


def bump_definitions_version() -> None:
    """Tell a running daemon that tasks or routines changed (it rebuilds schedules)."""
    current = int(get_meta("definitions_version", "0") or 0)
    set_meta("definitions_version", str(current + 1))


def definitions_version() -> int:
    return int(get_meta("definitions_version", "0") or 0)
