"""Loaded at start-up by every Python process that has bench/instrument on PYTHONPATH.

Used only by run_bench.py's counted pass (never by flowd itself): with FLOWD_BENCH_COUNT_DIR
set, it wraps sqlite3.connect so every connection counts its statements and transactions
(see benchcount.py); without it, it does nothing. Another sitecustomize further down
sys.path is still run.
"""

import os
import sys


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("FLOWD_BENCH_COUNT_DIR"):
    try:
        import benchcount

        benchcount.install()
    except Exception as exc:  # a counting problem must not stop the program
        sys.stderr.write(f"bench sitecustomize: SQL counting not installed: {exc!r}\n")
_chain()
