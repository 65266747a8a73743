"""What a long-lived flowd process imports at its start: nothing the node does not use.

huey.storage imports redis, and peewee and playhouse.migrate psycopg2 (and psycopg),
whenever they are installed: ~8 and ~5 MiB in every process of a node on SQLite. The
daemon calls :func:`import_for` before it forks its workers; a replacement worker (a
fresh interpreter) calls it too. playhouse.migrate (~0.5 MiB) is imported only when a
schema upgrade runs (:mod:`flowd.store.migrations`).

paho imports ``ssl`` (for TLS) and ``urllib.request`` (to read an ``mqtt_proxy``
variable; it brings ``email``, ``http.client``, ``tempfile``...): ~4.5 MiB before the
fork that a broker without TLS and proxy never uses. Without ``[mqtt.tls]`` both are
*deferred* (:func:`defer_import`): the module object exists at once, its code runs at
the first use of one of its names, by paho, by flowd or by a task.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

from flowd.config import Config

# What paho imports for TLS and for a proxy taken from the environment.
PAHO_OPTIONAL = ("ssl", "urllib.request")


def import_for(config: Config) -> None:
    """Import the storage modules without the drivers ``config`` has no use for."""
    unused = ["redis"] if config.queue.backend == "sqlite" else []
    if config.database.url.startswith("sqlite:"):
        unused += ["psycopg2", "psycopg"]
    if config.mqtt.tls is None:
        defer_import(PAHO_OPTIONAL)
    import_without(unused, ["peewee", "huey.storage"])


class DeferredModule(types.ModuleType):
    """A module whose code runs at the first use of a name it defines.

    Unlike ``importlib.util.LazyLoader`` (whose module loads at the next ``import`` of
    it: the import statement reads ``__spec__``), the dunders are set from the start,
    so ``import`` and ``from ... import ...`` of other modules leave it alone, and the
    first use is serialised by a lock: a second thread waits for the code to finish
    instead of seeing a half-filled module."""

    def __getattr__(self, name: str) -> Any:
        namespace = object.__getattribute__(self, "__dict__")
        lock = namespace.get("__deferred_lock__")
        if lock is not None:
            with lock:
                if namespace.pop("__deferred__", False):
                    self._run_code()
        return object.__getattribute__(self, name)

    def _run_code(self) -> None:
        try:
            self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
        except BaseException:
            if sys.modules.get(self.__name__) is self:  # as a failed import leaves it: not imported
                del sys.modules[self.__name__]
            raise
        self.__class__ = types.ModuleType  # type: ignore[assignment]  # a plain module from now on
        del self.__dict__["__deferred_lock__"]


def defer_import(names: tuple[str, ...]) -> None:
    """Put a :class:`DeferredModule` in ``sys.modules`` for each of ``names`` not imported yet."""
    for name in names:
        if name in sys.modules:
            continue
        parent, _, child = name.rpartition(".")
        if parent:
            importlib.import_module(parent)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        module = DeferredModule(name)
        module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
        if spec.submodule_search_locations is not None:
            module.__path__ = list(spec.submodule_search_locations)
        module.__dict__["__deferred_lock__"] = threading.RLock()
        module.__dict__["__deferred__"] = True
        sys.modules[name] = module
        if parent:
            setattr(sys.modules[parent], child, module)


def is_deferred(name: str) -> bool:
    """True while ``name`` is a deferred module whose code has not run."""
    return isinstance(sys.modules.get(name), DeferredModule)


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
