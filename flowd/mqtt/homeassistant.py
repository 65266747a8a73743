"""Home Assistant MQTT discovery (SPEC 12): the node as a device, each routine MQTT may
start as a ``button`` and a ``sensor`` of its last flow.

Home Assistant's documented discovery scheme: one retained JSON config per entity on
``<prefix>/<component>/<node>/<object>/config`` (ids of ``[a-zA-Z0-9_-]`` only), each
with a ``unique_id`` and a ``device`` block (so the entities belong to one device), its
availability read from the node's retained ``flowd/<node_id>/status`` (its ``state``:
``online``/``offline``). An empty retained config removes an entity.

- button: pressing it publishes ``{"routine": NAME}`` to ``flowd/<node_id>/submit``;
- sensor: the state of the routine's last flow, from a retained copy of its result
  that the engine writes with the result (``flowd/<node_id>/routines/<name>/last``),
  with the flow id, result, error and finished_at as attributes.

The configs go through the outbox like everything flowd publishes, at each connect,
when routines change, and when Home Assistant announces itself (``<prefix>/status``
= ``online``). What was published is remembered in the database, so a routine removed
while flowd was down, or discovery turned off, empties its configs at the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from typing import Any

from flowd import __version__
from flowd.config import Config
from flowd.mqtt import outbox
from flowd.store.models import definitions_version, get_meta, set_meta, write_transaction

log = logging.getLogger(__name__)

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")


def discovery_id(name: str) -> str:
    """``name`` as a discovery topic id; a name that had to change gets a short hash,
    so ``a.b`` and ``a_b`` stay two entities."""
    cleaned = _NOT_ID.sub("_", name)
    return cleaned if cleaned == name else f"{cleaned}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def last_flow_topic(config: Config, routine: str) -> str:
    """Where the routine's last result is kept, retained, for its sensor."""
    return config.topic(f"flowd/{config.flowd.node_id}/routines/{routine}/last")


def entity_configs(config: Config, routines: list[str]) -> dict[str, str]:
    """Discovery topic -> retained JSON config, for every entity of ``routines``."""
    node = config.flowd.node_id
    ha = config.homeassistant
    node_key = f"flowd_{discovery_id(node)}"
    common: dict[str, Any] = {
        "availability_topic": config.topic(f"flowd/{node}/status"),
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {"identifiers": [node_key], "name": f"flowd {node}", "manufacturer": "flowd",
                   "model": "flowd node", "sw_version": __version__},
        "origin": {"name": "flowd", "sw_version": __version__},
        "qos": 1,
    }
    configs: dict[str, str] = {}
    for routine in routines:
        object_id = discovery_id(routine)
        button = {**common, "name": f"Run {routine}", "unique_id": f"{node_key}_{object_id}_run",
                  "command_topic": config.topic(f"flowd/{node}/submit"),
                  "payload_press": json.dumps({"routine": routine}, separators=(",", ":")),
                  "retain": False, "icon": "mdi:play"}
        sensor = {**common, "name": f"{routine} last flow", "unique_id": f"{node_key}_{object_id}_last",
                  "state_topic": last_flow_topic(config, routine), "value_template": "{{ value_json.state }}",
                  "json_attributes_topic": last_flow_topic(config, routine),
                  "json_attributes_template": ('{{ {"flow_id": value_json.flow_id, "result": value_json.result, '
                                               '"error": value_json.error, "finished_at": value_json.finished_at}'
                                               " | tojson }}"),
                  "icon": "mdi:state-machine"}
        configs[f"{ha.prefix}/button/{node_key}/{object_id}/config"] = _json(button)
        configs[f"{ha.prefix}/sensor/{node_key}/{object_id}/config"] = _json(sensor)
    return configs


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


class Discovery:
    """Keeps Home Assistant's view of this node up to date; the daemon's loop calls
    :meth:`tick` every second, the MQTT bridge :meth:`request_publish`.

    >>> discovery = Discovery(config, bridge); discovery.tick()
    """

    def __init__(self, config: Config, bridge: Any):
        self.config = config
        self.bridge = bridge
        self.birth_topic = f"{config.homeassistant.prefix}/status"
        self._meta_key = f"homeassistant_entities:{config.flowd.node_id}"
        self._wanted = threading.Event()   # a connect or Home Assistant's birth: publish every config again
        self._version: int | None = None
        if config.homeassistant.discovery:
            bridge.extra_topics[self.birth_topic] = self.on_birth
        bridge.on_connected = self.request_publish

    def request_publish(self) -> None:
        self._wanted.set()

    def on_birth(self, payload: bytes) -> None:
        """``<prefix>/status``: Home Assistant (re)started and forgot what it was told."""
        if payload.strip() == b"online":
            log.info("Home Assistant announced itself on %s; publishing discovery configs again", self.birth_topic)
            self._wanted.set()

    def tick(self) -> None:
        """Publish what changed: every config after a request, else only when routines changed."""
        if not self.bridge.is_connected():
            return
        if not self.config.homeassistant.discovery and self._version is not None:
            return  # off: what an earlier run published was emptied once
        version = definitions_version()
        forced = self._wanted.is_set()
        if not forced and version == self._version:
            return
        self._wanted.clear()
        self._version = version
        self.sync(resend=forced)

    def sync(self, resend: bool = True) -> int:
        """Publish the configs wanted (all of them with ``resend``, else the new or changed)
        and empty the ones no longer wanted; returns how many messages were queued."""
        wanted = entity_configs(self.config, self._startable_routines()) if self.config.homeassistant.discovery \
            else {}
        with write_transaction(sync=False):
            before: dict[str, str] = json.loads(get_meta(self._meta_key) or "{}")
            queued = 0
            for topic, payload in wanted.items():
                if resend or before.get(topic) != payload:
                    outbox.add_message(topic, payload, retain=True, node_id=self.config.flowd.node_id)
                    queued += 1
            for topic in sorted(set(before) - set(wanted)):
                # Home Assistant removes the entity
                outbox.add_message(topic, "", retain=True, node_id=self.config.flowd.node_id)
                if topic.startswith(f"{self.config.homeassistant.prefix}/sensor/"):
                    state_topic = json.loads(before[topic])["state_topic"]
                    # and its last state is forgotten
                    outbox.add_message(state_topic, "", retain=True, node_id=self.config.flowd.node_id)
                queued += 1
            if wanted != before:
                set_meta(self._meta_key, json.dumps(wanted, sort_keys=True))
        if queued:
            self.bridge.publisher.poke()
            log.info("Home Assistant: %d discovery message(s) queued (%d entities)", queued, len(wanted))
        return queued

    def _startable_routines(self) -> list[str]:
        from flowd.store import Definitions

        definitions = Definitions()
        definitions.refresh()
        return sorted(r.name for r in definitions.routines.values() if r.mqtt and r.enabled)
