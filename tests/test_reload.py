"""``flowd reload``: what ExecReload= runs, since a minimal Debian has no /bin/kill.

A real daemon is started; ``flowd reload`` finds it through the state folder's lock (or
takes ``--pid``, as the unit passes $MAINPID), checks the file first and signals it.
tests/test_booted_debian.py runs the same through ``systemctl reload`` under systemd.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import ROOT, flowd_env, wait_for

from flowd.service.statelock import LOCK_FILE, daemon_pid


def flowd_reload(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowd", "reload", *args], capture_output=True, text=True,
                          env=flowd_env(), cwd=str(ROOT), timeout=30)


def test_reload_signals_the_daemon_of_the_state_folder_and_refuses_a_broken_file(
        broker: Any, config_file: Callable[..., Path], flowd_proc: Any, state_dir: Path) -> None:
    path = config_file(broker=broker)
    proc = flowd_proc(path)
    wait_for(lambda: " ready: node 'testnode'" in proc.log_text(), timeout=20, message="flowd ready")
    assert daemon_pid(state_dir) == proc.pid

    done = flowd_reload("--config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"flowd reload: {path} is valid; asked flowd (pid {proc.pid}) to reload it"
    wait_for(lambda: "reloading (SIGHUP)" in proc.log_text(), timeout=10, message="the daemon's reload")
    wait_for(lambda: "reload: the configuration is unchanged" in proc.log_text(), timeout=10, message="reloaded")

    by_pid = flowd_reload("--config", str(path), "--pid", str(proc.pid))
    assert by_pid.returncode == 0, by_pid.stderr
    wait_for(lambda: proc.log_text().count("reloading (SIGHUP)") == 2, timeout=10, message="the second reload")

    path.write_text(path.read_text() + "\n[flowd\n")
    refused = flowd_reload("--config", str(path))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "not valid TOML" in refused.stderr and "the running daemon keeps its configuration" in refused.stderr
    assert proc.log_text().count("reloading (SIGHUP)") == 2  # not disturbed
    assert proc.proc.poll() is None
    assert proc.terminate() == 0


def test_reload_without_a_daemon_says_so_even_with_a_stale_pid_file(
        config_file: Callable[..., Path], state_dir: Path) -> None:
    # After a kill -9 the lock file still names the dead daemon's pid, which may by now be
    # another process: only a held lock makes the pid believable.
    path = config_file()
    state_dir.mkdir(parents=True, exist_ok=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (state_dir / LOCK_FILE).write_text(f"{bystander.pid}\n")
        assert daemon_pid(state_dir) is None
        result = flowd_reload("--config", str(path))
        assert result.returncode == 1
        assert result.stderr.strip() == f"flowd reload: no flowd is running with state_dir {state_dir}"
        assert bystander.poll() is None  # the SIGHUP did not go to whoever has that pid now
    finally:
        bystander.kill()
        bystander.wait()
    gone = flowd_reload("--config", str(path), "--pid", "999999999")
    assert gone.returncode == 1 and "no process 999999999" in gone.stderr
