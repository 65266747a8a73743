"""flowctl: the command line, its output and its hints, and ``flowctl run``."""
