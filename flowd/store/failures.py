"""Which driver errors mean "the database cannot be used here", in one sentence.

The drivers (sqlite3, peewee's wrappers of psycopg) stay behind the store: flowctl asks
this module instead of sorting their exception types itself.
"""

from __future__ import annotations

import sqlite3

import peewee


def unusable_reason(exc: BaseException, database: str = "the database") -> str | None:
    """A sentence when ``exc`` says ``database`` cannot be used (locked, read-only, not a
    database, driver missing); None for anything else, which is a bug."""
    if isinstance(exc, (sqlite3.OperationalError, peewee.OperationalError)) or type(exc) in (
            sqlite3.DatabaseError, peewee.DatabaseError):  # the last two: "file is not a database"
        return (f"{database} cannot be used: {exc}; check that no other program holds it locked and that "
                "this user may write the state folder")
    if isinstance(exc, peewee.ImproperlyConfigured):  # e.g. no PostgreSQL driver installed
        return f"{database} cannot be used: {exc}"
    return None
