"""flowd: run small Python tasks in order, as durable flows, on an IoT edge device."""

__version__ = "0.1.0"
