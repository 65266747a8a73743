"""The huey queue that hands flows to worker processes, and the worker processes."""
