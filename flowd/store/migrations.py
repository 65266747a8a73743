"""Schema versions, so a device that upgrades flowd keeps its data.

A new database gets the current models directly; an older one is brought forward one
numbered step at a time, each step in its own transaction, and the version is kept in
the ``meta`` table. Add a step here whenever a model changes (never edit an old one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import peewee

from flowd.config import DatabaseSection
from flowd.service.imports import import_without
from flowd.store import models

if TYPE_CHECKING:
    from playhouse.migrate import SchemaMigrator

# The schema flowd 0.1 created, frozen: kept so upgrades can be tested from it.
SCHEMA_V1 = """
CREATE TABLE "flow" ("id" INTEGER NOT NULL PRIMARY KEY, "uid" VARCHAR(255) NOT NULL, "routine" VARCHAR(255) NOT NULL, "steps" TEXT NOT NULL, "state" VARCHAR(255) NOT NULL, "position" INTEGER NOT NULL, "args" TEXT NOT NULL, "kwargs" TEXT NOT NULL, "request_id" VARCHAR(255), "trigger" VARCHAR(255) NOT NULL, "reply_to" VARCHAR(255), "correlation_data" TEXT, "admitted" INTEGER NOT NULL, "dispatch_token" INTEGER NOT NULL, "worker_pid" INTEGER, "step_attempt" INTEGER NOT NULL, "interruptions" INTEGER NOT NULL, "next_attempt_at" DATETIME, "deadline" DATETIME, "result" TEXT, "error" TEXT, "created_at" DATETIME NOT NULL, "started_at" DATETIME, "finished_at" DATETIME, "updated_at" DATETIME NOT NULL);
CREATE UNIQUE INDEX "flow_uid" ON "flow" ("uid");
CREATE INDEX "flow_routine" ON "flow" ("routine");
CREATE INDEX "flow_state" ON "flow" ("state");
CREATE UNIQUE INDEX "flow_request_id" ON "flow" ("request_id");
CREATE INDEX "flow_routine_state" ON "flow" ("routine", "state");
CREATE TABLE "meta" ("key" VARCHAR(255) NOT NULL PRIMARY KEY, "value" TEXT NOT NULL);
CREATE TABLE "node_status" ("node_id" VARCHAR(255) NOT NULL PRIMARY KEY, "pid" INTEGER NOT NULL, "version" VARCHAR(255) NOT NULL, "started_at" DATETIME NOT NULL, "heartbeat_at" DATETIME NOT NULL, "broker_connected" INTEGER NOT NULL, "stopped_at" DATETIME);
CREATE TABLE "outbox" ("id" INTEGER NOT NULL PRIMARY KEY, "topic" VARCHAR(255) NOT NULL, "payload" TEXT NOT NULL, "qos" INTEGER NOT NULL, "retain" INTEGER NOT NULL, "correlation_data" TEXT, "created_at" DATETIME NOT NULL);
CREATE TABLE "routine" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(255) NOT NULL, "schedule" VARCHAR(255), "timezone" VARCHAR(255), "jitter" REAL, "mqtt" INTEGER NOT NULL, "mode" VARCHAR(255) NOT NULL, "max" INTEGER NOT NULL, "timeout" REAL, "enabled" INTEGER NOT NULL, "last_scheduled_run" DATETIME, "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL);
CREATE UNIQUE INDEX "routine_name" ON "routine" ("name");
CREATE TABLE "task" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(255) NOT NULL, "script" VARCHAR(255) NOT NULL, "options" TEXT NOT NULL, "retries" INTEGER NOT NULL, "retry_delay" REAL NOT NULL, "retry_backoff_max" REAL NOT NULL, "timeout" REAL, "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL);
CREATE UNIQUE INDEX "task_name" ON "task" ("name");
CREATE TABLE "routine_step" ("id" INTEGER NOT NULL PRIMARY KEY, "routine_id" INTEGER NOT NULL, "position" INTEGER NOT NULL, "task_id" INTEGER NOT NULL, FOREIGN KEY ("routine_id") REFERENCES "routine" ("id") ON DELETE CASCADE, FOREIGN KEY ("task_id") REFERENCES "task" ("id") ON DELETE RESTRICT);
CREATE INDEX "routine_step_routine_id" ON "routine_step" ("routine_id");
CREATE INDEX "routine_step_task_id" ON "routine_step" ("task_id");
CREATE UNIQUE INDEX "routine_step_routine_id_position" ON "routine_step" ("routine_id", "position");
CREATE TABLE "task_result" ("id" INTEGER NOT NULL PRIMARY KEY, "flow_id" INTEGER NOT NULL, "position" INTEGER NOT NULL, "task" VARCHAR(255) NOT NULL, "attempt" INTEGER NOT NULL, "state" VARCHAR(255) NOT NULL, "input" TEXT, "output" TEXT, "error" TEXT, "worker_pid" INTEGER, "started_at" DATETIME NOT NULL, "finished_at" DATETIME, FOREIGN KEY ("flow_id") REFERENCES "flow" ("id") ON DELETE CASCADE);
CREATE INDEX "task_result_flow_id" ON "task_result" ("flow_id");
CREATE UNIQUE INDEX "task_result_flow_id_position_attempt" ON "task_result" ("flow_id", "position", "attempt");
"""


def _v2_waits_and_subflows(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """v2: waiting steps and sub-flows (SPEC 2.1) need the parent link and the wait."""
    from playhouse.migrate import migrate

    flow = models.Flow
    migrate(
        migrator.add_column("flow", "parent_id", flow.parent),
        migrator.add_column("flow", "depth", flow.depth),
        migrator.add_column("flow", "wait_topic", flow.wait_topic),
        migrator.add_column("flow", "wait_match", flow.wait_match),
        migrator.add_column("flow", "wait_until", flow.wait_until),  # add_column indexes parent_id itself
    )


def _v3_drop_redundant_index(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """v3: (routine, state) already serves every lookup by routine; one index less to
    write on each flow change (SD-card wear)."""
    from playhouse.migrate import migrate

    migrate(migrator.drop_index("flow", "flow_routine"))


def _v4_routine_status(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """v4: a routine's ``status`` (SPEC 4.4), ``steps`` for every existing routine.

    One ALTER TABLE with the default in the column: playhouse's add_column would add it
    nullable and then rebuild the table for NOT NULL, and dropping the old routine table
    inside the migration's transaction would cascade to routine_step.
    """
    db.execute_sql(  # type: ignore[no-untyped-call]
        "ALTER TABLE \"routine\" ADD COLUMN \"status\" VARCHAR(255) NOT NULL DEFAULT 'steps'")


def _v5_drop_write_heavy_indexes(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """v5: two indexes no query needs, each written on every new flow or attempt (SD-card
    wear, issue 12): ``flow_uid`` (a random UUID lands on a random page; uids are shown,
    never looked up) and ``task_result_flow_id`` (the unique (flow, position, attempt)
    index serves every lookup by flow)."""
    for name in ("flow_uid", "task_result_flow_id"):
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')  # type: ignore[no-untyped-call]


def _v6_nodes(db: peewee.Database, migrator: SchemaMigrator) -> None:
    """v6: several nodes on one database (SPEC 10): who holds a flow and ran an attempt,
    and each node's lease."""
    from playhouse.migrate import migrate

    migrate(
        migrator.add_column("flow", "node_id", models.Flow.node_id),
        migrator.add_column("task_result", "node_id", models.TaskResult.node_id),
        migrator.add_column("outbox", "node_id", models.Outbox.node_id),
    )
    db.create_tables([models.NodeLease], safe=True)


