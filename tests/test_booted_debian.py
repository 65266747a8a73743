"""deploy/install.sh and flowd.service on a Debian 12 booted under a real systemd.

The exchange, as a Pi owner would have it (tests/booted_debian.py says how the system
is booted and what it cannot show): install.sh --with-mosquitto on a fresh minimal
Debian (no procps, so no /bin/kill; no python3-venv; no libsystemd-dev, so no
python-systemd) -> the hardened unit starts and reports STATUS=; flows run and log to
the journal over its native protocol with FLOW_ID/ROUTINE/TASK and priorities;
systemctl reload works and says so; warnings show under journalctl -p warning; a kill -9
is restarted; systemctl stop ends cleanly with a retained "offline"; a second install
changes nothing; --uninstall removes the unit and keeps the data. The tests run in this
order on one booted system, each leaving flowd running for the next.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from booted_debian import BootedDebian, root_tarball, run, wait_for, wheelhouse

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ("bash", "/root/flowd/deploy/install.sh")
OFFLINE_PIP = ("--pip-args", "--no-index --find-links /root/wheels")
EXPOSURE = re.compile(r"Overall exposure level for flowd\.service: (\d+\.\d+)")
# What flowd's stderr format puts in front of every line; under journald it must not.
STDERR_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d|^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
LOUD_TASK = '''"""A step that logs one entry too big for a datagram (journald gets it in a memfd)."""

from flowd.task import Task


class Loud(Task):
    def perform(self, *args, **kwargs):
        self.log.warning("a long reading: %s", "m" * 300_000)
        return None
'''

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a root with unshare/pivot_root needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("unshare", "nsenter", "mosquitto_pub", "mosquitto_sub"))
                       or not Path("/usr/sbin/debootstrap").exists(),
                       reason="needs unshare, nsenter, mosquitto-clients and debootstrap (scripts/setup.sh)"),
]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedDebian]:
    """A fresh copy of the cached Debian root with this source tree in /root/flowd, booted."""
    tarball = root_tarball()
    wheels = wheelhouse(ROOT)
    base = tmp_path_factory.mktemp("booted")
    root = base / "root"
    root.mkdir()
    run(["tar", "-C", root, "--numeric-owner", "-xzf", tarball])
    root.chmod(0o755)  # the booted "/": the flowd user must get in
    source = root / "root" / "flowd"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "flowd.service"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    for name in ("flowd", "config", "deploy", "tasks"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(wheels, root / "root" / "wheels")
    booted = BootedDebian(root, base / "boot.log")
    try:
        booted.boot()
        yield booted
    finally:
        booted.poweroff()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(machine: BootedDebian) -> subprocess.CompletedProcess[str]:
    return machine.run(*INSTALL, "--with-mosquitto", *OFFLINE_PIP, check=False, timeout=400)


def flowctl(machine: BootedDebian, *args: str, timeout: float = 60, exit_code: int = 0) -> Any:
    """``flowctl --json`` through install.sh's wrapper (as the flowd user)."""
    result = machine.run("/usr/local/bin/flowctl", *args, "--json", timeout=timeout, check=False)
    assert result.returncode == exit_code, f"flowctl {' '.join(args)}: exit {result.returncode}\n" \
                                           f"{result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def serving(machine: BootedDebian, not_pid: str = "0") -> dict[str, str]:
    """Wait until flowd.service is active, connected to its broker, with a main pid other than ``not_pid``."""
    return wait_for(lambda: (u := machine.unit("flowd.service", "ActiveState", "MainPID", "StatusText", "NRestarts"))
                    and u["ActiveState"] == "active" and u["MainPID"] not in ("0", not_pid)
                    and "broker connected" in u["StatusText"] and u, 60, "flowd.service active and connected")


def write_file(machine: BootedDebian, path: str, text: str) -> None:
    """Rewrite a file in place (its owner and mode stay)."""
    machine.run("sh", "-c", f"cat > {path}", input=text)


def messages_after(machine: BootedDebian, mark: int, *matches: str) -> list[str]:
    """flowd.service's journal messages since ``mark``."""
    return [e["MESSAGE"] for e in machine.journal("-u", "flowd", *matches, since=mark)]


def test_install_with_mosquitto_starts_the_hardened_unit(machine: BootedDebian,
                                                         installed: subprocess.CompletedProcess[str]) -> None:
    out = installed.stdout
    assert installed.returncode == 0, f"install.sh failed:\n{out}\n{installed.stderr}"
    assert "installing python3-venv" in out and "installed mosquitto" in out and "started flowd.service" in out
    # The native journal protocol below is flowd's own, not python-systemd's.
    assert "skipped systemd-python" in out
    assert machine.run("python3", "-c", "import shutil; print(shutil.which('kill'))").stdout.strip() == "None"
    unit = serving(machine)
    assert re.fullmatch(r"\d+ running, \d+ queued, broker connected", unit["StatusText"]), unit
    status = machine.run("systemctl", "status", "--no-pager", "flowd").stdout
    assert f'Status: "{unit["StatusText"]}"' in status
    assert machine.unit("mosquitto.service", "ActiveState")["ActiveState"] == "active"
    assert machine.unit("flowd.service", "Type", "User")["User"] == "flowd"


