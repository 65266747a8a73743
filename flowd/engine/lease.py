"""This node's lease on a shared database (SPEC 10), renewed on a thread of the daemon.

While the lease is renewed the other nodes leave this node's flows alone; once it has
expired (the daemon killed, frozen or cut off from the database) they take them over
(``Reaper.take_over_expired``). On SQLite there is one node, so there is no lease to keep
(and no write every few seconds on an SD card).
"""

from __future__ import annotations

import logging
import threading
import time

from flowd.config import Config
from flowd.store import nodes
from flowd.store.models import sqlite_path, write_transaction

log = logging.getLogger(__name__)


def is_shared_database(config: Config) -> bool:
    """Whether several nodes may share the database (PostgreSQL), so leases are kept."""
    return sqlite_path(config.database.url) is None


class LeaseKeeper:
    """Renews the lease every third of ``[flowd] lease``.

    >>> keeper = LeaseKeeper(config); keeper.renew()   # before recovery
    >>> keeper.start(); ...; keeper.stop(release=True)  # after the workers stopped
    """

    def __init__(self, config: Config):
        self.node_id = config.flowd.node_id
        self.lease = config.flowd.lease
        self.client_id = config.mqtt.client_id
        self.enabled = is_shared_database(config)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def renew(self) -> None:
        """Extend the lease now (raises if the database cannot be written)."""
        if self.enabled:
            with write_transaction():
                nodes.renew_lease(self.node_id, self.lease, self.client_id)

    def wait_for_session_drain(self, limit: float) -> None:
        """Before connecting to the broker: if a live node is taking this node's session
        (its lease had expired), wait until it has disconnected from it. Connecting now
        would take the session over from under it: mosquitto ends it and drops what it
        still held; a broker that kept it would hand this node again what the other had
        stored but not acknowledged (a submit without ``request_id``: two flows).
        The wait ends early if that node's own lease expires (dead or frozen: its drain
        is gone with it), and after ``limit`` s in any case."""
        if not self.enabled:
            return
        with write_transaction():  # renewed first: no node claims the session after this read
            nodes.renew_lease(self.node_id, self.lease, self.client_id)
            drainer = nodes.session_drainer(self.node_id)
        if drainer is None:
            return
        log.info("node %s: node %s is taking the broker session this node left; connecting once it is done",
                 self.node_id, drainer)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if nodes.session_drainer(self.node_id) is None:
                return
            lease = nodes.lease_of(drainer)
            if lease is None or not lease[2]:
                log.warning("node %s: node %s stopped renewing its lease while taking this node's broker "
                            "session; connecting", self.node_id, drainer)
                break
        else:
            log.warning("node %s: node %s did not finish with this node's broker session within %.0fs; "
                        "connecting anyway", self.node_id, drainer, limit)
        with write_transaction():  # the mark would hold up this node's next start too
            nodes.session_drained(self.node_id)

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="flowd-lease", daemon=True)
        self._thread.start()

    def stop(self, release: bool) -> None:
        """Stop renewing; ``release`` ends the lease now (a clean stop: nothing runs here
        any more, so the other nodes may take what is left at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease)
            self._thread = None
        if release and self.enabled:
            with write_transaction():
                nodes.release_lease(self.node_id)

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.renew()
            except Exception:  # loop boundary: the database may come back before the lease runs out
                if not self._failing:
                    log.exception("node %s: cannot renew its lease; past %.0fs the other nodes take over "
                                  "its flows", self.node_id, self.lease)
                self._failing = True
                continue
            if self._failing:
                log.info("node %s: lease renewed again", self.node_id)
                self._failing = False