# Step N takes a database at version N-1 to version N.
STEPS: dict[int, Callable[[peewee.Database, SchemaMigrator], None]] = {
    2: _v2_waits_and_subflows,
    3: _v3_drop_redundant_index,
    4: _v4_routine_status,
    5: _v5_drop_write_heavy_indexes,
    6: _v6_nodes,
}
LATEST = max(STEPS)


def schema_version(db: peewee.Database) -> int:
    """0 for an empty database, else the stored version."""
    if not db.table_exists("meta"):
        return 1 if db.table_exists("flow") else 0
    row = db.execute_sql(  # type: ignore[no-untyped-call]
        "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 1


def create_v1_schema(db: peewee.Database) -> None:
    """Lay down the frozen v1 schema (SQLite), as an old flowd left it."""
    for statement in filter(None, (s.strip() for s in SCHEMA_V1.split(";\n"))):
        db.execute_sql(statement.rstrip(";"))  # type: ignore[no-untyped-call]


def init_database(section: DatabaseSection, *, create: bool = True,
                  busy_timeout: float = models.BUSY_TIMEOUT_S) -> peewee.Database:
    """Open the database for this process and bring its schema up to date
    (``models.connect_database``, then :func:`upgrade_schema`)."""
    db = models.connect_database(section, create=create, busy_timeout=busy_timeout)
    try:
        upgrade_schema(db)
    except models.DATABASE_ERRORS as exc:
        raise models.unusable(section, exc) from exc
    return db


def upgrade_schema(db: peewee.Database) -> int:
    """Create or upgrade the schema; returns the version now in place."""
    with db.atomic():
        version = schema_version(db)
        if version == 0:
            db.create_tables(models.ALL_MODELS, safe=True)
            models.set_meta("schema_version", str(LATEST))
            return LATEST
    if version > LATEST:
        from flowd.errors import StoreUnavailable

        raise StoreUnavailable(f"the database has schema version {version}, newer than this flowd "
                               f"understands ({LATEST}); upgrade flowd")
    if version == LATEST:  # the usual start: nothing to do, nor to import (playhouse.migrate, ~0.5 MiB)
        return version
    if isinstance(db, peewee.SqliteDatabase):  # its PostgreSQL helpers would load the drivers
        import_without(["psycopg2", "psycopg"], ["playhouse.migrate"])
    from playhouse.migrate import SchemaMigrator

    migrator = SchemaMigrator.from_database(db)
    for target in range(version + 1, LATEST + 1):
        with db.atomic():
            STEPS[target](db, migrator)
            models.set_meta("schema_version", str(target))
    return LATEST
