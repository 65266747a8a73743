"""``python -m flowd`` is the same as ``flowd``."""

from flowd.service.service import main

if __name__ == "__main__":
    raise SystemExit(main())
