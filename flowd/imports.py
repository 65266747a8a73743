"""What a long-lived flowd process imports at its start: nothing the node does not use.

huey.storage imports redis, and peewee and playhouse.migrate psycopg2 (and psycopg),
whenever they are installed: ~8 and ~5 MiB in every process of a node on SQLite. The
daemon calls :func:`import_for` before it forks its workers; a replacement worker (a
fresh interpreter) calls it too. playhouse.migrate (~0.5 MiB) is imported only when a
schema upgrade runs (:mod:`flowd.migrations`).
"""

from __future__ import annotations

import importlib
import sys

from flowd.config import Config


def import_for(config: Config) -> None:
    """Import the storage modules without the drivers ``config`` has no use for."""
    unused = ["redis"] if config.queue.backend == "sqlite" else []
    if config.database.url.startswith("sqlite:"):
        unused += ["psycopg2", "psycopg"]
    import_without(unused, ["peewee", "huey.storage"])


def import_without(absent: list[str], modules: list[str]) -> None:
    """Import ``modules`` as if the packages ``absent`` were not installed; later imports
    (a task script's) find them as usual."""
    hidden = [name for name in absent if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # what "import" takes for "not installed"
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
