"""Damaged SQLite files: checked at start, noticed while running, salvaged on request (SPEC 7).

- :func:`check_file` runs SQLite's ``quick_check`` (``integrity_check`` with
  ``full=True``) on a read-only connection: safe while the daemon runs.
- :func:`check_at_start` is the daemon's gate: a damaged database raises
  :class:`~flowd.errors.DatabaseDamaged` before anything is opened or published.
- :func:`replace_damaged_queue` moves a damaged queue file aside; a fresh one is
  created and recovery re-queues every unfinished flow from flowd's tables.
- :func:`note_damage` is called where the daemon catches errors (its periodic duties,
  the outbox thread, the MQTT intake); the main loop asks :func:`damage_noticed`
  and stops with one clear line instead of failing the same way forever.
- ``flowctl db recover`` is :mod:`flowd.store.dbrecover`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowd.config import Config
from flowd.errors import DatabaseDamaged, StoreUnavailable

log = logging.getLogger(__name__)

SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26
DAMAGE_WORDS = ("malformed", "file is not a database", "database corruption")
MAX_PROBLEMS = 100
CHECK_TIMEOUT_S = 15.0

_damage: DatabaseDamaged | None = None
_damage_lock = threading.Lock()


# --------------------------------------------------------------------------- what damage looks like
def is_damage(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what it wraps) is SQLite saying the file is damaged."""
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, DatabaseDamaged):
            return True
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return True
        if isinstance(exc, sqlite3.DatabaseError) and any(w in str(exc) for w in DAMAGE_WORDS):
            return True
        wrapped = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        exc = wrapped or exc.__cause__ or exc.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc)
    return " ".join(text.split()) or type(exc).__name__


def note_damage(exc: BaseException, found_by: str) -> bool:
    """Remember a damage error met by ``found_by``; False (nothing noted) for any other error."""
    global _damage
    if not is_damage(exc):
        return False
    with _damage_lock:
        if _damage is None:
            from flowd.store.models import database

            path = getattr(database.obj, "database", None) or "(unknown file)"
            _damage = DatabaseDamaged(path, _first_line(exc), found_by=found_by)
    return True


def damage_noticed() -> DatabaseDamaged | None:
    """The first damage noted in this process, if any."""
    return _damage


def clear_damage() -> None:
    global _damage
    with _damage_lock:
        _damage = None


# --------------------------------------------------------------------------- checks
@dataclass
class CheckResult:
    """The outcome of checking one file; ``ok`` is None when there was nothing to check."""

    what: str
    path: str
    check: str
    ok: bool | None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    size: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_file(path: Path, *, what: str = "database", full: bool = False, describe: bool = False) -> CheckResult:
    """``PRAGMA quick_check`` (or ``integrity_check``) of ``path`` on a read-only connection.

    ``describe`` adds, for a damaged file, every unreadable page and its table (flowd's
    own reader goes through the whole file: seconds per 100 MB, so not at daemon start).
    Raises StoreUnavailable when the file cannot be checked at all (locked, no access);
    damage is a result, not an exception.
    """
    check = "integrity_check" if full else "quick_check"
    if not path.exists():
        return CheckResult(what, str(path), check, None, note="does not exist yet")
    result = CheckResult(what, str(path), check, True, size=path.stat().st_size)
    started = time.monotonic()
    old_umask = os.umask(0o077)  # a reader may create the -wal/-shm files: keep them private
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=CHECK_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"the {what} {path} cannot be opened: {exc}") from exc
    finally:
        os.umask(old_umask)
    try:
        for (line,) in conn.execute(f"PRAGMA {check}({MAX_PROBLEMS})"):
            if line != "ok":
                result.problems.extend(part for part in str(line).splitlines() if part.strip())
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise StoreUnavailable(f"the {what} {path} cannot be checked: {exc}") from exc
        result.problems.append(str(exc))
    finally:
        conn.close()
    result.problems = [p for p in result.problems if not p.startswith("*** in database")][:MAX_PROBLEMS]
    result.ok = not result.problems
    if not result.ok and describe:
        result.problems.extend(_unreadable_pages(path))
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _unreadable_pages(path: Path) -> list[str]:
    """SQLite stops at the first damaged page; flowd's own reader names every one, and its table."""
    from flowd.store import salvage

    try:
        found = salvage.read_file(path)
    except OSError:
        return []
    lines = [f"page {pgno}, {why}" for pgno, why in sorted(found.bad_pages.items())[:MAX_PROBLEMS]]
    if not found.header_ok:
        lines.insert(0, "the file header (first 100 bytes) is damaged")
    return lines


