"""``flowd run``: the daemon's wiring, systemd (sd_notify, journal), logging, libc, imports."""
