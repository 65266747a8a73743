"""``flowctl db recover``: a damaged SQLite database salvaged into a new file, put in place.

:func:`recover_database` takes the daemon's state-folder lock, reads every row that can
be read (:mod:`flowd.store.salvage`), writes them into a new file with the damaged file's
schema, handles rows that point at lost ones as their foreign keys say, completes
flowd's schema, checks the result with ``integrity_check`` and only then swaps the files:
the damaged one (and its ``-wal``/``-shm``) is kept beside it as
``<name>.damaged-<UTC time>``. The report says, per table, what was seen, saved and lost.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowd.config import Config
from flowd.errors import InputError, StoreUnavailable
from flowd.store.integrity import (
    MAX_PROBLEMS,
    CheckResult,
    check_file,
    database_file,
    replace_damaged_queue,
    set_aside,
)

if TYPE_CHECKING:
    from flowd.store.salvage import Salvage, SchemaEntry

log = logging.getLogger(__name__)


@dataclass
class TableReport:
    """One table in the recovery report."""

    seen: int          # rows the damaged file still showed (in the table or in one of its indexes)
    saved: int         # rows in the new file
    adopted: int = 0   # of those, rows found on pages no tree reached any more
    dropped: int = 0   # rows read but unusable (damaged values, conflicts, refer to lost rows)
    lost_ids: list[int] = field(default_factory=list)


@dataclass
class RecoveryReport:
    """What ``flowctl db recover`` did."""

    database: str
    action: str                          # "recovered", "not needed"
    check: CheckResult
    kept_as: str | None = None
    lost_and_found: int = 0
    lost_and_found_file: str | None = None
    header_damaged: bool = False
    wal_frames: int = 0
    page_size: int = 0
    bad_pages: dict[int, str] = field(default_factory=dict)
    tables: dict[str, TableReport] = field(default_factory=dict)
    flows_before: dict[str, int] = field(default_factory=dict)   # by state, from the flow_state index
    flows_after: dict[str, int] = field(default_factory=dict)
    lost_flows: dict[str, int] = field(default_factory=dict)     # by state, where the index still said it
    flows_missing_steps: list[int] = field(default_factory=list)  # saved flows whose step records were lost
    disabled_routines: list[str] = field(default_factory=list)
    queue_kept_as: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bad_pages"] = {str(k): v for k, v in self.bad_pages.items()}
        return data


def recover_database(config: Config, *, force: bool = False, now: dt.datetime | None = None) -> RecoveryReport:
    """Salvage the damaged SQLite database of ``config`` into a new file and put it in place.

    Refuses while a daemon holds the state folder. Raises InputError for PostgreSQL,
    StoreUnavailable when the file is missing, busy or nothing at all could be read.
    """
    from flowd.service.statelock import lock_state_dir, unlock_state_dir

    path = database_file(config)
    if path is None:
        from flowd.config import redact_url

        raise InputError(f"flowctl db recover works on SQLite files; [database] url is "
                         f"{redact_url(config.database.url)}: use the server's own tools")
    if not path.exists():
        raise StoreUnavailable(f"the database {path} does not exist; nothing to recover")
    started = time.monotonic()
    fd = lock_state_dir(config.state_dir, purpose="recover the database")
    try:
        check = check_file(path, full=True)
        report = RecoveryReport(str(path), "not needed", check)
        if check.ok and not force:
            return report
        _salvage_into_place(path, report, now)
        kept = replace_damaged_queue(config, now)
        report.queue_kept_as = str(kept) if kept else None
        report.action = "recovered"
        report.seconds = round(time.monotonic() - started, 2)
        log.info("database %s recovered; the damaged file is kept as %s", path, report.kept_as)
        return report
    finally:
        unlock_state_dir(fd)


def _salvage_into_place(path: Path, report: RecoveryReport, now: dt.datetime | None) -> None:
    from flowd.store import salvage

    try:
        found = salvage.read_file(path, fallback_schema=flowd_schema())
    except OSError as exc:
        raise StoreUnavailable(f"the database {path} cannot be read: {exc.strerror}") from None
    report.header_damaged = not found.header_ok
    report.wal_frames = found.wal_frames
    report.page_size = found.page_size
    report.bad_pages = dict(sorted(found.bad_pages.items())[:MAX_PROBLEMS])
    if not any(found.rows.values()):
        raise StoreUnavailable(f"nothing could be read from the database {path} (page size {found.page_size}, "
                               f"{found.page_count} pages); it was left as it is")
    dropped = _drop_unreadable_values(found)
    work = path.with_name(f"{path.name}.recovering")
    scratch = [work, *(Path(f"{work}{suffix}") for suffix in ("-wal", "-shm", "-journal"))]
    for leftover in scratch:
        leftover.unlink(missing_ok=True)
    try:
        saved_ids = _write_new_file(work, found, dropped, report)
        _complete_schema(work)
        _copy_owner(path, work)
    except BaseException:
        for leftover in scratch:
            leftover.unlink(missing_ok=True)
        raise
    _report_tables(found, saved_ids, dropped, report)
    flows_after = _flows_by_state(work)
    report.flows_after = flows_after
    if found.lost_and_found:
        lost_file = path.with_name(f"{path.name}.lost-and-found-{_stamp(now)}")
        _write_lost_and_found(lost_file, found.lost_and_found)
        report.lost_and_found = len(found.lost_and_found)
        report.lost_and_found_file = str(lost_file)
    report.kept_as = str(set_aside(path, now, replacement=work))


def _stamp(now: dt.datetime | None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")


def flowd_schema() -> list[SchemaEntry]:
    """flowd's current tables and indexes as schema entries (root pages unknown)."""
    import peewee

    from flowd.store import models, salvage

    scratch = peewee.SqliteDatabase(":memory:")
    with scratch.bind_ctx(models.ALL_MODELS):
        scratch.create_tables(models.ALL_MODELS)
        rows = scratch.execute_sql(  # type: ignore[no-untyped-call]
            "SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    scratch.close()
    return [salvage.SchemaEntry(t, n, tbl, 0, sql) for t, n, tbl, sql in rows]


def _drop_unreadable_values(found: Salvage) -> dict[str, int]:
    """Rows whose JSON columns do not parse or whose state is unknown: flowd could not use them."""
    from flowd.store import models

    json_columns: dict[str, list[str]] = {}
    for model in models.ALL_MODELS:
        json_columns[model._meta.table_name] = [f.column_name for f in model._meta.sorted_fields
                                                if isinstance(f, models.JSONField)]
    states = {s.value for s in models.FlowState}
    dropped: dict[str, int] = {}
    for entry in found.tables():
        columns = _columns_of(entry.sql)
        checks = [columns.index(c) for c in json_columns.get(entry.name, []) if c in columns]
        state_at = columns.index("state") if entry.name == "flow" and "state" in columns else None
        rows = found.rows[entry.name]
        for rowid in list(rows):
            values = rows[rowid]
            if len(values) > len(columns) or (state_at is not None and state_at < len(values)
                                              and values[state_at] not in states):
                bad = True
            else:
                bad = False
                for i in checks:
                    if i < len(values) and values[i] is not None:
                        try:
                            json.loads(values[i])
                        except (TypeError, ValueError):
                            bad = True
                            break
            if bad:
                del rows[rowid]
                dropped[entry.name] = dropped.get(entry.name, 0) + 1
    return dropped


def _columns_of(sql: str | None) -> list[str]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(sql or "")
        name = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        return [row[1] for row in conn.execute(f'PRAGMA table_info("{name}")')]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def _write_new_file(work: Path, found: Salvage, dropped: dict[str, int], report: RecoveryReport) -> dict[str, set[int]]:
    """Create ``work`` with the damaged file's schema and every row read; the rowids saved per table."""
    conn = sqlite3.connect(work, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size = {found.page_size}")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # flowd's setting; only takes effect before any table
        conn.execute("BEGIN")
        fallback = {e.name: e.sql for e in flowd_schema()}
        for entry in found.tables():
            for sql in (entry.sql, fallback.get(entry.name)):
                try:
                    conn.execute(sql or "")
                except sqlite3.Error:
                    continue
                if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (entry.name,)).fetchone():
                    break
        for entry in found.schema:
            if entry.type == "index" and entry.sql:
                try:
                    conn.execute(entry.sql)
                except sqlite3.Error:
                    log.warning("recover: index %s could not be created again; flowd's schema check adds its own",
                                entry.name)
        for entry in found.tables():
            info = conn.execute(f'PRAGMA table_info("{entry.name}")').fetchall()
            if not info:
                continue
            names = [row[1] for row in info]
            keys = [row for row in info if row[5]]
            alias = keys[0][0] if len(keys) == 1 and keys[0][2].upper() == "INTEGER" else None
            for rowid, values in sorted(found.rows[entry.name].items()):
                values = list(values[:len(names)])
                if alias is not None and alias < len(values):
                    values[alias] = rowid
                    columns = names[:len(values)]
                else:
                    columns = ["rowid", *names[:len(values)]]
                    values = [rowid, *values]
                marks = ", ".join("?" * len(values))
                quoted = ", ".join(f'"{c}"' for c in columns)
                cursor = conn.execute(f'INSERT OR IGNORE INTO "{entry.name}" ({quoted}) VALUES ({marks})', values)
                if cursor.rowcount != 1:
                    dropped[entry.name] = dropped.get(entry.name, 0) + 1
        report.disabled_routines = _apply_foreign_keys(conn, dropped)
        conn.execute("COMMIT")
        saved = {}
        for entry in found.tables():
            try:
                saved[entry.name] = {r[0] for r in conn.execute(f'SELECT rowid FROM "{entry.name}"')}
            except sqlite3.Error:
                saved[entry.name] = set()
        return saved
    finally:
        conn.close()


def _apply_foreign_keys(conn: sqlite3.Connection, dropped: dict[str, int]) -> list[str]:
    """Rows that point at a lost row are handled as if it had been deleted (CASCADE or SET
    NULL); a routine that lost a step is disabled, since it would run without it."""
    disabled: set[int] = set()
    for _ in range(10):
        problems = conn.execute("PRAGMA foreign_key_check").fetchall()
        if not problems:
            break
        for table, rowid, _parent, fk_id in problems:
            keys = {row[0]: row for row in conn.execute(f'PRAGMA foreign_key_list("{table}")')}
            key = keys.get(fk_id)
            if key is not None and key[6].upper() == "SET NULL":
                conn.execute(f'UPDATE "{table}" SET "{key[3]}" = NULL WHERE rowid = ?', (rowid,))
                continue
            if table == "routine_step":
                row = conn.execute('SELECT routine_id FROM routine_step WHERE rowid = ?', (rowid,)).fetchone()
                if row is not None:
                    disabled.add(row[0])
            conn.execute(f'DELETE FROM "{table}" WHERE rowid = ?', (rowid,))
            dropped[table] = dropped.get(table, 0) + 1
    names = []
    for routine_id in sorted(disabled):
        conn.execute("UPDATE routine SET enabled = 0 WHERE id = ?", (routine_id,))
        row = conn.execute("SELECT name FROM routine WHERE id = ?", (routine_id,)).fetchone()
        if row is not None:
            names.append(row[0])
    return names


def _complete_schema(work: Path) -> None:
    """Give the salvaged file flowd's full schema: its version, every table and index."""
    import peewee

    from flowd.store import migrations, models

    db = peewee.SqliteDatabase(str(work), pragmas={"foreign_keys": 0})
    with db.bind_ctx(models.ALL_MODELS):
        db.connect()
        try:
            has_version = db.table_exists("meta") and db.execute_sql(  # type: ignore[no-untyped-call]
                "SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone() is not None
            version: int | None = None
            if not db.table_exists("flow"):
                db.create_tables(models.ALL_MODELS, safe=True)
                version = migrations.LATEST
            elif not has_version:
                # The version row was lost: tell it from the schema (v2 added parent_id, v3
                # dropped the flow_routine index, v4 added routine.status, v5 dropped flow_uid).
                columns = {c.name for c in db.get_columns("flow")}
                indexes = {i.name for i in db.get_indexes("flow")}
                has_status = db.table_exists("routine") and "status" in {c.name for c in db.get_columns("routine")}
                version = (1 if "parent_id" not in columns else 2 if "flow_routine" in indexes
                           else 3 if not has_status else 4 if "flow_uid" in indexes else 5)
            if version is not None:
                db.create_tables([models.Meta], safe=True)
                models.set_meta("schema_version", str(version))
            migrations.upgrade_schema(db)
            db.create_tables(models.ALL_MODELS, safe=True)
            problems = [r[0] for r in db.execute_sql("PRAGMA integrity_check").fetchall()]  # type: ignore[no-untyped-call]
            if problems != ["ok"]:
                raise StoreUnavailable(f"the salvaged copy {work} does not pass integrity_check "
                                       f"({problems[0]}); the damaged database was left in place")
            db.execute_sql("PRAGMA journal_mode = wal").fetchall()  # type: ignore[no-untyped-call]
        finally:
            db.close()  # the last connection: checkpoints and removes the -wal
    with open(work, "rb") as handle:
        os.fsync(handle.fileno())


def _copy_owner(original: Path, work: Path) -> None:
    st = original.stat()
    os.chmod(work, st.st_mode & 0o777)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.stat(work).st_uid, os.stat(work).st_gid):
        os.chown(work, st.st_uid, st.st_gid)


def _flows_by_state(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)  # not read-only: closing it removes the -wal and -shm it opens
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM flow GROUP BY state ORDER BY state").fetchall())
    finally:
        conn.close()


def _report_tables(found: Salvage, saved_ids: dict[str, set[int]], dropped: dict[str, int],
                   report: RecoveryReport) -> None:
    for entry in found.tables():
        indexed = found.indexed.get(entry.name, {})
        seen = set(found.rows[entry.name]).union(*indexed.values()) if indexed else set(found.rows[entry.name])
        saved = saved_ids.get(entry.name, set())
        seen |= saved
        report.tables[entry.name] = TableReport(seen=len(seen), saved=len(saved), adopted=found.adopted[entry.name],
                                                dropped=dropped.get(entry.name, 0),
                                                lost_ids=sorted(seen - saved))
    states = found.indexed.get("flow", {}).get("flow_state", {})
    before: dict[str, int] = {}
    for state in states.values():
        before[str(state)] = before.get(str(state), 0) + 1
    report.flows_before = dict(sorted(before.items()))
    lost: dict[str, int] = {}
    for flow_id in report.tables.get("flow", TableReport(0, 0)).lost_ids:
        state = str(states.get(flow_id, "unknown"))
        lost[state] = lost.get(state, 0) + 1
    report.lost_flows = dict(sorted(lost.items()))
    # Any index of task_result led by flow_id names a lost attempt's flow (v5 kept only the unique one).
    by_index = found.indexed.get("task_result", {})
    owners = {**by_index.get("task_result_flow_id_position_attempt", {}), **by_index.get("task_result_flow_id", {})}
    saved_flows = saved_ids.get("flow", set())
    missing = {owners.get(rid) for rid in report.tables.get("task_result", TableReport(0, 0)).lost_ids}
    report.flows_missing_steps = sorted(f for f in missing if isinstance(f, int) and f in saved_flows)


def _write_lost_and_found(target: Path, rows: list[tuple[int, int, list[Any]]]) -> None:
    """Rows no table could be told for, in a SQLite file of their own (page, rowid, c0, c1...)."""
    width = max(len(values) for _, _, values in rows)
    columns = ", ".join(f"c{i}" for i in range(width))
    conn = sqlite3.connect(target)
    try:
        conn.execute(f"CREATE TABLE lost_and_found (page INTEGER, rowid_was INTEGER, fields INTEGER, {columns})")
        marks = ", ".join("?" * (width + 3))
        conn.executemany(f"INSERT INTO lost_and_found VALUES ({marks})",
                         [(page, rowid, len(v), *v, *([None] * (width - len(v)))) for page, rowid, v in rows])
        conn.commit()
    finally:
        conn.close()
