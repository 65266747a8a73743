"""flowd.service.imports.defer_import: a deferred module runs its code at its first use, once,
even when several threads use it at the same moment, and is then a plain module.

Each case runs in a fresh interpreter, so the modules of the test process stay as they are.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A module that takes a while to run, so other threads arrive while it runs.
SLOW_MODULE = "import time\nRUNS = []\ntime.sleep(0.3)\nRUNS.append(1)\nLAST = 'defined last'\n"


def run_python(code: str, tmp_path: Path) -> str:
    (tmp_path / "slowmod.py").write_text(SLOW_MODULE)
    (tmp_path / "brokenmod.py").write_text("VALUE = 1\nraise ImportError('broken on purpose')\n")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_deferred_module_runs_at_its_first_use_not_at_import(tmp_path: Path) -> None:
    out = run_python("""
        import sys
        from flowd.service.imports import defer_import, is_deferred
        defer_import(("slowmod", "urllib.request"))
        import slowmod, urllib.request
        import urllib.request as request
        print(is_deferred("slowmod"), is_deferred("urllib.request"), "email" in sys.modules, request is urllib.request)
        from urllib.request import Request
        print(is_deferred("urllib.request"), Request.__module__, "email" in sys.modules, type(urllib.request).__name__)
        print(slowmod.LAST, slowmod.RUNS, is_deferred("slowmod"))
    """, tmp_path)
    assert out.splitlines() == ["True True False True", "False urllib.request True module",
                                "defined last [1] False"]


THREADS = """
    import sys, threading
    from flowd.service.imports import defer_import
    {make}
    slowmod = sys.modules["slowmod"]  # not "import slowmod": that runs a LazyLoader's module at once
    seen, failed = [], []
    def use():
        try:
            seen.append(slowmod.LAST)
        except AttributeError as exc:
            failed.append(exc)
    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(len(seen), len(failed), slowmod.RUNS)
"""


def test_threads_using_a_deferred_module_at_once_all_see_it_whole(tmp_path: Path) -> None:
    assert run_python(THREADS.format(make='defer_import(("slowmod",))'), tmp_path) == "8 0 [1]"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the control: LazyLoader's race is in Python 3.11")
def test_the_thread_check_catches_a_module_seen_half_run(tmp_path: Path) -> None:
    # The same threads on importlib's LazyLoader: the first use switches the module's
    # class before its code runs, so threads arriving meanwhile miss names.
    lazy = ("import importlib.util; spec = importlib.util.find_spec('slowmod'); "
            "spec.loader = importlib.util.LazyLoader(spec.loader); m = importlib.util.module_from_spec(spec); "
            "sys.modules['slowmod'] = m; spec.loader.exec_module(m)")
    seen, failed, _ = run_python(THREADS.format(make=lazy), tmp_path).split(" ", 2)
    assert int(failed) > 0 and int(seen) + int(failed) == 8


def test_a_deferred_module_that_fails_is_not_left_imported(tmp_path: Path) -> None:
    out = run_python("""
        import sys
        from flowd.service.imports import defer_import
        defer_import(("brokenmod",))
        import brokenmod
        try:
            brokenmod.VALUE
        except ImportError as exc:
            print("raised:", exc)
        print("brokenmod" in sys.modules)
    """, tmp_path)
    assert out.splitlines() == ["raised: broken on purpose", "False"]


def test_an_imported_module_is_left_as_it_is(tmp_path: Path) -> None:
    out = run_python("""
        import ssl
        from flowd.service.imports import defer_import, is_deferred
        defer_import(("ssl",))
        import sys
        print(sys.modules["ssl"] is ssl, is_deferred("ssl"))
    """, tmp_path)
    assert out == "True False"
