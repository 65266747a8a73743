"""``python -m flowd.cli`` is the same as ``flowctl``."""

from flowd.cli.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
