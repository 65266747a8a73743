"""Publish a message to MQTT from a flow (through flowd's outbox: nothing is lost offline)."""

from flowd.task import Task


class Publish(Task):
    """Publishes `payload` (default: this step's kwargs) to `topic`; passes its input on."""

    def perform(self, *args, topic, payload=None, qos=1, retain=False, **kwargs):
        body = payload if payload is not None else {"args": list(args), "kwargs": kwargs}
        self.publish(topic, body, qos=int(qos), retain=bool(retain))
        return None
