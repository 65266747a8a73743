"""The MQTT side: the paho client and bridge, the intake of submits, the outbox publisher, topics."""