def test_a_flow_runs_and_its_journal_entries_carry_flow_id_and_routine(
        machine: BootedDebian, installed: subprocess.CompletedProcess[str]) -> None:
    flowctl(machine, "task", "add", "nap", "example.VeryLong", "--option", "seconds=0.2")
    flowctl(machine, "task", "add", "one", "example.Step", "--option", "key=a")
    flowctl(machine, "routine", "add", "demo", "nap", "one")
    flow = flowctl(machine, "submit", "demo", "--kw", "b=1", "--wait", "--timeout", "60", timeout=90)
    assert flow["state"] == "DONE", flow
    assert flow["result"]["kwargs"] == {"b": 1, "slept": 0.2, "a": 1}, flow

    entries = wait_for(lambda: [e for e in machine.journal("-u", "flowd", f"FLOW_ID={flow['id']}")
                                if "sleeping 0.2s" in e["MESSAGE"]], 10, "the task's log line in the journal")
    entry = entries[0]
    assert entry["_TRANSPORT"] == "journal", entry  # the native protocol, not a stdout line
    assert (entry["ROUTINE"], entry["TASK"], entry["PRIORITY"]) == ("demo", "nap", "6"), entry
    assert entry["SYSLOG_IDENTIFIER"] == "flowd" and entry["MESSAGE"].startswith("flowd.task.example.VeryLong: ")
    # Every line of the daemon and its workers: native transport, no time or level in MESSAGE.
    daemon = [e for e in machine.journal("-u", "flowd", "SYSLOG_IDENTIFIER=flowd")]
    assert any(" ready: node 'flowd-pi'" in e["MESSAGE"] for e in daemon)
    assert {e["_TRANSPORT"] for e in daemon} == {"journal"}
    assert [e["MESSAGE"] for e in daemon if STDERR_PREFIX.search(e["MESSAGE"])] == []
    assert [e["MESSAGE"] for e in machine.journal("-u", "flowd", "_TRANSPORT=stdout")
            if STDERR_PREFIX.search(e["MESSAGE"])] == []