def check_files(config: Config, *, full: bool = False) -> list[CheckResult]:
    """``flowctl db check``: the database (SQLite only) and the SQLite queue file.

    Raises StoreUnavailable when the database file does not exist.
    """
    from flowd.config import redact_url

    check = "integrity_check" if full else "quick_check"
    path = database_file(config)
    if path is None:
        results = [CheckResult("database", redact_url(config.database.url), check, None,
                               note="PostgreSQL checks its own files; nothing to do here")]
    elif not path.exists():
        raise StoreUnavailable(f"the database {path} does not exist yet; start flowd once or check "
                               "[database] url / [flowd] state_dir")
    else:
        results = [check_file(path, full=full, describe=True)]
    if config.queue.backend == "sqlite":
        queue = check_file(Path(config.queue.path), what="queue file", full=full, describe=True)
        if queue.ok is None:
            queue.note = "does not exist yet (flowd creates it at start)"
        results.append(queue)
    return results


def _summary(result: CheckResult) -> str:
    """SQLite's first finding and flowd's reader's first (which names the page and its table)."""
    ours = [p for p in result.problems if p.startswith(("page ", "the file header"))]
    theirs = [p for p in result.problems if p not in ours]
    shown = theirs[:1] + ours[:1]
    more = len(result.problems) - len(shown)
    return "; ".join(shown) + (f"; {more} more problem(s)" if more > 0 else "")


def database_file(config: Config) -> Path | None:
    """The SQLite file of ``[database] url``, None for PostgreSQL."""
    from flowd.store.models import sqlite_path

    return sqlite_path(config.database.url)


def check_at_start(config: Config) -> None:
    """The daemon's gate: raises DatabaseDamaged for a damaged SQLite database."""
    path = database_file(config)
    if path is None or not path.exists():
        return
    result = check_file(path)
    if not result.ok:
        raise DatabaseDamaged(path, _summary(result))
    log.info("database %s: quick_check ok in %.2fs", path, result.seconds)


def set_aside(path: Path, now: dt.datetime | None = None, label: str = "damaged", *,
              replacement: Path | None = None) -> Path:
    """Rename ``path`` and its ``-wal``/``-shm`` to ``<name>.<label>-<UTC time>``; the new name.

    With ``replacement``, that file takes ``path``'s place in one rename: the damaged file
    is hard-linked to its new name first, so no moment exists without a ``path`` (a
    daemon started then would create an empty database).
    """
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
    if replacement is None:
        os.replace(path, target)
    else:
        try:
            os.link(path, target)
        except OSError:  # a file system without hard links
            shutil.copy2(path, target)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{target}{suffix}"))
    if replacement is not None:
        os.replace(replacement, path)
    _fsync_folder(path.parent)
    return target


def replace_damaged_queue(config: Config, now: dt.datetime | None = None) -> Path | None:
    """Move a damaged SQLite queue file aside (kept); where it went, or None if it was fine.

    The queue only carries "run flow N": recovery rebuilds it from flowd's tables.
    """
    if config.queue.backend != "sqlite":
        return None
    path = Path(config.queue.path)
    result = check_file(path, what="queue file")
    if result.ok is not False:
        return None
    kept = set_aside(path, now)
    log.warning("the queue file %s was damaged (%s); kept it as %s and started a new one: every unfinished "
                "flow is queued again from the database", path, _summary(result), kept.name)
    return kept


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

