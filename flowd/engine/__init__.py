"""The flow state machine and what drives it: runner, batches, recovery, reaper, waits, leases."""