def test_reload_succeeds_is_logged_and_a_broken_file_fails_it(
        machine: BootedDebian, installed: subprocess.CompletedProcess[str]) -> None:
    pid = serving(machine)["MainPID"]
    original = machine.run("cat", "/etc/flowd/flowd.toml").stdout
    assert '#log_level = "info"' in original
    mark = machine.mark()
    write_file(machine, "/etc/flowd/flowd.toml", original.replace('#log_level = "info"', 'log_level = "debug"'))
    try:
        machine.run("systemctl", "reload", "flowd")
        logged = wait_for(lambda: (said := messages_after(machine, mark))
                          and any("log_level changed from 'info' to 'debug'" in m for m in said) and said,
                          10, "the reload and the changed key in the journal")
        assert f"flowd reload: /etc/flowd/flowd.toml is valid; asked flowd (pid {pid}) to reload it" in logged
        # the daemon's own line (logger flowd.service.service)
        assert "flowd.service.service: reloading (SIGHUP)" in logged
        assert machine.unit("flowd.service", "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}

        mark = machine.mark()
        write_file(machine, "/etc/flowd/flowd.toml", "[flowd\nbroken\n")
        refused = machine.run("systemctl", "reload", "flowd", check=False)
        assert refused.returncode != 0
        said = messages_after(machine, mark)
        assert any("/etc/flowd/flowd.toml" in m and "not valid TOML" in m
                   and "the running daemon keeps its configuration" in m for m in said), said
        assert machine.unit("flowd.service", "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    finally:
        write_file(machine, "/etc/flowd/flowd.toml", original)
        machine.run("systemctl", "reload", "flowd")


def test_refused_submit_and_failed_flow_show_under_priority_warning(
        machine: BootedDebian, installed: subprocess.CompletedProcess[str]) -> None:
    serving(machine)
    mark = machine.mark()
    sent = machine.run_on_its_network("mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-q", "1",
                                      "-t", "flow/submit", "-m", "not json {")
    assert sent.returncode == 0, sent.stderr
    refused = wait_for(lambda: [e for e in machine.journal("-u", "flowd", "-p", "warning", since=mark)
                                if "refused" in e["MESSAGE"]], 15, "the refused submit under -p warning")
    assert refused[0]["PRIORITY"] == "4" and "flow/submit" in refused[0]["MESSAGE"]

    flowctl(machine, "task", "add", "bad-sum", "example.Step", "--option", "source=a")
    flowctl(machine, "routine", "add", "failing", "bad-sum")
    flow = flowctl(machine, "submit", "failing", "--kw", "a=text", "--wait", "--timeout", "60", timeout=90,
                   exit_code=1)
    assert flow["state"] == "FAILED", flow
    failed = wait_for(lambda: [e for e in machine.journal("-u", "flowd", "-p", "warning", f"FLOW_ID={flow['id']}")
                               if "ended FAILED" in e["MESSAGE"]], 10, "the failed flow under -p warning")
    assert failed[0]["ROUTINE"] == "failing" and failed[0]["PRIORITY"] == "4"
    assert "TypeError: can only concatenate str" in failed[0]["MESSAGE"]


def test_an_entry_too_big_for_a_datagram_reaches_the_journal_from_the_sandbox(
        machine: BootedDebian, installed: subprocess.CompletedProcess[str]) -> None:
    # Logged by a step in a worker, under the unit's system call filter and
    # MemoryDenyWriteExecute: the memfd path has to work there, not just in a test process.
    write_file(machine, "/etc/flowd/tasks/task_loud.py", LOUD_TASK)
    flowctl(machine, "task", "add", "loud", "loud.Loud")
    flowctl(machine, "routine", "add", "loud", "loud")
    flow = flowctl(machine, "submit", "loud", "--wait", "--timeout", "60", timeout=90)
    assert flow["state"] == "DONE", flow
    entries = wait_for(lambda: [e for e in machine.journal("-u", "flowd", f"FLOW_ID={flow['id']}", "TASK=loud")
                                if "a long reading" in e["MESSAGE"]], 10, "the big entry in the journal")
    assert len(entries[0]["MESSAGE"]) > 300_000 and entries[0]["PRIORITY"] == "4"
    assert entries[0]["_TRANSPORT"] == "journal"


def test_systemd_analyze_security_exposure_is_at_most_2(machine: BootedDebian,
                                                        installed: subprocess.CompletedProcess[str]) -> None:
    report = machine.run("systemd-analyze", "security", "--no-pager", "flowd.service").stdout
    match = EXPOSURE.search(report)
    assert match, report
    assert float(match.group(1)) <= 2.0, report
    print(f"systemd-analyze security flowd, booted: {match.group(1)}")


def test_kill_9_of_the_main_process_is_restarted(machine: BootedDebian,
                                                 installed: subprocess.CompletedProcess[str]) -> None:
    before = serving(machine)
    machine.run("/opt/flowd/venv/bin/python", "-c", f"import os, signal; os.kill({before['MainPID']}, signal.SIGKILL)")
    after = serving(machine, not_pid=before["MainPID"])
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1


def test_stop_ends_cleanly_and_leaves_a_retained_offline(machine: BootedDebian,
                                                         installed: subprocess.CompletedProcess[str]) -> None:
    serving(machine)
    machine.run("systemctl", "stop", "flowd", timeout=90)
    unit = machine.unit("flowd.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert unit == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
    retained = machine.run_on_its_network("mosquitto_sub", "-h", "127.0.0.1", "-p", "1883",
                                          "-t", "flowd/flowd-pi/status", "-C", "1", "-W", "5")
    assert retained.returncode == 0, retained.stderr
    assert json.loads(retained.stdout)["state"] == "offline"
    machine.run("systemctl", "start", "flowd", timeout=120)
    serving(machine)


def test_second_install_changes_nothing_and_keeps_the_config(machine: BootedDebian,
                                                             installed: subprocess.CompletedProcess[str]) -> None:
    pid = serving(machine)["MainPID"]
    machine.sh("echo '# edited by the owner' >> /etc/flowd/flowd.toml")
    again = machine.run(*INSTALL, "--with-mosquitto", *OFFLINE_PIP, timeout=300)
    changed = [line for line in again.stdout.splitlines()
               if re.match(r"flowd-install: (wrote|created|fixed|installed|installing|restarted|started) ", line)]
    assert changed == [], again.stdout
    assert "ok      flowd.service running" in again.stdout
    assert "# edited by the owner" in machine.run("cat", "/etc/flowd/flowd.toml").stdout
    assert machine.unit("flowd.service", "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def test_uninstall_removes_the_unit_and_keeps_the_data(machine: BootedDebian,
                                                       installed: subprocess.CompletedProcess[str]) -> None:
    serving(machine)
    out = machine.run(*INSTALL, "--uninstall", timeout=120).stdout
    assert "kept /var/lib/flowd" in out
    assert machine.unit("flowd.service", "LoadState")["LoadState"] == "not-found"
    assert machine.run("test", "-e", "/etc/systemd/system/flowd.service", check=False).returncode == 1
    assert machine.run("test", "-s", "/var/lib/flowd/flowd.db").returncode == 0
    assert "# edited by the owner" in machine.run("cat", "/etc/flowd/flowd.toml").stdout
    assert machine.run("systemctl", "is-active", "flowd", check=False).stdout.strip() == "inactive"
